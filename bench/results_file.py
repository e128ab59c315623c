"""Where benchmark results go, and how: one JSON file per run."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

# The repository is read-only in the IPVS guest: there results go to its
# output directory, which bench/run-vm.sh copies to bench/results/.
RESULTS = Path(os.environ.get("DOCKERLB_TEST_OUT") or Path(__file__).parent / "results")


def save(kind: str, result: dict) -> Path:
    """Write ``<kind>-<time>.json``, print it, and say where it went."""
    RESULTS.mkdir(exist_ok=True)
    out = RESULTS / f"{kind}-{time.strftime('%Y%m%dT%H%M%S')}.json"
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))
    print(f"written to {out}")
    return out
