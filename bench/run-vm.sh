#!/usr/bin/env bash
# Run one benchmark script in the IPVS guest and keep its JSON results.
#   usage: bench/run-vm.sh bench/SCRIPT.py [ARGS...]    (as root, from anywhere)
set -euo pipefail
cd "$(dirname "$0")/.."
script=$1
shift
module=$(echo "${script%.py}" | tr / .)  # run as a module: the repo root is on sys.path
rc=0
bash scripts/ipvs-vm.sh .venv/bin/python -m "$module" "$@" || rc=$?
mkdir -p bench/results
cp build/vm/*.json bench/results/ 2>/dev/null || true
cat build/vm/guest.log | sed -n '/^{/,/^written/p'
exit $rc
