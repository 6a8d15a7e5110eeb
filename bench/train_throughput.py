"""Training throughput: (a) model-bound, synthetic uint8 batches already on the device, against (b) the real
loader decoding JPEGs (draft decode, uint8 augmentation in workers, pinned memory, normalisation on the device).

    python bench/train_throughput.py [--device cuda] [--batch-size 256] [--workers 12] [--compile]

Goals on a GPU (issue 4): (b)/(a) >= 0.9, and (a) >= 3,000 img/s for ResNet-50 at 224 px on one H100.
Makes --images JPEGs of 500x375 (CompCars' typical size) in a temp folder; --cache also builds the pre-resized copy.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from carapp.dataset.loader import CarImages, EpochSampler, build_transform, make_loader, to_input  # noqa: E402
from carapp.losses import FocalLoss  # noqa: E402
from carapp.model import build_model  # noqa: E402
from carapp.runtime import autocast, pick_device  # noqa: E402


def step_fn(model, optimizer, criterion, device, channels_last: bool):
    def step(images: torch.Tensor, labels: torch.Tensor) -> None:
        x = to_input(images, device, channels_last)
        with autocast(device, True):
            loss = criterion(model(x), labels.to(device, non_blocking=True))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    return step


def measure(step, batches, steps: int, warmup: int, device) -> float:
    it = iter(batches)
    for _ in range(warmup):
        step(*next(it))
    if device.type == "cuda":
        torch.cuda.synchronize()
    t, seen = time.perf_counter(), 0
    for _ in range(steps):
        images, labels = next(it)
        step(images, labels)
        seen += len(labels)
    if device.type == "cuda":
        torch.cuda.synchronize()
    return seen / (time.perf_counter() - t)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="auto")
    ap.add_argument("--backbone", default="resnet50")
    ap.add_argument("--batch-size", type=int, default=256)
    ap.add_argument("--image-size", type=int, default=224)
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--warmup", type=int, default=10)
    ap.add_argument("--workers", type=int, default=min(16, os.cpu_count() or 1))
    ap.add_argument("--images", type=int, default=4096)
    ap.add_argument("--compile", action="store_true")
    ap.add_argument("--cache", action="store_true", help="read a pre-resized copy (python -m carapp cache)")
    args = ap.parse_args()
    device = pick_device(args.device)
    torch.backends.cudnn.benchmark = True
    model = build_model(args.backbone, 927).to(device)
    channels_last = device.type == "cuda"
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    forward = torch.compile(model) if args.compile else model
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    step = step_fn(forward, optimizer, FocalLoss(gamma=2.0), device, channels_last)
    total = args.steps + args.warmup

    size = args.image_size
    synthetic = torch.randint(0, 255, (args.batch_size, 3, size, size), dtype=torch.uint8, device=device)
    labels = torch.randint(0, 927, (args.batch_size,), device=device)
    model_bound = measure(step, ((synthetic, labels) for _ in range(total)), args.steps, args.warmup, device)

    with tempfile.TemporaryDirectory() as tmp:
        os.environ["CARAPP_CACHE"] = os.path.join(tmp, "cache")
        from image_pipeline import make_photos  # the same photo-like JPEG maker, at CompCars' typical size
        paths = make_photos(Path(tmp) / "jpegs", args.images, (500, 375))
        if args.cache:
            from carapp.dataset.resized import ResizedCache, build_resized_cache
            build_resized_cache(str(Path(tmp) / "jpegs"), short_side=256)
        cache = ResizedCache.find(str(Path(tmp) / "jpegs"), size) if args.cache else None
        targets = [i % 927 for i in range(len(paths))]
        dataset = CarImages(str(Path(tmp) / "jpegs"), paths, targets, transform=build_transform(size, True),
                            image_size=size, cache=cache)
        sampler = EpochSampler(targets, weighted=True, num_samples=total * args.batch_size)
        loader = make_loader(dataset, args.batch_size, args.workers, sampler, pin=device.type == "cuda")
        real = measure(step, ((b.images, b.labels) for b in loader), args.steps, args.warmup, device)

    name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU ({os.cpu_count()} cores)"
    print(json.dumps({"device": name, "backbone": args.backbone, "image_size": size, "batch_size": args.batch_size,
                      "workers": args.workers, "compile": args.compile, "cache": args.cache,
                      "a_model_bound_img_s": round(model_bound, 1), "b_real_loader_img_s": round(real, 1),
                      "ratio_b_to_a": round(real / model_bound, 3), "goal_ratio": 0.9,
                      "goal_a_img_s_h100": 3000}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
