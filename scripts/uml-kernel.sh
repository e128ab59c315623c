#!/usr/bin/env bash
# Build the User-Mode Linux kernel the kernel tier boots: Debian's
# linux-source-6.1 with scripts/uml/config-fragment, all built in, and the
# fixes in scripts/uml/patches/ (each says what and why). Cached under
# build/uml/KEY/linux, KEY from the fragment, the patches and the source
# package's version: rebuilt only when one changes. Prints the kernel's path last.
#   usage: scripts/uml-kernel.sh [--cached]   (as root on Debian 12; installs what it needs)
#   --cached: print the kernel's path if it is built, else exit 1; never build.
#   --packages: install what the build needs, then stop (so that a build run
#               in the background never holds the package lock)
set -euo pipefail
cached_only=${1:-}
root=$(cd "$(dirname "$0")/.." && pwd)
fragment="$root/scripts/uml/config-fragment"
packages=(linux-source-6.1 bc flex bison xz-utils make gcc libc6-dev patch)
if [ "$cached_only" = --cached ]; then
    dpkg -s linux-source-6.1 > /dev/null 2>&1 || exit 1
fi
missing=()
for p in "${packages[@]}"; do dpkg -s "$p" > /dev/null 2>&1 || missing+=("$p"); done
if [ ${#missing[@]} -gt 0 ]; then
    echo "installing: ${missing[*]}" >&2
    apt-get update -q >&2
    DEBIAN_FRONTEND=noninteractive apt-get install -y -q "${missing[@]}" >&2
fi
[ "$cached_only" != --packages ] || exit 0
version=$(dpkg-query -W -f '${Version}' linux-source-6.1)
shopt -s nullglob
patches=("$root"/scripts/uml/patches/*.patch)  # applied in name order
shopt -u nullglob
key=$( { echo "linux-source-6.1 $version"; cat "$fragment" "${patches[@]}"; } | sha256sum | cut -c1-16)
out="$root/build/uml/$key"
# One build at a time: a second caller waits for the first and reuses it.
mkdir -p "$root/build/uml"
exec 9> "$root/build/uml/.lock"
flock 9
if [ -x "$out/linux" ]; then
    echo "$out/linux"
    exit 0
fi
[ "$cached_only" != --cached ] || exit 1
started=$(date +%s)
echo "building the UML kernel (linux-source-6.1 $version, key $key): a few minutes" >&2
work="$root/build/uml/src-$key"
rm -rf "$work" && mkdir -p "$work"
tar -C "$work" -xf /usr/src/linux-source-6.1.tar.xz --strip-components=1
for p in "${patches[@]}"; do
    patch -s -d "$work" -p1 < "$p" || { echo "the patch $p does not apply" >&2; exit 1; }
done
options=$(grep -v '^#' "$fragment" | tr -s ' \n' '\n' | grep -v '^$')
(
    cd "$work"
    make -s ARCH=um defconfig > /dev/null
    for o in $options; do
        case $o in -*) scripts/config --disable "${o#-}" ;; *) scripts/config --enable "$o" ;; esac
    done
    make -s ARCH=um olddefconfig > /dev/null
    # An option olddefconfig dropped (a missing dependency) or brought back
    # (another option selects it) would make a test fail obscurely, or the
    # build slow, later: name it now.
    lost=()
    for o in $options; do
        case $o in
            -*) ! grep -q "^CONFIG_${o#-}=" .config || lost+=("$o") ;;
            *) grep -qx "CONFIG_$o=y" .config || lost+=("$o") ;;
        esac
    done
    [ ${#lost[@]} -eq 0 ] || { echo "not as the fragment says after olddefconfig: ${lost[*]}" >&2; exit 1; }
    make -s ARCH=um -j"$(nproc)" linux > "$root/build/uml/build-$key.log" 2>&1 \
        || { tail -30 "$root/build/uml/build-$key.log" >&2; exit 1; }
)
mkdir -p "$out"
cp "$work/linux" "$out/linux.tmp" && cp "$work/.config" "$out/config"
mv "$out/linux.tmp" "$out/linux"
rm -rf "$work"
echo "built the UML kernel in $(( $(date +%s) - started )) s" >&2
echo "$out/linux"
