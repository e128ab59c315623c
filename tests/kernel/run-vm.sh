#!/usr/bin/env bash
# Kernel tier: pytest inside UML guests (scripts/uml-vm.sh), a real IPVS
# kernel run as a process of this machine. Runs the kernel tests, and the
# host tests named on the command line (those whose branch depends on what
# the kernel has run again where it has IPVS and ipip).
#   usage: tests/kernel/run-vm.sh                    the whole tier, two guests side by side
#          tests/kernel/run-vm.sh [pytest args...]   one guest, these tests
# A UML guest uses one CPU (see uml-vm.sh), so on a 2-CPU machine two run
# side by side: the lifecycle module (the 200-container storm) in one, the
# rest in the other. Each prints its own log when done.
set -euo pipefail
cd "$(dirname "$0")/../.."
pytest=(.venv/bin/python -m pytest -p no:cacheprovider -p no:hypothesispytest --timeout 1800 -m "kernel or host")
if [ $# -gt 0 ]; then
    exec bash scripts/uml-vm.sh "${pytest[@]}" "$@"
fi
mkdir -p build
rest=(tests/kernel tests/host/test_cli_on_this_kernel.py tests/host/test_real_server_namespaces.py
    --ignore tests/kernel/test_lifecycle.py)
UML_RUN=uml-run-a UML_CPU=0 bash scripts/uml-vm.sh "${pytest[@]}" --durations=10 tests/kernel/test_lifecycle.py \
    > build/kernel-tier-a.log 2>&1 &
a=$!
UML_RUN=uml-run-b UML_CPU=$(( $(nproc) > 1 ? 1 : 0 )) bash scripts/uml-vm.sh "${pytest[@]}" --durations=10 "${rest[@]}" \
    > build/kernel-tier-b.log 2>&1 &
b=$!
rc=0
wait "$a" || rc=$?
echo "---- guest a: tests/kernel/test_lifecycle.py"
cat build/kernel-tier-a.log
wait "$b" || rc=$?
echo "---- guest b: the rest of tests/kernel, and the kernel-dependent host tests"
cat build/kernel-tier-b.log
exit "$rc"
