#!/usr/bin/env bash
# Idempotent set-up for the tests and the lab, as root on Debian 12: the
# system packages, the project's venv (.venv) and a running dockerd.
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
packages=(docker.io docker-compose debootstrap qemu-system-x86 linux-image-amd64 ipvsadm keepalived bird2 busybox-static nftables iproute2
    util-linux procps)
missing=()
for p in "${packages[@]}"; do
    dpkg -s "$p" > /dev/null 2>&1 || missing+=("$p")
done
mkdir -p "$root/build"
log="$root/build/setup.log"  # what apt and pip print: hundreds of lines a newcomer need not read
if [ ${#missing[@]} -gt 0 ]; then
    echo "setup: installing ${missing[*]} (details in build/setup.log)"
    { apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install -y -q "${missing[@]}"; } > "$log" 2>&1 \
        || { tail -30 "$log" >&2; echo "setup: the install failed; build/setup.log has all of it" >&2; exit 1; }
fi
if [ ! -x "$root/.venv/bin/python" ]; then
    echo "setup: the project's venv (.venv)"
    python3 -m venv "$root/.venv"
    "$root/.venv/bin/pip" install -q --upgrade pip >> "$log" 2>&1
fi
# virtme-ng boots the IPVS kernel for the kernel tier.
# The build backend's warnings (an editable install) go to a log, not the
# first screen of `scripts/lab`; all of it is printed if the install fails.
"$root/.venv/bin/pip" install -q -e "$root[test]" virtme-ng > "$root/build/pip-install.log" 2>&1 \
    || { cat "$root/build/pip-install.log" >&2; exit 1; }
if ! docker info > /dev/null 2>&1; then
    echo "setup: starting dockerd"
    (dockerd > /var/log/dockerd-dockerlb.log 2>&1 &)
    for _ in $(seq 1 60); do docker info > /dev/null 2>&1 && break; sleep 1; done
    docker info > /dev/null 2>&1 || { tail -20 /var/log/dockerd-dockerlb.log; exit 1; }
fi
