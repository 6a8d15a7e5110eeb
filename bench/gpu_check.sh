#!/usr/bin/env bash
# Every GPU figure the project claims, run in one go on a machine with CUDA GPUs, written where docs/BENCHMARKS.md
# takes them from:
#
#     bash bench/gpu_check.sh [OUT_DIR]        # PYTHON=/path/to/python to choose the interpreter
#
# About 8 minutes on one H200. Each figure is its own bench script with its own JSON on stdout; this script keeps
# going when one fails (its log says why) and prints a summary at the end:
#   train_*      bench/train_throughput.py: (a) model-bound img/s, (b) with the real loader, (b)/(a)  [goals: >= 3,000
#                img/s for ResNet-50 at 224 px, (b)/(a) >= 0.9]; bf16 + channels_last (default), + torch.compile,
#                + the pre-resized copy
#   predict_cam  bench/predict_cam.py: predict + Grad-CAM / predict alone on the GPU  [goal <= 1.15]
#   analyze      bench/analyze_throughput.py: analyze img/s against one photo at a time  [goal >= 2,000 img/s]
#   ddp          torchrun on every local GPU (nccl): two short epochs of the demo set, images/s from progress.json
# Needs torch, torchvision, pillow, scipy, scikit-learn, pandas, safetensors, onnx (no gradio).
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
OUT=${1:-gpu-check}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1

run() {  # run NAME COMMAND...: stdout to OUT/NAME.json, stderr to OUT/NAME.log, at most 10 minutes
  local name=$1; shift
  echo "== $name: $*"
  local start=$SECONDS
  timeout 600 "$@" > "$OUT/$name.json" 2> "$OUT/$name.log"
  echo "   exit $? after $((SECONDS - start)) s"
}

"$PY" - <<'EOF' | tee "$OUT/machine.json"
import json, os, torch
print(json.dumps({"torch": torch.__version__, "cuda": torch.version.cuda, "gpus": torch.cuda.device_count(),
                  "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
                  "cpus": os.cpu_count()}))
EOF
GPUS=$("$PY" -c "import torch; print(torch.cuda.device_count())")
WORKERS=$(( $(nproc) < 16 ? $(nproc) : 16 ))

run train_bf16 "$PY" bench/train_throughput.py --device cuda --batch-size 256 --workers "$WORKERS"
run train_compile "$PY" bench/train_throughput.py --device cuda --batch-size 256 --workers "$WORKERS" --compile
run train_cache "$PY" bench/train_throughput.py --device cuda --batch-size 256 --workers "$WORKERS" --cache
run predict_cam "$PY" bench/predict_cam.py --device cuda --runs 30
run analyze "$PY" bench/analyze_throughput.py --device cuda --engine torch --photos 2048 --batch-size 256 \
    --workers "$WORKERS" --runs 2

if [ "$GPUS" -ge 1 ]; then
  "$PY" -m carapp demo-data --out "$OUT/demo" --force > /dev/null 2>&1
  rm -rf "$OUT/ddp-run"
  run ddp "$PY" -m torch.distributed.run --standalone --nproc_per_node="$GPUS" -m carapp train --data "$OUT/demo" \
      --run-dir "$OUT/ddp-run" --preset demo --backbone resnet50 --image-size 224 --batch-size 128 --epochs 2 \
      --workers 4 --json
  "$PY" - "$OUT/ddp-run" "$GPUS" > "$OUT/ddp_rate.json" <<'EOF' || true
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
