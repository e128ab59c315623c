#!/usr/bin/env bash
# Kernel tier, smoke on Debian's own kernel: what dockerlb asks of a kernel,
# in the virtme-ng guest under TCG (scripts/tcg-vm.sh), so the distribution's
# kernel stays proven beside the UML kernel the rest of the tier runs on. By
# default tests/kernel/test_adapters.py: IPVS over netlink (round trips, the
# learned reply offsets, /proc/net/ip_vs against netlink, batches, errors,
# IPv6 and UDP, timeouts), the director's dummy interface, VIPs and sysctls
# in a bare namespace. Traffic through IPVS is the same 6.1 code in UML,
# where every traffic test runs. Until stop 38 the smoke was the seed lab's
# first test (167 s of emulation under pytest, 292 s in all, on the CPU
# guest B waits for); this module then took 51 s under pytest, 176 s in all
# (bench/results/clean-clone-20261207T1552.txt), most of the rest the
# guest's containerd and dockerd starting, which it does not need: without
# them, 17 s under pytest, 72 s in all (bench/results/tcg-smoke-20261207.txt).
#   usage: tests/kernel/run-tcg.sh [pytest args...]   (default: that module)
set -euo pipefail
cd "$(dirname "$0")/../.."
args=("$@")
# That module asks nothing of Docker, so the guest starts no dockerd: under
# emulation containerd's and dockerd's start was most of the boot.
if [ ${#args[@]} -eq 0 ]; then
    args=(tests/kernel/test_adapters.py)
    export IPVS_VM_DOCKERD=0
fi
# The repository is read-only in this guest: no cache, no hypothesis database.
exec bash scripts/tcg-vm.sh .venv/bin/python -m pytest -p no:cacheprovider -p no:hypothesispytest \
    --timeout 900 -m kernel "${args[@]}"
