"""A pre-resized copy of a dataset, so training decodes small JPEGs instead of full photos.

    python -m carapp cache --data ROOT --short-side 256

Copies live under the user cache (the dataset folder may be read-only), with a manifest of the original sizes so
CompCars boxes still land right. The loader uses the smallest copy whose short side covers the training size.
"""
from __future__ import annotations

import hashlib
import json
import os
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

from PIL import Image

from ..atomic import atomic_writer
from ..cache import cache_dir
from .images import ImageError, open_image
from .index import index_dataset


def cache_root(data_root: str | os.PathLike) -> Path:
    base = cache_dir("resized")
    return base / hashlib.sha1(str(Path(data_root).resolve()).encode()).hexdigest()[:16]


def _resize_one(job: tuple[str, str, int]) -> tuple[str, list[int] | None]:
    src, dst, short_side = job
    try:
        with Image.open(src) as probe:
            original = list(probe.size)
        img = open_image(src, draft_size=short_side)
    except (ImageError, OSError):
        return src, None  # unreadable: the loader will meet the original and report it
    scale = short_side / min(img.size)
    if scale < 1:
        img = img.resize((round(img.width * scale), round(img.height * scale)), Image.BICUBIC)
    os.makedirs(os.path.dirname(dst), exist_ok=True)
    img.save(dst, "JPEG", quality=90)
    return src, [*original, img.width]


def build_resized_cache(data_root: str, short_side: int = 256, workers: int | None = None) -> dict:
    """Write every image of the dataset with its short side reduced to short_side; returns a summary."""
    index = index_dataset(data_root)
    out = cache_root(data_root) / f"s{short_side}"
    jobs = [(os.path.join(index.root, rel), str(out / rel), short_side) for rel in index.paths]
    manifest, failed = {}, 0
    with ProcessPoolExecutor(max_workers=workers or os.cpu_count()) as pool:
        for rel, (_, original) in zip(index.paths, pool.map(_resize_one, jobs, chunksize=64)):
            if original is None:
                failed += 1
            else:
                manifest[rel] = original
    with atomic_writer(out / "manifest.json") as f:
        f.write(json.dumps({"short_side": short_side, "sizes": manifest}))
    return {"cache": str(out), "images": len(manifest), "unreadable": failed, "short_side": short_side}


class ResizedCache:
    """Lookup of the pre-resized copy of an image: (file, factor from original to cached pixels)."""

    def __init__(self, folder: Path, sizes: dict[str, list[int]]):  # rel path -> [orig w, orig h, cached w]
        self.folder, self.sizes = folder, sizes

    @classmethod
    def find(cls, data_root: str, min_short_side: int) -> "ResizedCache | None":
        """The smallest copy whose short side is at least min_short_side, if one was built."""
        root = cache_root(data_root)
        candidates = sorted((int(p.name[1:]), p) for p in root.glob("s*") if (p / "manifest.json").is_file()) \
            if root.is_dir() else []
        for short, folder in candidates:
            if short >= min_short_side:
                return cls(folder, json.loads((folder / "manifest.json").read_text())["sizes"])
        return None

    def lookup(self, rel: str) -> tuple[str, float] | None:
        sizes = self.sizes.get(rel)
        return (str(self.folder / rel), sizes[2] / sizes[0]) if sizes else None
