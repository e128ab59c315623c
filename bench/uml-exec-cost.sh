#!/bin/bash
# Inside a UML guest (bench/uml-kernels.sh runs it in two kernels side by side):
# what an exec and a container start cost there. Each figure: the mean of N runs,
# wall seconds; last, the guest kernel's page-fault counters.
cd "$(dirname "$0")/.."
t() { local n=$1; shift; local s e; s=$(date +%s.%N); for ((i = 0; i < n; i++)); do "$@" > /dev/null 2>&1; done; e=$(date +%s.%N); printf '%-50s %.3f s\n' "$*" "$(echo "($e - $s) / $n" | bc -l)"; }
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
s=$(date +%s.%N)
for i in 1 2 3 4 5 6; do docker run -d --init --network m --name c$i mini sleep 1000 > /dev/null; done
e=$(date +%s.%N); printf '%-50s %.3f s\n' "docker run -d on a user-defined network" "$(echo "($e - $s) / 6" | bc -l)"
s=$(date +%s.%N)
for i in 1 2 3 4 5 6; do docker rm -f c$i > /dev/null; done
e=$(date +%s.%N); printf '%-50s %.3f s\n' "docker rm -f" "$(echo "($e - $s) / 6" | bc -l)"
s=$(date +%s.%N)
for i in 1 2 3 4 5 6; do docker run -d --init --name d$i mini sleep 1000 > /dev/null; done
e=$(date +%s.%N); printf '%-50s %.3f s\n' "docker run -d on the default bridge" "$(echo "($e - $s) / 6" | bc -l)"
grep -E 'pgfault|pgmajfault' /proc/vmstat
