"""Predict + Grad-CAM against predict alone: ResNet-50, 927 classes, 224 px, one image at a time.

    python bench/predict_cam.py [--runs 15] [--device cpu]

Goal (issue 4): predict with the default heatmap <= 1.15x predict alone. Also prints pytorch-grad-cam's GradCAM
(forward + backward through the trunk) for reference, and the CLI's batched throughput (predict_many) in img/s.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402
from PIL import Image  # noqa: E402

from carapp.cam import package_cam  # noqa: E402
from carapp.model import build_model  # noqa: E402
from carapp.predict import Predictor  # noqa: E402

GOAL = 1.15


def median_seconds(fn, runs: int) -> float:
    return interleaved([fn], runs)[0]


def interleaved(fns, runs: int) -> list[float]:
    """Median seconds of each function, measured in alternation so machine noise hits them alike."""
    for fn in fns:
        fn()  # warm-up
    times = [[] for _ in fns]
    for _ in range(runs):
        for fn, bucket in zip(fns, times):
            t = time.perf_counter()
            fn()
            bucket.append(time.perf_counter() - t)
    return [statistics.median(b) for b in times]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", type=int, default=30)
    ap.add_argument("--device", default="auto")
    args = ap.parse_args()
    torch.manual_seed(0)
    predictor = Predictor(build_model("resnet50", 927), [f"class {i}" for i in range(927)], {"image_size": 224},
                          args.device)
    photo = Image.effect_noise((800, 600), 64).convert("RGB")
    x = predictor.prepare([photo])

    plain, with_cam = interleaved([lambda: predictor.predict(photo, cam=False),
                                   lambda: predictor.predict(photo, cam=True)], args.runs)
    package = median_seconds(lambda: package_cam(predictor.model, x, 0, "gradcam"), args.runs)
    photos = [photo] * 16
    batched = median_seconds(lambda: predictor.predict_many(photos, cam=True), max(3, args.runs // 5))
    figures = {
        "device": str(predictor.device), "threads": torch.get_num_threads(),
        "predict_ms": round(plain * 1000, 1), "predict_cam_ms": round(with_cam * 1000, 1),
        "ratio_predict_cam_to_predict": round(with_cam / plain, 3), "goal": GOAL,
        "gradcam_package_ms": round(package * 1000, 1), "ratio_package_to_predict": round(package / plain, 3),
        "single_predict_cam_img_per_s": round(1 / with_cam, 1),
        "batched_predict_cam_img_per_s": round(16 / batched, 1),  # predict_many, 16 photos, what the CLI does
    }
    print(json.dumps(figures, indent=2))
    return 0 if with_cam / plain <= GOAL else 1


if __name__ == "__main__":
    sys.exit(main())
