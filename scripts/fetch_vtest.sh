#!/usr/bin/env bash
# Fetch OpenCV's vtest.avi (real pedestrians, fixed camera; 768x576, 795 frames) into data/vtest.avi
# from Debian's opencv-doc package, and check its sha256. Needs root for apt-get (as CI runs).
set -euo pipefail
cd "$(dirname "$0")/.."
target=data/vtest.avi
sha=45cddc9490be69345cbdab64ca583be65987e864ca408038e648db99e10516cf
if [ -f "$target" ] && echo "$sha  $target" | sha256sum -c --quiet 2>/dev/null; then
  echo "$target present"; exit 0
fi
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
apt-get update -qq
(cd "$work" && apt-get download -qq opencv-doc 2>/dev/null && \
  dpkg-deb --fsys-tarfile opencv-doc_*_all.deb | tar -x ./usr/share/doc/opencv-doc/examples/data/vtest.avi)
mkdir -p data
mv "$work/usr/share/doc/opencv-doc/examples/data/vtest.avi" "$target"
echo "$sha  $target" | sha256sum -c --quiet
echo "fetched $target"
