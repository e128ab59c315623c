#!/usr/bin/env bash
# Run a command in a guest that has IPVS: Debian's kernel booted by virtme-ng
# under TCG emulation (nested KVM hangs on these machines), with dockerd and
# the IPVS modules started first. The guest sees the host's files, so the
# project's .venv is used as is; output and exit code come back through
# --rwdir (the guest's stdout is not reliably passed back).
#   usage: scripts/ipvs-vm.sh COMMAND [ARGS...]    (run from the repo root)
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
out="$root/build/vm"
rm -rf "$out" && mkdir -p "$out"
kernel=$(ls /boot/vmlinuz-*-amd64 2>/dev/null | sort -V | tail -n 1)
[ -n "$kernel" ] || { echo "no /boot/vmlinuz-*-amd64: apt-get install linux-image-amd64" >&2; exit 1; }
printf '%q ' "$@" > "$out/command"
export PATH="$root/.venv/bin:$PATH"  # vng calls virtme-run by name
for boot in 1 2; do
    rm -f "$out/rc"
    set +e
    timeout "${IPVS_VM_TIMEOUT:-2400}" vng --disable-kvm --run "$kernel" --user root \
        --memory "${IPVS_VM_MEMORY:-4G}" --cpus 2 --rwdir "$out" \
        --exec "bash $root/scripts/vm-guest.sh $root $out" > "$out/vng.log" 2>&1
    vng_rc=$?
    set -e
    cat "$out/guest.log" 2>/dev/null || { echo "the guest wrote no log; vng said:"; cat "$out/vng.log"; }
    [ -f "$out/rc" ] || { echo "the IPVS guest did not finish (vng exit $vng_rc)" >&2; exit 1; }
    [ "$(cat "$out/rc")" = 97 ] && [ "$boot" = 1 ] && { echo "the guest failed to start dockerd: booting once more"; continue; }
    break
done
exit "$(cat "$out/rc")"
