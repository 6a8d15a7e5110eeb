"""Dataset health at CompCars size (issue 14): hashing speed of the first pass, and the time of a second pass.

    python bench/health.py [--photos 2000] [--files 136726] [--workers N]

(1) `--photos` photo-sized JPEGs (640 x 480, drawn shapes over noise, ~40 KB like CompCars' web photos): img/s of a
    first pass (every file decoded in draft mode and hashed, in worker processes).
(2) `--files` small distinct JPEGs in 1,716 class folders (CompCars' image count): the first pass, then a second
    pass over the unchanged tree (only stats the files and reads the cache) — goal: seconds.
Prints one JSON line per figure.
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
from PIL import Image, ImageDraw  # noqa: E402


def photo(rng: np.random.Generator, size: tuple[int, int]) -> Image.Image:
    w, h = size
    noise = rng.integers(0, 255, (h // 8, w // 8, 3), np.uint8)
    img = Image.fromarray(noise).resize(size, Image.BICUBIC)
    draw = ImageDraw.Draw(img)
    for _ in range(6):
        x, y = int(rng.integers(0, w * 3 // 4)), int(rng.integers(0, h * 3 // 4))
        draw.rectangle((x, y, x + int(rng.integers(w // 16, w // 3)), y + int(rng.integers(h // 12, h // 4))),
                       fill=tuple(int(v) for v in rng.integers(0, 255, 3)))
    return img


def make_tree(root: Path, n: int, size: tuple[int, int], classes: int) -> None:
    rng = np.random.default_rng(0)
    for i in range(n):
        folder = root / f"class{i % classes:04d}"
        folder.mkdir(parents=True, exist_ok=True)
        photo(rng, size).save(folder / f"{i:06d}.jpg", quality=85)


def timed_check(root: Path, workers: int) -> tuple[float, dict]:
    from carapp.dataset.health import check_health
    start = time.perf_counter()
    report = check_health(str(root), workers=workers)
    return time.perf_counter() - start, report


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--photos", type=int, default=2000, help="photo-sized JPEGs for the img/s figure")
    ap.add_argument("--files", type=int, default=136_726, help="small JPEGs for the second-pass figure")
    ap.add_argument("--workers", type=int, default=os.cpu_count(), help="hashing processes")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        os.environ["CARAPP_CACHE"] = str(Path(tmp) / "cache")  # cold: nothing hashed before
        photos = Path(tmp) / "photos"
        make_tree(photos, args.photos, (640, 480), 20)
        size_kb = sum(p.stat().st_size for p in photos.rglob("*.jpg")) / args.photos / 1024
        seconds, _ = timed_check(photos, args.workers)
        print(json.dumps({"figure": "first pass, 640x480 photos", "images": args.photos,
                          "mean_kb": round(size_kb, 1), "workers": args.workers, "seconds": round(seconds, 2),
                          "img_per_s": round(args.photos / seconds, 1)}), flush=True)
        files = Path(tmp) / "files"
        make_tree(files, args.files, (48, 36), 1716)
        first, _ = timed_check(files, args.workers)
        second, report = timed_check(files, args.workers)
        print(json.dumps({"figure": "CompCars-sized tree", "images": args.files, "workers": args.workers,
                          "first_pass_s": round(first, 1), "second_pass_s": round(second, 2),
                          "near_duplicate_groups": report["counts"]["near_duplicates"]}), flush=True)


if __name__ == "__main__":
    main()
