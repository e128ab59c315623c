#!/bin/bash
# Inside a UML guest (bench/uml-kernels.sh runs it in two kernels side by side):
# what an exec and a container start cost there. Each figure: the mean of N runs,
# wall seconds; last, the guest kernel's page-fault counters.
cd "$(dirname "$0")/.."
each() {  # each LABEL N COMMAND...: COMMAND N times ($i counts them from 1), the mean wall time
    local label=$1 n=$2 s e
    shift 2
    s=$(date +%s.%N)
    for ((i = 1; i <= n; i++)); do "$@" > /dev/null; done
    e=$(date +%s.%N)
    printf '%-50s %.3f s\n' "$label" "$(echo "($e - $s) / $n" | bc -l)"
}
t() { local n=$1; shift; each "$*" "$n" "$@" 2> /dev/null; }
t 20 /bin/true
t 10 dockerd --version
t 10 runc --version
t 10 containerd-shim-runc-v2 -v
t 10 iptables -S
t 10 docker version
t 5 python3 -c pass
t 5 .venv/bin/python -c "import docker"
t 3 .venv/bin/python -m dockerlb --help
mkdir -p /tmp/mini/bin && cp /bin/busybox /tmp/mini/bin/ && ln -sf busybox /tmp/mini/bin/sh && ln -sf busybox /tmp/mini/bin/sleep
tar -C /tmp/mini -c . | docker import - mini > /dev/null
docker network create m > /dev/null
on_network() { docker run -d --init --network m --name "c$i" mini sleep 1000; }
removed() { docker rm -f "c$i"; }
on_bridge() { docker run -d --init --name "d$i" mini sleep 1000; }
each "docker run -d on a user-defined network" 6 on_network
each "docker rm -f" 6 removed
each "docker run -d on the default bridge" 6 on_bridge
grep -E 'pgfault|pgmajfault' /proc/vmstat
