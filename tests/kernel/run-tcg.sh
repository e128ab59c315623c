#!/usr/bin/env bash
# Kernel tier, smoke on Debian's own kernel: the seed's lab end to end in the
# virtme-ng guest under TCG (scripts/tcg-vm.sh), so the distribution's kernel
# stays proven beside the UML kernel the rest of the tier runs on. By default
# the lab's first test only: it balances, follows a stop and a start and
# survives a restart; the module's other two run in UML with the rest, and
# each of them cost a minute of emulation on the CPU guest B waits for.
#   usage: tests/kernel/run-tcg.sh [pytest args...]   (default: that one test)
set -euo pipefail
cd "$(dirname "$0")/../.."
args=("$@")
[ ${#args[@]} -gt 0 ] || args=(tests/kernel/test_seed_lab.py::test_the_seed_lab_balances_follows_stop_and_start_and_survives_a_restart)
# The repository is read-only in this guest: no cache, no hypothesis database.
exec bash scripts/tcg-vm.sh .venv/bin/python -m pytest -p no:cacheprovider -p no:hypothesispytest \
    --timeout 900 -m kernel "${args[@]}"
