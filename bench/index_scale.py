"""Indexing a CompCars-sized tree: 163 makes, 1,716 models, 136,726 images (tiny files) with their label files.

    python bench/index_scale.py [--images 136726] [--keep DIR]

Goals (issue 4): <= 30 s cold (no index cache), <= 1 s cached. Tries to drop the OS page cache before the cold run
(needs root); says whether it could.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402
from PIL import Image  # noqa: E402

GOALS = {"cold_s": 30.0, "cached_s": 1.0}


def make_tree(root: Path, images: int, makes: int = 163, models: int = 1716) -> None:
    from scipy.io import savemat
    buf = root / "tiny.jpg"
    Image.new("RGB", (4, 3), (90, 90, 90)).save(buf)
    jpeg = buf.read_bytes()
    rng = np.random.default_rng(0)
    counts = rng.multinomial(images, rng.dirichlet(np.full(models, 0.8)))  # imbalanced, like the real set
    data = root / "data"
    for model, n in enumerate(counts, start=1):
        make = (model - 1) * makes // models + 1
        years = ["2010", "2012", "unknown"][: 1 + model % 3]
        for k in range(n):
            year = years[k % len(years)]
            img = data / "image" / str(make) / str(model) / year
            lab = data / "label" / str(make) / str(model) / year
            if k < len(years):
                img.mkdir(parents=True, exist_ok=True)
                lab.mkdir(parents=True, exist_ok=True)
            name = f"{model:04d}{k:05d}"
            (img / f"{name}.jpg").write_bytes(jpeg)
            (lab / f"{name}.txt").write_text("3\n1\n1 1 4 3\n")
    (data / "misc").mkdir(parents=True, exist_ok=True)
    cells = lambda names: np.array([[np.array([n])] for n in names], dtype=object)  # noqa: E731
    savemat(data / "misc" / "make_model_name.mat", {"make_names": cells([f"Make{i}" for i in range(makes)]),
                                                    "model_names": cells([f"M{i}" for i in range(models)])})


def drop_os_cache() -> bool:
    try:
        subprocess.run(["sync"], check=True)
        Path("/proc/sys/vm/drop_caches").write_text("3\n")
        return True
    except OSError:
        return False


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--images", type=int, default=136_726)
    ap.add_argument("--keep", help="build the tree here and keep it")
    args = ap.parse_args()
    work = Path(args.keep or tempfile.mkdtemp(prefix="carapp-index-"))
    os.environ["CARAPP_CACHE"] = str(work / "cache")
    from carapp.dataset.index import index_dataset
    t = time.perf_counter()
    if not (work / "data").is_dir():
        make_tree(work, args.images)
    made = time.perf_counter() - t
    shutil.rmtree(work / "cache", ignore_errors=True)
    dropped = drop_os_cache()
    t = time.perf_counter()
    index = index_dataset(work)
    cold = time.perf_counter() - t
    t = time.perf_counter()
    again = index_dataset(work)
    cached = time.perf_counter() - t
    assert len(again.paths) == len(index.paths) == args.images
    figures = {"images": len(index.paths), "classes": len(index.classes), "tree_seconds": round(made, 1),
               "os_cache_dropped": dropped, "cold_s": round(cold, 2), "cached_s": round(cached, 3),
               "cold_ratio_to_goal": round(cold / GOALS["cold_s"], 3),
               "cached_ratio_to_goal": round(cached / GOALS["cached_s"], 3)}
    print(json.dumps(figures, indent=2))
    if not args.keep:
        shutil.rmtree(work, ignore_errors=True)
    return 0 if cold <= GOALS["cold_s"] and cached <= GOALS["cached_s"] else 1


if __name__ == "__main__":
    sys.exit(main())
