#!/usr/bin/env bash
# Every GPU figure the project claims, run in one go on a machine with CUDA GPUs, written where docs/BENCHMARKS.md
# takes them from:
#
#     bash bench/gpu_check.sh [OUT_DIR]        # PYTHON=/path/to/python to choose the interpreter
#     device run, carry [".whl"]: bash bench/gpu_check.sh $OUT   # .whl from bench/gpu_wheels.sh, made here first
#     DEVICE=cpu SMOKE=1 bash bench/gpu_check.sh OUT   # dry run: every step at tiny sizes on the CPU, ~2 min
#
# Run the dry run after changing a bench script's options: a lent GPU's minutes are too few to spend on a typo.
# It leaves out torch.compile (minutes on a CPU) and runs DDP as one gloo process; its figures mean nothing.
#
# About 8 minutes on one H200 before the detect step (estimated at 3 more: not yet run on a GPU). Each figure is its
# own bench script with its own JSON on stdout; this script keeps going when one fails (its log says why) and prints
# a summary at the end:
#   train_*      bench/train_throughput.py: (a) model-bound img/s, (b) with the real loader, (b)/(a)  [goals: >= 3,000
#                img/s for ResNet-50 at 224 px, (b)/(a) >= 0.9]; bf16 + channels_last (default), + torch.compile,
#                + the pre-resized copy
#   predict_cam  bench/predict_cam.py: predict + Grad-CAM / predict alone on the GPU  [goal <= 1.15]
#   analyze      bench/analyze_throughput.py: analyze img/s against one photo at a time  [goal >= 2,000 img/s]
#   detect       bench/detect.py --speed-only: analyze per car (detector) against whole photo, 800 x 600 scenes
#                [goal >= 0.33x]; models trained there for a few epochs (their speed, not their accuracy, counts)
#   ddp          torchrun on every local GPU (nccl): two short epochs of the demo set, images/s from progress.json
# Needs torch, torchvision, pillow, scipy, scikit-learn, pandas, safetensors, onnx (no gradio).
# A bench script exits 1 when its goal is missed but still prints its figure; a step that prints no JSON is broken.
# This script exits 1 when a step is broken, after running the rest.
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
OUT=${1:-gpu-check}
DEVICE=${DEVICE:-cuda}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
FAILED=""; MISSED=""

# A lent GPU's image lacks a few of carapp's pure-Python packages: install the carried wheels for this run only.
if ! "$PY" -c "import plotly, pytorch_grad_cam, cleanlab" 2> /dev/null; then
  [ -d .whl ] || { echo "plotly, grad-cam or cleanlab missing: run bench/gpu_wheels.sh and carry .whl"; exit 1; }
  "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/carapp-site \
      .whl/*.whl || exit 1
  export PYTHONPATH=/tmp/carapp-site${PYTHONPATH:+:$PYTHONPATH}
fi

run() {  # run NAME COMMAND...: stdout to OUT/NAME.json, stderr to OUT/NAME.log, at most 10 minutes
  local name=$1; shift
  echo "== $name: $*"
  local start=$SECONDS
  timeout 600 "$@" > "$OUT/$name.json" 2> "$OUT/$name.log"
  local rc=$?
  echo "   exit $rc after $((SECONDS - start)) s"
  if ! "$PY" -c "import json, sys; json.load(open(sys.argv[1]))" "$OUT/$name.json" 2> /dev/null; then
    FAILED="$FAILED $name"
  elif [ "$rc" -ne 0 ]; then
    MISSED="$MISSED $name"
  fi
}

"$PY" - <<'EOF' | tee "$OUT/machine.json"
import json, os, torch
print(json.dumps({"torch": torch.__version__, "cuda": torch.version.cuda, "gpus": torch.cuda.device_count(),
                  "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
                  "cpus": os.cpu_count()}))
EOF
GPUS=$("$PY" -c "import torch; print(torch.cuda.device_count())")
WORKERS=$(( $(nproc) < 16 ? $(nproc) : 16 ))
# The real sizes; SMOKE=1 shrinks each to seconds, so that a dry run shows every step works before a GPU is lent.
TRAIN="--batch-size 256 --workers $WORKERS"; CAM="--runs 30"
ANALYZE="--photos 2048 --batch-size 256 --workers $WORKERS --runs 2"
DETECT="--photos 512 --pairs 3 --workers $WORKERS --detector-epochs 4 --classifier-epochs 4"
DDP="--image-size 224 --batch-size 128 --epochs 2 --workers 4"; NPROC=$GPUS
if [ "${SMOKE:-0}" = 1 ]; then
  TRAIN="--backbone resnet18 --batch-size 4 --image-size 64 --steps 1 --warmup 1 --images 16 --workers 1"
  CAM="--runs 1"; ANALYZE="--photos 8 --batch-size 4 --workers 1 --runs 1"
  DETECT="--photos 8 --pairs 1 --workers 1 --detector-epochs 1 --classifier-epochs 1"
  DDP="--backbone resnet18 --image-size 32 --batch-size 16 --epochs 1 --workers 0"; NPROC=1
fi

run train_bf16 "$PY" bench/train_throughput.py --device "$DEVICE" $TRAIN
[ "${SMOKE:-0}" = 1 ] || run train_compile "$PY" bench/train_throughput.py --device "$DEVICE" $TRAIN --compile
run train_cache "$PY" bench/train_throughput.py --device "$DEVICE" $TRAIN --cache
run predict_cam "$PY" bench/predict_cam.py --device "$DEVICE" $CAM
run analyze "$PY" bench/analyze_throughput.py --device "$DEVICE" --engine torch $ANALYZE
run detect "$PY" bench/detect.py --speed-only --device "$DEVICE" $DETECT

if [ "$NPROC" -ge 1 ]; then
  "$PY" -m carapp demo-data --out "$OUT/demo" --force > /dev/null 2>&1
  rm -rf "$OUT/ddp-run"
  run ddp "$PY" -m torch.distributed.run --standalone --nproc_per_node="$NPROC" -m carapp train --data "$OUT/demo" \
      --run-dir "$OUT/ddp-run" --preset demo $DDP --json
  "$PY" - "$OUT/ddp-run" "$NPROC" > "$OUT/ddp_rate.json" <<'EOF' || FAILED="$FAILED ddp_rate"
import csv, json, sys
run, gpus = sys.argv[1], int(sys.argv[2])
train = sum(r["split"] == "train" for r in csv.DictReader(open(f"{run}/split.csv")))
epochs = [json.loads(line) for line in open(f"{run}/metrics.jsonl")]
print(json.dumps({"gpus": gpus, "train_images": train, "epoch_seconds": [e["seconds"] for e in epochs],
                  "images_per_sec_last_epoch": train / epochs[-1]["seconds"] if epochs else None}))
EOF
fi

echo "== summary (each file in $OUT holds one figure's JSON; the .log beside it says how it ran)"
for f in "$OUT"/*.json; do
  echo "--- $(basename "$f")"
  head -c 1500 "$f"; echo
done
[ -z "$MISSED" ] || echo "goal missed:$MISSED (their figures above)"
if [ -n "$FAILED" ]; then echo "BROKEN:$FAILED (no figure; see their .log files)"; exit 1; fi
