#!/usr/bin/env bash
# Kernel tier: boot Debian's kernel (which has IPVS) with virtme-ng under TCG
# emulation (nested KVM hangs on these machines), start dockerd inside the
# guest and run `pytest -m kernel` there. The guest sees the host's files, so
# the project's venv is used as is; results come back through --rwdir.
#   usage: tests/kernel/run-vm.sh [pytest args...]
set -euo pipefail
root=$(cd "$(dirname "$0")/../.." && pwd)
out="$root/build/kernel"
rm -rf "$out" && mkdir -p "$out"
kernel=$(ls /boot/vmlinuz-*-amd64 2>/dev/null | sort -V | tail -n 1)
[ -n "$kernel" ] || { echo "no /boot/vmlinuz-*-amd64: apt-get install linux-image-amd64" >&2; exit 1; }
printf '%q ' "$@" > "$out/args"
# vng calls virtme-run by name: the venv's bin must be on PATH.
export PATH="$root/.venv/bin:$PATH"
set +e
timeout "${KERNEL_TIER_TIMEOUT:-2400}" vng --disable-kvm --run "$kernel" --user root \
    --memory "${KERNEL_TIER_MEMORY:-4G}" --cpus 2 --rwdir "$out" \
    --exec "bash $root/tests/kernel/guest.sh $root $out" > "$out/vng.log" 2>&1
vng_rc=$?
set -e
cat "$out/guest.log" 2>/dev/null || { echo "guest wrote no log; vng said:"; cat "$out/vng.log"; }
if [ ! -f "$out/rc" ]; then
    echo "kernel tier: the guest did not finish (vng exit $vng_rc)" >&2
    exit 1
fi
exit "$(cat "$out/rc")"
