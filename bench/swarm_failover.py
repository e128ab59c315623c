"""The failover figures of tests/kernel/test_swarm_bgp.py or test_swarm_vrrp.py
over several runs.

Each run of one of those modules loses one director host and writes its
figures to its guest's output folder (build/<UML_RUN>/swarm-bgp-failover.json
or swarm-vrrp-failover.json). This puts the runs side by side, with each
figure's median and range, and says whether they all ran one commit with a
clean tree (only such runs count).

    # one guest per CPU; a third after (MODULE: test_swarm_bgp or test_swarm_vrrp)
    UML_RUN=sbgp-1 UML_CPU=0 bash tests/kernel/run-vm.sh tests/kernel/MODULE.py &
    UML_RUN=sbgp-2 UML_CPU=1 bash tests/kernel/run-vm.sh tests/kernel/MODULE.py; wait
    UML_RUN=sbgp-3 UML_CPU=0 bash tests/kernel/run-vm.sh tests/kernel/MODULE.py
    .venv/bin/python bench/swarm_failover.py build/sbgp-[123] \
        > bench/results/swarm-<bgp or vrrp>-failover-<date>-<commit>.json
"""

from __future__ import annotations

import json
import statistics
import sys
from pathlib import Path

FIGURES = (
    "path_withdrawn_s",  # BGP: the router has dropped the lost director's path
    "took_over_s",  # VRRP: the other director holds the VIP
    "lost_tasks_quiesced_s",
    "lost_tasks_out_of_the_table_s",
    "new_connections_failed",
    "last_failed_s",
)


def summary(folders: list[Path]) -> dict:
    runs = []
    for folder in folders:
        (figures,) = folder.glob("swarm-*-failover.json")  # the one the module wrote
        runs.append({"run": folder.name, **json.loads(figures.read_text())})
    commits = {r["commit"] for r in runs}
    return {
        "commit": commits.pop() if len(commits) == 1 else sorted(commits),
        "every_tree_clean": not any(r["dirty"] for r in runs),
        "runs": runs,
        **{
            key: {
                "median": round(statistics.median(r[key] for r in runs), 3),
                "min": min(r[key] for r in runs),
                "max": max(r[key] for r in runs),
            }
            for key in FIGURES
            if all(key in r for r in runs)  # runs before a figure was measured lack it
        },
    }


if __name__ == "__main__":
    print(json.dumps(summary([Path(a) for a in sys.argv[1:]]), indent=2))
