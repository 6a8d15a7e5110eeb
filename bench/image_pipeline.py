"""Image pipeline throughput: carapp's loader against a naive full-decode PIL pipeline with the same output.

    python bench/image_pipeline.py [--images 200] [--size 224]

Naive: PIL full decode -> Resize -> CenterCrop -> ToTensor -> Normalize (float work per image, one process).
carapp: JPEG draft-mode decode -> uint8 Resize/CenterCrop -> batch -> normalise once per batch; then the same reading
a pre-resized copy (`python -m carapp cache`). Measured on 800x600 photos made here and on the demo set.
Goal (issue 4): >= 2x the naive img/s. Prints img/s, ratios, and the mean difference between the two outputs.
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

import numpy as np  # noqa: E402
import torch  # noqa: E402
from PIL import Image, ImageDraw  # noqa: E402
from torchvision import transforms as T  # noqa: E402

from carapp.dataset.loader import (IMAGENET_MEAN, IMAGENET_STD, CarImages, build_transform, resize_size,  # noqa: E402
                                   to_input)
from carapp.dataset.resized import ResizedCache, build_resized_cache  # noqa: E402

GOAL = 2.0


def make_photos(folder: Path, n: int, size: tuple[int, int] = (800, 600)) -> list[str]:
    """JPEGs with photo-like content (gradients, shapes, noise) in a class-per-folder tree."""
    rng = np.random.default_rng(0)
    w, h = size
    paths = []
    for i in range(n):
        base = np.linspace(rng.integers(0, 255, 3), rng.integers(0, 255, 3), h)[:, None, :].repeat(w, 1)
        img = Image.fromarray(np.uint8(np.clip(base + rng.normal(0, 12, (h, w, 3)), 0, 255)))
        draw = ImageDraw.Draw(img)
        for _ in range(6):
            x, y = rng.integers(0, w - 100), rng.integers(0, h - 100)
            draw.rectangle([x, y, x + rng.integers(40, w // 3), y + rng.integers(30, h // 3)],
                           fill=tuple(int(v) for v in rng.integers(0, 255, 3)))
        rel = f"class{i % 4}/{i:04d}.jpg"
        (folder / rel).parent.mkdir(parents=True, exist_ok=True)
        img.save(folder / rel, "JPEG", quality=90)
        paths.append(rel)
    return paths


def naive(root: str, paths: list[str], size: int) -> list[torch.Tensor]:
    tf = T.Compose([T.Resize(resize_size(size)), T.CenterCrop(size), T.ToTensor(), T.Normalize(IMAGENET_MEAN,
                                                                                                 IMAGENET_STD)])
    return [tf(Image.open(os.path.join(root, p)).convert("RGB")) for p in paths]


def ours(root: str, paths: list[str], size: int, cache=None, batch: int = 32) -> list[torch.Tensor]:
    ds = CarImages(root, paths, [0] * len(paths), transform=build_transform(size, False), image_size=size,
                   cache=cache)
    out = []
    for start in range(0, len(paths), batch):
        items = torch.stack([ds[i][1][0] for i in range(start, min(start + batch, len(paths)))])
        out += list(to_input(items, torch.device("cpu")))
    return out


def rate(fn, n: int) -> tuple[float, list]:
    t = time.perf_counter()
    result = fn()
    return n / (time.perf_counter() - t), result


def compare(root: str, paths: list[str], size: int, with_cache: bool) -> dict:
    n = len(paths)
    naive_rate, reference = rate(lambda: naive(root, paths, size), n)
    ours_rate, mine = rate(lambda: ours(root, paths, size), n)
    fig = {"images": n, "naive_img_s": round(naive_rate, 1), "carapp_img_s": round(ours_rate, 1),
           "ratio": round(ours_rate / naive_rate, 2),
           "mean_abs_diff": round(float(torch.stack(reference).sub(torch.stack(mine)).abs().mean()), 4)}
    if with_cache:
        build_resized_cache(root, short_side=max(256, resize_size(size)))
        cache = ResizedCache.find(root, size)
        cached_rate, _ = rate(lambda: ours(root, paths, size, cache), n)
        fig |= {"carapp_cached_img_s": round(cached_rate, 1), "ratio_cached": round(cached_rate / naive_rate, 2)}
    return fig


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--images", type=int, default=200)
    ap.add_argument("--size", type=int, default=224)
    args = ap.parse_args()
    torch.set_num_threads(1)  # one loader worker's view: per-core throughput
    with tempfile.TemporaryDirectory() as tmp:
        os.environ["CARAPP_CACHE"] = os.path.join(tmp, "cache")
        photos = Path(tmp) / "photos"
        paths = make_photos(photos, args.images)
        figures = {"photos_800x600": compare(str(photos), paths, args.size, with_cache=True)}
        from carapp.dataset.demo import make_demo_dataset
        from carapp.dataset.index import index_dataset
        make_demo_dataset(Path(tmp) / "demo")
        index = index_dataset(Path(tmp) / "demo")
        figures["demo_set_64px"] = compare(str(Path(tmp) / "demo"), index.paths[: args.images * 2], 64, False)
    figures["goal"] = GOAL
    print(json.dumps(figures, indent=2))
    return 0 if figures["photos_800x600"]["ratio"] >= GOAL else 1


if __name__ == "__main__":
    sys.exit(main())
