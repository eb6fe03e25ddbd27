#!/usr/bin/env bash
# Fetch OpenCV's vtest.avi (real pedestrians, fixed camera; 768x576, 795 frames) and tree.avi (a quiet
# scene; 68 pictures in 444 declared frames: the rest are empty "repeat" entries) into data/ from
# Debian's opencv-doc package, and check their sha256. Needs root for apt-get (as CI runs).
set -euo pipefail
cd "$(dirname "$0")/.."
declare -A sha=(
  [vtest.avi]=45cddc9490be69345cbdab64ca583be65987e864ca408038e648db99e10516cf
  [tree.avi]=4666099d0f704e310047b2f0a5ec9f936cb76a7271de9a2e70a0c57f82ac82dc
)
present() { echo "${sha[$1]}  data/$1" | sha256sum -c --quiet >/dev/null 2>&1; }
if present vtest.avi && present tree.avi; then
  echo "data/vtest.avi and data/tree.avi present"; exit 0
fi
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
apt-get update -qq
(cd "$work" && apt-get download -qq opencv-doc 2>/dev/null && \
  dpkg-deb --fsys-tarfile opencv-doc_*_all.deb | tar -x ./usr/share/doc/opencv-doc/examples/data/vtest.avi ./usr/share/doc/opencv-doc/examples/data/tree.avi)
mkdir -p data
for name in vtest.avi tree.avi; do
  mv "$work/usr/share/doc/opencv-doc/examples/data/$name" "data/$name"
  present "$name" || { echo "data/$name: sha256 mismatch" >&2; exit 1; }
  echo "fetched data/$name"
done
