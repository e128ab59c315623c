#!/usr/bin/env bash
# Two UML kernel builds side by side: bench/uml-exec-cost.sh in one guest of
# each at once, one per CPU, the CPUs swapped every round so neither kernel
# keeps the quieter one. Writes bench/results/uml-kernels-TIMESTAMP.txt with
# the commit, whether the tree was clean, and every round's figures.
#   usage: bench/uml-kernels.sh KERNEL_A KERNEL_B [ROUNDS (default 3)]
#   (a kernel: a `linux` binary built by scripts/uml-kernel.sh, e.g. an older
#   one under build/uml/KEY/linux)
set -euo pipefail
cd "$(dirname "$0")/.."
a=$1 b=$2 rounds=${3:-3}
out="bench/results/uml-kernels-$(date -u +%Y%m%dT%H%M%S).txt"
{
    echo "# bench/uml-exec-cost.sh in two UML kernels side by side, $rounds rounds, CPUs swapped each round"
    echo "command: bench/uml-kernels.sh $a $b $rounds"
    echo "commit: $(git rev-parse HEAD) ($([ -z "$(git status --porcelain)" ] && echo clean || echo dirty) tree)"
    echo "A: $a"
    echo "B: $b"
} > "$out"
for ((r = 1; r <= rounds; r++)); do
    if ((r % 2)); then cpu_a=0 cpu_b=1; else cpu_a=1 cpu_b=0; fi
    UML_KERNEL=$a UML_RUN=cost-a UML_CPU=$cpu_a bash scripts/uml-vm.sh bash bench/uml-exec-cost.sh > build/cost-a.txt 2>&1 &
    pid_a=$!
    UML_KERNEL=$b UML_RUN=cost-b UML_CPU=$cpu_b bash scripts/uml-vm.sh bash bench/uml-exec-cost.sh > build/cost-b.txt 2>&1 &
    pid_b=$!
    wait "$pid_a" "$pid_b"
    { echo; echo "round $r: A on CPU $cpu_a"; cat build/cost-a.txt; echo "round $r: B on CPU $cpu_b"; cat build/cost-b.txt; } >> "$out"
done
echo "$out"
