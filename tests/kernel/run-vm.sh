#!/usr/bin/env bash
# Kernel tier: pytest inside a UML guest (scripts/uml-vm.sh), a real IPVS
# kernel run as a process of this machine, pinned to one CPU. Runs the
# kernel tests, and the host tests whose branch depends on what the kernel
# has (IPVS, ipip), again where it has them.
#   usage: tests/kernel/run-vm.sh                    the whole tier
#          tests/kernel/run-vm.sh [pytest args...]   these tests
# One guest, not two side by side: two pinned guests on this 2-CPU machine
# both stalled at once mid-run (each spinning in the host kernel's page
# fault path, no progress for 10 minutes), which one guest never did.
set -euo pipefail
cd "$(dirname "$0")/../.."
pytest=(.venv/bin/python -m pytest -p no:cacheprovider -p no:hypothesispytest --timeout 1800 -m "kernel or host")
if [ $# -eq 0 ]; then
    # -rP: the passed tests' output too (the storm prints its pass counts).
    set -- --durations=15 -rP tests/kernel \
        tests/host/test_cli_on_this_kernel.py tests/host/test_real_server_namespaces.py
fi
exec bash scripts/uml-vm.sh "${pytest[@]}" "$@"
