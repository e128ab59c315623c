#!/usr/bin/env bash
# Build the dockerlb image offline, as CI does: no image registry is
# reachable, so the base is Debian bookworm made by debootstrap (python3,
# venv, nftables, util-linux) and imported into Docker; dockerlb and its
# dependencies come from wheels built here. Saves the image to
# build/images/dockerlb.tar for the IPVS guest.
#   usage: scripts/build-image.sh [TAG]   (default dockerlb:test)
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
tag=${1:-dockerlb:test}
base=dockerlb-base:bookworm-lean
cd "$root"
# debian_base NAME LOG PACKAGES [docker import options...]: a minbase
# bookworm with PACKAGES, made by debootstrap and imported as NAME, once.
debian_base() {
    local name=$1 log=$2 packages=$3 rootfs
    shift 3
    docker image inspect "$name" > /dev/null 2>&1 && return 0
    rootfs=$(mktemp -d /var/tmp/dockerlb-base.XXXXXX)
    echo "debootstrap: $name"
    debootstrap --variant=minbase --include="$packages" bookworm "$rootfs" > "$log" 2>&1 \
        || { tail -20 "$log"; exit 1; }
    rm -rf "$rootfs"/var/cache/apt/archives/*.deb "$rootfs"/var/lib/apt/lists/*
    # As debian:bookworm-slim has it: no manuals, translations or documents
    # but the copyright files. A quarter of keepalived's image was these, and
    # every kernel-tier guest loads the images: docker load costs per byte.
    find "$rootfs/usr/share/doc" -type f ! -name copyright -delete
    rm -rf "$rootfs"/usr/share/man/* "$rootfs"/usr/share/info/* "$rootfs"/usr/share/locale/*
    tar -C "$rootfs" -c . | docker import "$@" - "$name" > /dev/null
    rm -rf "$rootfs"
}
debian_base "$base" build/debootstrap.log python3,python3-venv,nftables,util-linux --change 'CMD ["python3"]'
rm -rf dist
.venv/bin/pip wheel -q -w dist .
docker build -q --build-arg BASE="$base" -t "$tag" . > /dev/null
mkdir -p build/images
docker save -o build/images/dockerlb.tar "$tag"
# keepalived for a director pair (compose/ha), on its own debootstrap'd base.
ka_base=dockerlb-keepalived-base:bookworm-lean
debian_base "$ka_base" build/debootstrap-keepalived.log keepalived,iproute2
docker build -q --build-arg BASE="$ka_base" -t dockerlb-keepalived:test compose/ha/keepalived > /dev/null
docker save -o build/images/keepalived.tar dockerlb-keepalived:test
# HAProxy as a read-only Docker API (compose/socket-proxy), on its own
# base: the host tier checks it (no guest needs it).
proxy_base=dockerlb-socket-proxy-base:bookworm-lean
debian_base "$proxy_base" build/debootstrap-socket-proxy.log haproxy
docker build -q --build-arg BASE="$proxy_base" -t dockerlb-socket-proxy:test compose/socket-proxy > /dev/null
# BIRD 2 as the BGP speaker beside a director (compose/bgp), on its own base.
bird_base=dockerlb-bird-base:bookworm-lean
debian_base "$bird_base" build/debootstrap-bird.log bird2,iproute2
docker build -q --build-arg BASE="$bird_base" -t dockerlb-bird:test compose/bgp/bird > /dev/null
docker save -o build/images/bird.tar dockerlb-bird:test
# The tests' FROM-scratch busybox image, saved too: the guests load it.
busybox=$(.venv/bin/python -c 'import docker; from harness.dockerlab import busybox_image; print(busybox_image(docker.from_env()))')
docker save -o build/images/busybox.tar "$busybox"
echo "built $tag: $(docker image inspect -f '{{.Size}}' "$tag" | awk '{printf "%.0f MB", $1/1e6}') (base $(docker image inspect -f '{{.Size}}' "$base" | awk '{printf "%.0f MB", $1/1e6}'))"
