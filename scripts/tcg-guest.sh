#!/usr/bin/env bash
# Inside the TCG guest (see tcg-vm.sh): dockerd on a tmpfs, IPVS modules,
# then the command. Writes guest.log and rc into $2.
root=$1
out=$2
exec > "$out/guest.log" 2>&1
trap 'dmesg > "$out/dmesg.log" 2>&1' EXIT  # the guest kernel's view of any stall
echo "guest kernel: $(uname -r)"
mount -t tmpfs tmpfs /var/lib/docker 2>/dev/null || { mkdir -p /var/lib/docker && mount -t tmpfs tmpfs /var/lib/docker; }
mkdir -p /run/netns
# The Python trees as images (see tcg-vm.sh): mounted over their own paths.
modprobe loop; modprobe ext4
while read -r img dir; do mount -o loop,ro "$img" "$dir"; done < "$root/build/vm-images/mounts"
# ipip: every namespace gets a tunl0, which TUN real servers receive on.
for m in ip_vs ip_vs_rr ip_vs_wrr ip_vs_wlc ip_vs_sh nf_conntrack dummy ipip; do modprobe "$m"; done
# Without dockerd when tcg-vm.sh was asked so (IPVS_VM_DOCKERD=0).
if [ ! -e "$out/no-dockerd" ]; then
    # shellcheck source=scripts/guest-dockerd.sh
    . "$root/scripts/guest-dockerd.sh"
    # containerd first, waited for as long as it takes (up to 10 minutes): left
    # to dockerd, its start is given a fixed time, which an emulated guest on
    # one host CPU overran (emulated 9p I/O reading the binaries).
    containerd > "$out/containerd.log" 2>&1 &
    containerd_pid=$!
    for _ in $(seq 1 600); do
        ctr --address /run/containerd/containerd.sock version > /dev/null 2>&1 && break
        kill -0 "$containerd_pid" 2> /dev/null || { echo "containerd exited:"; tail -20 "$out/containerd.log"; break; }
        sleep 1
    done
    # 97: the guest itself failed; tcg-vm.sh boots once more for that, never
    # for a failing command.
    DOCKERD_WAIT=600 start_dockerd "$out" --containerd /run/containerd/containerd.sock \
        || { echo 97 > "$out/rc"; exit 1; }
    echo "dockerd $(docker version --format '{{.Server.Version}}') is up"
fi
cd "$root"
# The repository is read-only in the guest: no bytecode, caches go to $out.
export PYTHONDONTWRITEBYTECODE=1 DOCKERLB_TEST_OUT="$out" DOCKERLB_KERNEL=tcg
eval "command=($(cat "$out/command"))"
"${command[@]}"
echo $? > "$out/rc"
