#!/usr/bin/env bash
# Run one benchmark script in a guest with IPVS and keep its JSON results:
# the UML kernel (scripts/uml-vm.sh) by default, Debian's kernel under TCG
# (scripts/tcg-vm.sh) with BENCH_KERNEL=tcg. Each results file says which.
# UML_RUN names the UML guest's output folder under build/ (uml-vm.sh
# honours it too), so a benchmark can run beside another guest.
#   usage: bench/run-vm.sh bench/SCRIPT.py [ARGS...]    (as root, from anywhere)
set -euo pipefail
cd "$(dirname "$0")/.."
script=$1
shift
module=$(echo "${script%.py}" | tr / .)  # run as a module: the repo root is on sys.path
case "${BENCH_KERNEL:-uml}" in
    uml) runner=scripts/uml-vm.sh out=build/${UML_RUN:-uml-run} ;;
    tcg) runner=scripts/tcg-vm.sh out=build/vm ;;
    *) echo "BENCH_KERNEL is uml or tcg" >&2; exit 2 ;;
esac
rc=0
bash "$runner" .venv/bin/python -m "$module" "$@" || rc=$?
mkdir -p bench/results
cp "$out"/*.json bench/results/ 2>/dev/null || true
exit $rc
