#!/usr/bin/env bash
# The GPU check: what the CUDA path computes and how fast, in steps that each report, on a GPU machine
# that has torch but cannot install anything (no network; see docs/gpu-check.md).
#
#   bash scripts/gpu_check.sh --prepare     # here: build .gpu-bundle/, the packages that machine lacks (CPython 3.12)
#   bash scripts/gpu_check.sh [STEPS]       # there: install the bundle into a temp folder, run STEPS (default: a b c d e)
#   bash scripts/gpu_check.sh --rehearse    # here: the same steps, small, on this CPU, from a bundle for this Python
#                                           # (kept in build/gpu-rehearsal), with only the GPU image's packages and no network
#
# Steps, each under its own timeout, each run even if an earlier one failed, results under $OUT (or
# runs/gpu_check) as they come, at most 8 files:
#   a  CUDA vs CPU without Ray (scripts/check_cuda.py): embeddings, float64 statistics in slices, maps
#   b  the stats actor's loop on the GPU, R18-Rd100 and WR50-Rd550, batch sizes, update slices, dtypes
#   c  decoding frames/s in 1 and (cores - 1) processes on STC-sized video (scripts/bench_decode.py)
#   d  with Ray: the pipeline on CUDA vs the CPU (tests/test_gpu.py), then fit and score of STC-sized
#      footage in many clips (decoding on every core), marginal rates and the time for all 274,515 STC frames
#   e  live cameras: `watch` of STC-sized clips replayed at their rate, 5 frames/s each, scored on the GPU
#      (scripts/bench_watch.py): how many cameras one GPU and the machine's readers sustain, p99 under 1 s
set -uo pipefail
cd "$(dirname "$0")/.."
repo=$(pwd)
out=${OUT:-$repo/runs/gpu_check}
mkdir -p "$out"
export PYTHONUNBUFFERED=1
python=${GPU_CHECK_PYTHON:-python3}

case "${1:-}" in
  --prepare)
    exec "$python" scripts/gpu_bundle.py prepare --python 3.12 --out .gpu-bundle ;;
  --rehearse)
    began=$(date +%s)
    rehearsal=$repo/build/gpu-rehearsal  # its bundle is kept for the next rehearsal: delete it to build anew
    venv=${GPU_CHECK_VENV:-$repo/.venv}  # the project's venv: the image's packages are linked out of it
    version=$("$venv/bin/python" -c 'import sys; print("%d.%d" % sys.version_info[:2])')
    rm -rf "$rehearsal/out" "$rehearsal/ray"
    if [ ! -f "$rehearsal/bundle/bundle.json" ]; then
      "$venv/bin/python" scripts/gpu_bundle.py prepare --python "$version" --out "$rehearsal/bundle" || exit 1
    fi
    "$venv/bin/python" scripts/gpu_bundle.py image-env "$rehearsal/image" --venv "$venv" || exit 1
    # a new network namespace (no network but loopback), only the image's packages, small sizes: the CPU is slow
    unshare -n bash -c 'ip link set lo up && . "$1/image/env.sh" &&
      GPU_CHECK_SIZE=small GPU_CHECK_BUNDLE="$1/bundle" OUT="$1/out" RAY_TMPDIR="$1/ray" bash "$2"' - "$rehearsal" "$0"
    status=$?
    echo "rehearsal: exit $status after $(( $(date +%s) - began )) s; results in $rehearsal/out"
    exit $status ;;
esac

exec > >(tee "$out/gpu_check.log") 2>&1
steps=${*:-a b c d e}
bundle=${GPU_CHECK_BUNDLE:-$repo/.gpu-bundle}
site=$(mktemp -d /tmp/padim-site-XXXX)
failed=()

# run NAME LIMIT COMMAND...: one step under `timeout` (LIMIT seconds, times $slowness), its exit status
# noted, never stopping the check
run() {
  local name=$1 limit=$(( $2 * slowness )) began=$(date +%s)
  shift 2
  echo "== $name (limit ${limit} s): $*"
  timeout -k 10 "$limit" "$@"
  local status=$?
  echo "== $name: exit $status after $(( $(date +%s) - began )) s"
  [ "$status" -eq 0 ] || failed+=("$name")
}

