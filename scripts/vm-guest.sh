#!/usr/bin/env bash
# Inside the IPVS guest (see ipvs-vm.sh): dockerd on a tmpfs, IPVS modules,
# then the command. Writes guest.log and rc into $2.
root=$1
out=$2
exec > "$out/guest.log" 2>&1
trap 'dmesg > "$out/dmesg.log" 2>&1' EXIT  # the guest kernel's view of any stall
echo "guest kernel: $(uname -r)"
mount -t tmpfs tmpfs /var/lib/docker 2>/dev/null || { mkdir -p /var/lib/docker && mount -t tmpfs tmpfs /var/lib/docker; }
mkdir -p /run/netns
# The Python trees as images (see ipvs-vm.sh): mounted over their own paths.
modprobe loop; modprobe ext4
while read -r img dir; do mount -o loop,ro "$img" "$dir"; done < "$root/build/vm-images/mounts"
# ipip: every namespace gets a tunl0, which TUN real servers receive on.
for m in ip_vs ip_vs_rr ip_vs_wrr ip_vs_wlc ip_vs_sh nf_conntrack dummy ipip; do modprobe "$m"; done
dockerd --data-root /var/lib/docker > "$out/dockerd.log" 2>&1 &
dockerd_pid=$!
# Stop waiting as soon as dockerd has given up (it exits when containerd
# does not start): the boot once more comes minutes sooner.
for _ in $(seq 1 120); do
    docker info > /dev/null 2>&1 && break
    kill -0 "$dockerd_pid" 2> /dev/null || break
    sleep 1
done
# 97: the guest itself failed (seen: emulated 9p I/O stalling containerd's
# start); ipvs-vm.sh boots once more for that, never for a failing command.
docker info > /dev/null 2>&1 || { echo "dockerd did not start"; tail -30 "$out/dockerd.log"; echo 97 > "$out/rc"; exit 1; }
echo "dockerd $(docker version --format '{{.Server.Version}}') is up"
cd "$root"
# The repository is read-only in the guest: no bytecode, caches go to $out.
export PYTHONDONTWRITEBYTECODE=1 DOCKERLB_TEST_OUT="$out"
eval "command=($(cat "$out/command"))"
"${command[@]}"
echo $? > "$out/rc"
