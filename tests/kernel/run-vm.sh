#!/usr/bin/env bash
# Kernel tier: pytest -m kernel inside the IPVS guest (scripts/ipvs-vm.sh).
#   usage: tests/kernel/run-vm.sh [pytest args...]
set -euo pipefail
cd "$(dirname "$0")/../.."
# The repository is read-only in the guest: no cache, no hypothesis database.
exec bash scripts/ipvs-vm.sh .venv/bin/python -m pytest -p no:cacheprovider -p no:hypothesispytest \
    --timeout 900 -m kernel tests/kernel "$@"
