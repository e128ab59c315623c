#!/usr/bin/env bash
# Kernel tier, smoke on Debian's own kernel: the seed's lab end to end in the
# virtme-ng guest under TCG (scripts/tcg-vm.sh), so the distribution's kernel
# stays proven beside the UML kernel the rest of the tier runs on.
#   usage: tests/kernel/run-tcg.sh [pytest args...]   (default: tests/kernel/test_seed_lab.py)
set -euo pipefail
cd "$(dirname "$0")/../.."
args=("$@")
[ ${#args[@]} -gt 0 ] || args=(tests/kernel/test_seed_lab.py)
# The repository is read-only in this guest: no cache, no hypothesis database.
exec bash scripts/tcg-vm.sh .venv/bin/python -m pytest -p no:cacheprovider -p no:hypothesispytest \
    --timeout 900 -m kernel "${args[@]}"
