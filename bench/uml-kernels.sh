#!/usr/bin/env bash
# Two UML kernel builds side by side: bench/uml-exec-cost.sh (or a kernel-tier
# module) in one guest of each at once, one per CPU, the CPUs swapped every
# round so neither kernel keeps the quieter one. Writes
# bench/results/uml-kernels-TIMESTAMP.txt with the commit, whether the tree
# was clean, and every round's figures (for a module: its wall time, pytest's
# summary and the guest's busy and idle CPU).
#   usage: bench/uml-kernels.sh KERNEL_A KERNEL_B [ROUNDS (default 3)] [MODULE]
#   (a kernel: a `linux` binary built by scripts/uml-kernel.sh, e.g. an older
#   one under build/uml/KEY/linux)
set -euo pipefail
cd "$(dirname "$0")/.."
a=$1 b=$2 rounds=${3:-3} module=${4:-}
what=(bash bench/uml-exec-cost.sh)
[ -z "$module" ] || what=(bash tests/kernel/run-vm.sh "$module")
# Whether the tree is clean, asked before the results file exists (it would count).
tree=$([ -z "$(git status --porcelain)" ] && echo clean || echo dirty)
out="bench/results/uml-kernels-$(date -u +%Y%m%dT%H%M%S).txt"
{
    echo "# ${what[*]} in two UML kernels side by side, $rounds rounds, CPUs swapped each round"
    echo "command: bench/uml-kernels.sh $a $b $rounds $module"
    echo "commit: $(git rev-parse HEAD) ($tree tree)"
    echo "A: $a"
    echo "B: $b"
} > "$out"
one() {  # one KERNEL RUN CPU LOG: the work in one guest, timed
    local started=$SECONDS
    UML_KERNEL=$1 UML_RUN=$2 UML_CPU=$3 "${what[@]}" > "$4" 2>&1 || true
    echo "wall $((SECONDS - started)) s" >> "$4"
}
summary() {  # the figures of a guest's log
    if [ -z "$module" ]; then cat "$1"; else grep -E "^=+ .*(passed|failed|error)|^guest CPU over|^wall " "$1" || true; fi
}
for ((r = 1; r <= rounds; r++)); do
    if ((r % 2)); then cpu_a=0 cpu_b=1; else cpu_a=1 cpu_b=0; fi
    one "$a" cost-a "$cpu_a" build/cost-a.txt &
    pid_a=$!
    one "$b" cost-b "$cpu_b" build/cost-b.txt &
    pid_b=$!
    wait "$pid_a" "$pid_b"
    { echo; echo "round $r: A on CPU $cpu_a"; summary build/cost-a.txt; echo "round $r: B on CPU $cpu_b"; summary build/cost-b.txt; } >> "$out"
done
echo "$out"
