#!/usr/bin/env bash
# Run a command in a guest that has IPVS: Debian's own kernel booted by
# virtme-ng under TCG emulation (nested KVM hangs on these machines), with
# dockerd and the IPVS modules started first. The kernel tier's default guest
# is UML (scripts/uml-vm.sh, far faster); this one keeps the distribution's
# kernel proven (tests/kernel/run-tcg.sh) and runs `scripts/lab` where no UML
# kernel is built. The guest sees the host's files, so the
# project's .venv is used as is; output and exit code come back through
# --rwdir (the guest's stdout is not reliably passed back).
#   usage: scripts/tcg-vm.sh COMMAND [ARGS...]    (run from the repo root)
#   IPVS_VM_MEMORY (default 4G), IPVS_VM_CPUS (default 2; 1 where the guest
#   is pinned to one host CPU), IPVS_VM_TIMEOUT seconds (default 4500),
#   IPVS_VM_DOCKERD (default 1; 0: no containerd or dockerd, for a command
#   that needs no container: their start is most of an emulated boot).
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
out="$root/build/vm"
rm -rf "$out" && mkdir -p "$out"
kernel=$(ls /boot/vmlinuz-*-amd64 2>/dev/null | sort -V | tail -n 1)
[ -n "$kernel" ] || { echo "no /boot/vmlinuz-*-amd64: apt-get install linux-image-amd64" >&2; exit 1; }
printf '%q ' "$@" > "$out/command"
[ "${IPVS_VM_DOCKERD:-1}" != 0 ] || : > "$out/no-dockerd"
# Python under TCG spends most of its start-up on 9p round trips, one per
# stat and open (importing dockerlb took 45 s, docker-compose 30 s). The
# trees Python reads go in as ext4 images, loop-mounted read-only over the
# same paths by tcg-guest.sh: one file over 9p, cached by the guest.
images="$root/build/vm-images"
rm -rf "$images" && mkdir -p "$images"
: > "$images/mounts"
add_image() {  # add_image DIR [EXCLUDED SUBDIR...]: DIR as it is now, in an image
    local dir=$1 name stage
    shift
    [ -d "$dir" ] || return 0
    name=$(echo "$dir" | tr / _)
    stage="$images/stage"
    rm -rf "$stage" && cp -al "$dir" "$stage" 2>/dev/null || cp -a "$dir" "$stage"
    for x in "$@"; do rm -rf "${stage:?}/$x"; done
    mkfs.ext4 -q -F -O ^has_journal -d "$stage" "$images/$name.img" "$(( $(du -sm "$stage" | cut -f1) * 3 / 2 + 16 ))M" > /dev/null
    rm -rf "$stage"
    echo "$images/$name.img $dir" >> "$images/mounts"
}
stdlib=$("$root/.venv/bin/python" -c 'import sys, sysconfig; print(sysconfig.get_paths(vars={"installed_base": sys.base_prefix, "base": sys.base_prefix})["stdlib"])')
add_image "$root/.venv"
add_image "$stdlib" test site-packages idlelib "config-3.11-x86_64-linux-gnu" tkinter turtledemo
add_image /usr/lib/python3/dist-packages  # docker-compose (Debian's python3)
add_image "/usr/lib/python$(python3 -c 'import sys; print("%d.%d" % sys.version_info[:2])')" test
export PATH="$root/.venv/bin:$PATH"  # vng calls virtme-run by name
for boot in 1 2; do
    rm -f "$out/rc"
    set +e
    timeout "${IPVS_VM_TIMEOUT:-4500}" vng --disable-kvm --run "$kernel" --user root \
        --memory "${IPVS_VM_MEMORY:-4G}" --cpus "${IPVS_VM_CPUS:-2}" --rwdir "$out" \
        --exec "bash $root/scripts/tcg-guest.sh $root $out" > "$out/vng.log" 2>&1
    vng_rc=$?
    set -e
    cat "$out/guest.log" 2>/dev/null || { echo "the guest wrote no log; vng said:"; cat "$out/vng.log"; }
    [ -f "$out/rc" ] || { echo "the IPVS guest did not finish (vng exit $vng_rc)" >&2; exit 1; }
    [ "$(cat "$out/rc")" = 97 ] && [ "$boot" = 1 ] && { echo "the guest failed to start dockerd: booting once more"; continue; }
    break
done
exit "$(cat "$out/rc")"
