#!/usr/bin/env bash
# Build (or reuse) an aarch64 Debian sysroot with python3 and the TVM *runtime* (no compiler library),
# for running ARM artifacts under qemu-user. ~90 s, ~400 MB; cached.
#
#   scripts/arm64-sysroot.sh [DIR]     DIR defaults to $BITCOMPILE_SYSROOT_ARM64 or
#                                      ~/.cache/bitcompile/sysroot-arm64
# Needs (Debian): debootstrap, unzip, and python3 -m pip on the host. Runs as root (debootstrap).
# No emulated second stage: every downloaded .deb is unpacked with dpkg-deb -x instead.
set -euo pipefail
DIR=${1:-${BITCOMPILE_SYSROOT_ARM64:-$HOME/.cache/bitcompile/sysroot-arm64}}
MIRROR=${DEBIAN_MIRROR:-http://deb.debian.org/debian}
# The runtime wheels: what a device installs (requirements-device.txt), + tvm-ffi's typing_extensions.
REQUIREMENTS="$(cd "$(dirname "$0")/.." && pwd)/requirements-device.txt"
STAMP="$DIR/.bitcompile-sysroot"
WANT="v1 $(sha256sum < "$REQUIREMENTS" | cut -c1-16)"

if [[ -f $STAMP && $(cat "$STAMP") == "$WANT" ]]; then
    echo "sysroot ready: $DIR"
    exit 0
fi
for tool in debootstrap dpkg-deb unzip; do
    command -v $tool >/dev/null || { echo "error: $tool is missing; apt-get install debootstrap unzip" >&2; exit 1; }
done
if [[ -d $DIR && ! -f $STAMP && -n $(ls -A "$DIR") ]]; then
    echo "error: $DIR exists and is not a bitcompile sysroot; remove it or choose another directory" >&2
    exit 1
fi
FINAL=$DIR
DIR="$FINAL.partial"  # built aside, moved into place when complete
rm -rf "$DIR"
mkdir -p "$DIR"
echo "debootstrap (download only) -> $DIR"
debootstrap --arch=arm64 --foreign --variant=minbase --include=python3 bookworm "$DIR" "$MIRROR" >/dev/null
for deb in "$DIR"/var/cache/apt/archives/*.deb; do
    dpkg-deb -x "$deb" "$DIR"
done
rm -rf "$DIR"/var/cache/apt/archives/*.deb "$DIR/debootstrap"
echo "runtime wheels -> $DIR/opt/site"
mkdir -p "$DIR/opt/site" "$DIR/opt/wheels"
python3 -m pip download -q --only-binary=:all: --platform manylinux_2_28_aarch64 --platform manylinux2014_aarch64 --python-version 3.11 \
    --implementation cp --no-deps -d "$DIR/opt/wheels" -r "$REQUIREMENTS" typing_extensions
for whl in "$DIR"/opt/wheels/*.whl; do
    unzip -q -o "$whl" -d "$DIR/opt/site"
done
rm -rf "$DIR/opt/wheels"
find "$DIR/opt/site" -name 'libtvm_compiler*.so' -delete  # runtime only, as on a device
echo "$WANT" > "$DIR/.bitcompile-sysroot"
rm -rf "$FINAL"
mv "$DIR" "$FINAL"
echo "sysroot ready: $FINAL ($(du -sh "$FINAL" | cut -f1))"
