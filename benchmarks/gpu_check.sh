#!/usr/bin/env bash
# The GPU checks of one session, in one run (< 14 min on one H100/H200), from a clone with the
# environment built (bash scripts/env.sh ...). Prints figures for docs/performance.md:
#  1. features: tiles/s of resnet50 in bf16 on a 1 mm synthetic slide, end to end vs the
#     forward pass alone (benchmarks/features_throughput.py);
#  2. one training epoch with --precision bf16-mixed (frozen bin features), one with the
#     end-to-end bin encoder (--bin-encoder resnet50) and one with the encoder trained end to
#     end on dense crops (--bin-input dense), each with its peak GPU memory;
#  3. image-only prediction of a 6.5 mm slide (~660k 8 um bins) with resnet50: issue 6's
#     goal is under 5 minutes (benchmarks/predict_scale.py; the slide is written first, ~90 s);
#  4. the same 6.5 mm slide with dense features (efficientnet_lite0_imagenet at 0.25 um/px, one
#     encoder pass per image tile; issue 22's goal: under 1 minute on one H100);
#  5. nvidia-smi's view of the device.
#   bash benchmarks/gpu_check.sh [WORK_DIR]
#   STEPS="3" bash benchmarks/gpu_check.sh     # only step 3 (a machine with 10-minute calls)
# On a machine lent for 15 minutes in all, with 10-minute calls, run the step an open issue
# waits for first (issue 22: STEPS="4"; writing its 6.5 mm slide took 91 s on the 2-core VM,
# docs/performance.md, then a small model is trained and the slide predicted; then STEPS="2"
# on the same warm machine if time is left).
set -euo pipefail
cd "$(dirname "$0")/.."
work="${1:-${OUT:-/tmp}/gpu_check}"
mkdir -p "$work"
run() { bash scripts/env.sh "$@"; }
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv || true

steps="${STEPS:-1 2 3 4}"
if [[ " $steps " == *" 1 "* ]]; then
echo "== 1. features throughput (resnet50, bf16, 1 mm slide)"
timeout 240 bash scripts/env.sh python benchmarks/features_throughput.py --size-mm 1 \
  --encoders resnet50 --levels spot region bin --batch-size 256 --device cuda || echo "features: failed ($?)"

fi

if [[ " $steps " == *" 2 "* ]]; then
echo "== 2. training epochs on the GPU"
slide="$work/slide"
[ -d "$slide/outs" ] || run magnet synth "$slide" --size-mm 1 --seed 0 --quiet
ds="$work/ds"
[ -f "$ds/manifest.json" ] || run magnet prepare "$ds" "$slide" --bin-size 8 --quiet
run magnet features "$ds" --encoder resnet50 --levels bin spot region --device cuda --quiet
for mode in "bf16 --precision bf16-mixed" "e2e --precision bf16-mixed --bin-encoder resnet50 --nondeterministic" \
    "e2e-dense --precision bf16-mixed --bin-encoder efficientnet_lite0_imagenet --bin-input dense --bin-lr-scale 0.1 --nondeterministic"; do
  name="${mode%% *}"; opts="${mode#* }"
  start=$(date +%s)
  # shellcheck disable=SC2086
  timeout 240 bash scripts/env.sh python - "$ds" "$work/train_$name" $opts <<'PY' || echo "train $name: failed ($?)"
import sys, time, torch
from magnet_st.cli import main
torch.cuda.reset_peak_memory_stats()
t = time.perf_counter()
rc = main(["train", sys.argv[1], sys.argv[2], "--features", "resnet50", "--epochs", "1",
           "--accelerator", "gpu", "--devices", "1", "--quiet", *sys.argv[3:]])
print(f"train {' '.join(sys.argv[3:])}: exit {rc}, {time.perf_counter() - t:.1f} s, "
      f"peak GPU memory {torch.cuda.max_memory_allocated() / 2**30:.2f} GiB")
PY
  echo "   wall $(( $(date +%s) - start )) s"
done

fi

if [[ " $steps " == *" 3 "* ]]; then
echo "== 3. image-only prediction, 6.5 mm slide, resnet50"
timeout 480 bash scripts/env.sh python benchmarks/predict_scale.py --sizes 6.5 --encoder resnet50 \
  --device cuda --batch-size 256 --work "$work/predict_scale" || echo "predict: failed ($?)"
fi

if [[ " $steps " == *" 4 "* ]]; then
echo "== 4. image-only prediction, 6.5 mm slide, dense features at 0.25 um/px"
timeout 300 bash scripts/env.sh python benchmarks/predict_scale.py --sizes 6.5 \
  --encoder efficientnet_lite0_imagenet --dense-mpp 0.25 --device cuda \
  --work "$work/predict_scale" || echo "predict dense: failed ($?)"
fi
nvidia-smi || true
