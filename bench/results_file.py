"""Where benchmark results go, and how: one JSON file per run."""

from __future__ import annotations

import json
import os
import subprocess
import time
from pathlib import Path

# In a guest, results go to its output directory, which bench/run-vm.sh
# copies to bench/results/.
RESULTS = Path(os.environ.get("DOCKERLB_TEST_OUT") or Path(__file__).parent / "results")


def provenance() -> dict[str, str]:
    """Where the run happened (uml, tcg or host: the guest scripts say) and on which commit."""
    done = subprocess.run(
        ["git", "-C", str(Path(__file__).parent), "describe", "--always", "--dirty", "--abbrev=12"],
        capture_output=True,
        text=True,
        check=False,
    )
    return {"where": os.environ.get("DOCKERLB_KERNEL", "host"), "commit": done.stdout.strip() or "unknown"}


def save(kind: str, result: dict) -> Path:
    """Write ``<kind>-<time>.json`` (with its provenance), print it, and say where it went."""
    RESULTS.mkdir(exist_ok=True)
    result = {**provenance(), **result}
    out = RESULTS / f"{kind}-{time.strftime('%Y%m%dT%H%M%S')}.json"
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))
    print(f"written to {out}")
    return out


def _git(*args: str) -> str:
    done = subprocess.run(
        ["git", "-C", str(Path(__file__).parent), *args], capture_output=True, text=True, check=False
    )
    return done.stdout.strip()


def save_figure(figure: str, servers_present: int, runs: int, values: dict, command: str) -> Path:
    """One figure of issue 31 as a file of its own, ``<figure>-<time>.json``:
    ``figure``, ``servers_present``, its values (``p50_ms`` and ``p99_ms``,
    or ``mb``, or ``ratio``, and whatever else says what they are), ``runs``,
    ``kernel`` (uml, or native: this machine's own), ``commit`` and ``dirty``
    (tracked files changed since it: a figure to quote has false), and the
    command that measured it."""
    RESULTS.mkdir(exist_ok=True)
    where = os.environ.get("DOCKERLB_KERNEL", "host")
    result = {
        "figure": figure,
        "servers_present": servers_present,
        **values,
        "runs": runs,
        "kernel": "native" if where == "host" else where,
        "commit": _git("rev-parse", "--short=12", "HEAD") or "unknown",
        "dirty": bool(_git("status", "--porcelain", "--untracked-files=no")),
        "command": command,
    }
    out = RESULTS / f"{figure}-{time.strftime('%Y%m%dT%H%M%S')}.json"
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"{figure}: written to {out}", flush=True)
    return out
