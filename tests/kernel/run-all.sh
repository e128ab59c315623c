#!/usr/bin/env bash
# The whole kernel tier, as CI runs it, on this 2-CPU machine: two UML
# guests, one pinned to each CPU (tests/kernel/run-vm.sh), and the TCG smoke
# (tests/kernel/run-tcg.sh, one emulated CPU).
#
# CPU 0 starts guest A at once; CPU 1 runs the TCG smoke first, then guest B.
# Both guests are given every module, the longest first, and each runs the
# next module neither has taken (tests/claims.py; a claim is a symlink in
# build/kernel-claims naming its guest), so the CPUs finish within one module of each other
# however the modules' times change. A fixed split did not: at stop 35 one
# guest ended 8 minutes before the other (bench/results/clean-clone-20261207T0343.txt).
# Every test collected must have finished in one guest or the other: the
# last check says which did not.
# Each part's output is printed whole when it ends, with its time; the
# exit code is 0 only if all three passed and no test went unrun.
#   usage: tests/kernel/run-all.sh
set -euo pipefail
cd "$(dirname "$0")/../.."
mkdir -p build
# The longest first (times from the clean-clone run above): a long module
# taken last would leave the other CPU idle for its length.
modules=(tests/kernel/test_compose.py tests/kernel/test_lifecycle.py tests/kernel/test_swarm.py
    tests/kernel/test_swarm_bgp.py tests/kernel/test_swarm_vrrp.py
    tests/kernel/test_trust.py tests/kernel/test_field.py tests/kernel/test_forwarding.py
    tests/kernel/test_ha_pair.py tests/kernel/test_bgp.py tests/kernel/test_adapters.py)
for f in tests/kernel/test_*.py; do  # a new module is never left out
    [[ " ${modules[*]} " == *" $f "* ]] || modules+=("$f")
done
# The host tests whose branch depends on the kernel (IPVS, ipip), again
# where the kernel has them.
modules+=(tests/host/test_cli_on_this_kernel.py tests/host/test_real_server_namespaces.py)
claims=$PWD/build/kernel-claims
rm -rf "$claims" build/uml-[ab] build/uml-[ab]-[0-9] && mkdir -p "$claims"
collected=$(.venv/bin/python -m pytest -p no:cacheprovider -p no:hypothesispytest -q --collect-only \
    -m "kernel or host" "${modules[@]}" 2>&1) || { echo "$collected" >&2; echo "== the kernel tier does not collect" >&2; exit 1; }
expected=$(echo "$collected" | grep '::' | sort -u)
timed() {  # timed NAME LOG COMMAND...: run it into LOG, then print LOG and how it went
    local name=$1 log=$2 started=$SECONDS rc=0
    shift 2
    echo "== $name: started (its output follows when it ends)"
    "$@" > "$log" 2>&1 || rc=$?
    {
        echo "== $name"
        cat "$log"
        echo "-- $name: exit $rc after $((SECONDS - started)) s"
    } | flock build/.kernel-tier-print cat
    return "$rc"
}
# -rP: the passed tests' output too (the storm prints its pass counts).
UML_RUN=uml-a UML_CPU=0 DOCKERLB_CLAIMS=$claims timed "UML guest A (CPU 0)" build/kernel-a.log \
    bash tests/kernel/run-vm.sh --durations=0 --durations-min=5 -rP "${modules[@]}" &
guest_a=$!
(
    rc=0
    timed "TCG smoke: Debian's own kernel (CPU 1)" build/kernel-tcg.log \
        env IPVS_VM_CPUS=1 IPVS_VM_TIMEOUT=2400 taskset -c 1 bash tests/kernel/run-tcg.sh || rc=1
    UML_RUN=uml-b UML_CPU=1 DOCKERLB_CLAIMS=$claims timed "UML guest B (CPU 1)" build/kernel-b.log \
        bash tests/kernel/run-vm.sh --durations=0 --durations-min=5 -rP "${modules[@]}" || rc=1
    exit "$rc"
) &
guest_b=$!
# Interrupted, the guests (each under `timeout`, in its own process group)
# would keep both CPUs: end them (UML kernels by their dlb_out=, the TCG
# guest's qemu by its build/vm) with this script.
stop_guests() {
    pkill -KILL -f "dlb_out=$PWD/build/uml-[ab]" 2> /dev/null || true
    pkill -KILL -f "qemu-system.*path=$PWD/build/vm" 2> /dev/null || true
    exit 130
}
trap stop_guests INT TERM
rc=0
wait "$guest_a" || rc=1
wait "$guest_b" || rc=1
# (A guest that was never rerun has no uml-a-2: cat's failure is no error.)
finished=$( { cat build/uml-[ab]/progress build/uml-[ab]-[0-9]/progress 2> /dev/null || true; } \
    | cut -d' ' -f2- | sort -u)
unrun=$(comm -23 <(echo "$expected") <(echo "$finished"))
if [ -n "$unrun" ]; then
    echo "== $(echo "$unrun" | wc -l) of $(echo "$expected" | wc -l) tests finished in neither guest:" >&2
    echo "$unrun" | sed 's/^/  /' >&2
    rc=1
else
    echo "== all $(echo "$expected" | wc -l) kernel-tier tests finished in one guest or the other:" \
        "guest A ran $( (cat build/uml-a*/progress 2> /dev/null || true) | wc -l)," \
        "guest B $( (cat build/uml-b*/progress 2> /dev/null || true) | wc -l)"
fi
exit "$rc"
