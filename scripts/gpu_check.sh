#!/usr/bin/env bash
# GPU check, one script for one GPU machine (under 10 minutes on one GPU with 16 cores):
#   1. the CUDA path equals the CPU path (tests/test_gpu.py: embeddings, float64 statistics, fit, maps);
#   2. where an actor's time goes on CPU and GPU (scripts/profile_actor.py);
#   3. fit and score throughput on STC-sized synthetic 856x480 video (scripts/bench_fit.py and
#      scripts/bench_score.py, marginal rates from two frame counts), with the projected time for all
#      274,515 STC training frames.
# Results go to $OUT (or runs/) as JSON and gpu_check.log.
#     bash scripts/gpu_check.sh [FIT_N1 FIT_N2]      # default 4096 20480 frames
set -euo pipefail
cd "$(dirname "$0")/.."
out=${OUT:-runs}
mkdir -p "$out"
exec > >(tee "$out/gpu_check.log") 2>&1
n1=${1:-4096}
n2=${2:-20480}
if [ ! -x .venv/bin/padim-ray ]; then
  python3 -m venv .venv && .venv/bin/pip install -q -e '.[test]'
fi
. .venv/bin/activate
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
python -c "import torch; assert torch.cuda.is_available(), 'no CUDA device visible to torch'; print('torch', torch.__version__, torch.cuda.get_device_name())"

echo "== 1. CUDA path vs CPU path"
python -m pytest -q -p no:cacheprovider tests/test_gpu.py

echo "== 2. actor profile (R18-Rd100, batch 32)"
python scripts/profile_actor.py --json "$out/profile_actor.json"
python scripts/profile_actor.py --backbone wide_resnet50_2 --json "$out/profile_actor_wr50.json"

echo "== 3. fit and score throughput, 856x480 synthetic footage"
python scripts/bench_fit.py --source synthetic --frames "$n1" "$n2" --repeat 1 --json "$out/bench_fit_gpu.json"
python scripts/bench_score.py --source synthetic --frames $((n1 / 4)) $((n2 / 4)) --repeat 1 --json "$out/bench_score_gpu.json"
python - "$out" <<'EOF'
import json, sys
STC_FRAMES = 274_515
for name in ("fit", "score"):
    rows = json.load(open(f"{sys.argv[1]}/bench_{name}_gpu.json"))["rows"]
    ours = next(row for row in rows if row["name"] == f"padim-ray {name}")  # the command as shipped, not a variant
    rate = ours["marginal_fps"]
    if rate:
        print(f"{name}: {rate:.0f} frames/s marginal, {ours['ratio_to_bare']:.2f}x bare; all of STC "
              f"({STC_FRAMES} frames) in {STC_FRAMES / rate / 60:.1f} min + {ours['fixed_seconds']:.0f} s fixed")
EOF