echo "== install the bundle from $bundle into $site (no network)"
"$python" scripts/gpu_bundle.py install "$bundle" "$site" || { echo "bundle install failed"; exit 1; }
. "$site/env.sh"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>/dev/null || echo "nvidia-smi: none"
cpus=$(nproc)

slowness=1
if [ "${GPU_CHECK_SIZE:-full}" = small ]; then  # the rehearsal on a CPU machine: every step, small, on a slow CPU
  slowness=5
  device=cpu check=(--image-size 64 --frames 4) profile=(--batch-size 4 --batches 1 --update-mib 4 --image-size 64) wr50=(--batch-size 2)
  decode=(--frames 32 128 --processes 1 "$cpus") clips=2 fit_frames=(32 64) score_frames=(16 32) cameras=(1 2) camera_seconds=5
else
  device=cuda check=() profile=(--batch-size 32 64 128 --batches 5 --update-mib 16 64) wr50=(--batch-size 16 32)
  decode=(--frames 256 1024 --processes 1 $((cpus - 1))) clips=$((cpus - 1)) fit_frames=($((256 * clips)) $((1024 * clips)))
  score_frames=($((128 * clips)) $((512 * clips))) cameras=(8 16 32) camera_seconds=20
fi

for step in $steps; do
  case $step in
    a) run a 120 "$python" scripts/check_cuda.py --device "$device" "${check[@]}" --json "$out/check_cuda.json" ;;
    b) run b-r18 120 "$python" scripts/profile_actor.py --device "$device" --dtype float32 bfloat16 "${profile[@]}" \
         --json "$out/profile_r18.json"
       run b-wr50 150 "$python" scripts/profile_actor.py --backbone wide_resnet50_2 --device "$device" --dtype float32 bfloat16 \
         "${profile[@]}" "${wr50[@]}" --json "$out/profile_wr50.json" ;;
    c) run c 120 "$python" scripts/bench_decode.py --source synthetic "${decode[@]}" --repeat 1 --json "$out/bench_decode.json" ;;
    d) run d-pipeline 180 "$python" -m pytest -q -n 0 -p no:cacheprovider tests/test_gpu.py
       run d-fit 240 "$python" scripts/bench_fit.py --source synthetic --clips "$clips" --frames "${fit_frames[@]}" --repeat 1 \
         --json "$out/bench_fit.json"
       run d-score 180 "$python" scripts/bench_score.py --source synthetic --clips "$clips" --frames "${score_frames[@]}" --repeat 1 \
         --json "$out/bench_score.json"
       "$python" - "$out" <<'EOF'
import json, sys
from pathlib import Path
STC_FRAMES = 274_515
for name in ("fit", "score"):
    path = Path(sys.argv[1]) / f"bench_{name}.json"
    if not path.exists():
        continue
    rows = json.loads(path.read_text())["rows"]
    ours = next(row for row in rows if row["name"] == f"padim-ray {name}")  # the command as shipped, not a variant
    if ours["marginal_fps"]:
        print(f"{name}: {ours['marginal_fps']:.0f} frames/s marginal, {ours['ratio_to_bare']:.2f}x bare; all of STC "
              f"({STC_FRAMES} frames) in {STC_FRAMES / ours['marginal_fps'] / 60:.1f} min + {ours['fixed_seconds']:.0f} s fixed")
EOF
       ;;
    e) run e 300 "$python" scripts/bench_watch.py --source synthetic --cameras "${cameras[@]}" --seconds "$camera_seconds" \
         --cache "$site/footage" --json "$out/bench_watch.json" ;;
    *) echo "unknown step $step (a, b, c, d or e)"; failed+=("$step") ;;
  esac
done
rm -rf "$site"
echo "== gpu check done; failed steps: ${failed[*]:-none}"
[ ${#failed[@]} -eq 0 ]
