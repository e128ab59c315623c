#!/bin/bash
# PID 1 of the UML guest (see uml-vm.sh). The root file system is the host's
# own /, read-write: everything the guest writes for itself goes on tmpfs,
# so two dockerd (host and guest) never share a data root or a socket.
export PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin HOME=/root LANG=C.UTF-8
root=$(cd "$(dirname "$0")/.." && pwd)
out=${dlb_out:-$root/build/uml-run}  # uml-vm.sh says where, on the kernel command line
finish() {
    sync
    poweroff -f 2> /dev/null
    echo o > /proc/sysrq-trigger  # if poweroff could not
    sleep 60
}
exec > "$out/guest.log" 2>&1
# shellcheck disable=SC1091
. "$out/env"  # what uml-vm.sh passed on
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t cgroup2 cgroup2 /sys/fs/cgroup
mountpoint -q /dev || mount -t devtmpfs devtmpfs /dev  # the kernel may have done it
mkdir -p /dev/pts /dev/shm
mount -t devpts devpts /dev/pts -o newinstance,ptmxmode=0666 && ln -sf pts/ptmx /dev/ptmx
mount -t tmpfs tmpfs /dev/shm
mount -t tmpfs tmpfs /run
mount -t tmpfs tmpfs /var/lib/docker
# /tmp too, unless the repository itself lives there (a clone in /tmp).
case "$root/" in /tmp/*) mkdir -p /run/tmp && export TMPDIR=/run/tmp ;; *) mount -t tmpfs tmpfs /tmp ;; esac
mkdir -p /run/netns /var/run
hostname uml-guest
ip link set lo up
# The host's watchdog (uml-vm.sh) reads the heartbeat: a guest that stops
# writing it has stalled. Asked (a dump-request file), the loop also records
# what every task is doing, and the kernel prints its blocked tasks' stacks
# on the console (sysrq w), before the watchdog ends the guest.
heartbeat() {
    while :; do
        date +%s > "$out/heartbeat"
        if [ -e "$out/dump-request" ]; then
            rm -f "$out/dump-request"
            { echo "== guest tasks at $(date -u +%T)"; ps -eo pid,ppid,stat,wchan:32,etime,time,args; } >> "$out/guest-tasks.txt" 2>&1
            echo w > /proc/sysrq-trigger
        fi
        sleep 10
    done
}
heartbeat &
echo "guest kernel: $(uname -r) (User-Mode Linux), $(nproc) cpu, $(awk '/MemTotal/ {print $2 / 1024 " MB"}' /proc/meminfo)"
# UML_DOCKERD_ARGS: extra dockerd options (e.g. a --add-runtime to compare).
# shellcheck source=scripts/guest-dockerd.sh
. "$root/scripts/guest-dockerd.sh"
# shellcheck disable=SC2086
if ! start_dockerd "$out" ${UML_DOCKERD_ARGS:-}; then
    echo 97 > "$out/rc"
    finish
fi
echo "dockerd $(docker version --format '{{.Server.Version}}') is up after ${SECONDS} s"
cd "$root"
export PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1 DOCKERLB_TEST_OUT="$out" DOCKERLB_KERNEL=uml DOCKERLB_PROGRESS="$out/progress"
eval "command=($(cat "$out/command"))"
rc=0
"${command[@]}" || rc=$?
# Where the guest's time went (USER_HZ ticks): a guest idle for much of its
# run waits on timers, not on its one CPU.
read -r _ user nice system idle iowait irq softirq _ < /proc/stat
echo "guest CPU over the run: busy $(( (user + nice + system + irq + softirq) / 100 )) s, idle $(( (idle + iowait) / 100 )) s"
echo "$rc" > "$out/rc"
kill "$dockerd_pid" 2> /dev/null && wait "$dockerd_pid"
finish
