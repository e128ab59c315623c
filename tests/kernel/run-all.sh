#!/usr/bin/env bash
# The whole kernel tier, as CI runs it: on this 2-CPU machine, two UML
# guests side by side, one pinned to each CPU (tests/kernel/run-vm.sh), and
# the TCG smoke (tests/kernel/run-tcg.sh, one emulated CPU) on the second
# CPU once its guest is done. Guest A takes the lifecycle module (the
# 200-container storm alone is ~1,100 s of it) and the director pair's
# (~400 s), guest B the rest (test_bgp.py, issue 30, among them), so both
# CPUs finish near the same time (measured side by side at stop 23:
# lifecycle 1,280 s; the rest 940 s, then the TCG smoke 390 s; the pair's
# module alone 383 s at stop 24).
# Guest B also takes test_field.py (thresholds, SCTP, drains, doctor --probe).
# Each part's output is printed whole when it ends, with its time; the
# exit code is 0 only if all three passed.
#   usage: tests/kernel/run-all.sh
set -euo pipefail
cd "$(dirname "$0")/../.."
mkdir -p build
a=(tests/kernel/test_lifecycle.py tests/kernel/test_ha_pair.py tests/kernel/test_swarm.py)
b=(tests/kernel --ignore tests/kernel/test_lifecycle.py --ignore tests/kernel/test_ha_pair.py
    --ignore tests/kernel/test_swarm.py
    tests/host/test_cli_on_this_kernel.py tests/host/test_real_server_namespaces.py)
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
UML_RUN=uml-a UML_CPU=0 timed "UML guest A (CPU 0)" build/kernel-a.log \
    bash tests/kernel/run-vm.sh --durations=10 -rP "${a[@]}" &
guest_a=$!
(
    rc=0
    UML_RUN=uml-b UML_CPU=1 timed "UML guest B (CPU 1)" build/kernel-b.log \
        bash tests/kernel/run-vm.sh --durations=10 -rP "${b[@]}" || rc=1
    timed "TCG smoke: Debian's own kernel (CPU 1)" build/kernel-tcg.log \
        env IPVS_VM_CPUS=1 IPVS_VM_TIMEOUT=2400 taskset -c 1 bash tests/kernel/run-tcg.sh || rc=1
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
exit "$rc"
