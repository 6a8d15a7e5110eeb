"""Photos without a car: the folder a --negatives value names, and backdrops for cars.

`generated` is carapp.dataset.demo's photo-like negatives of the kinds in OE_KINDS, made once into the cache; the
other kinds (textures, gradients, fractal noise) are kept out of training so that bench/trust.py and bench/detect.py
can report families the network never saw. Training shows them beside the cars (outlier exposure,
carapp.training.negatives) and, with --backdrops, behind some of the cars (`Backdrops`); calibration moves the
validation cars onto them to set the "not a car" limit of a car a detector found.
"""
from __future__ import annotations

import logging
import os
import shutil
import tempfile
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps

from ..cache import cache_dir
from .images import ImageError, is_image, open_image

GENERATED = "generated"
OE_KINDS = ("scene", "leaves", "noise", "shapes")
GENERATED_COUNT = 600
_BACKDROP_TAG = 0x6264       # "bd": keeps the backdrops' draws apart from the sampler's and outlier exposure's
log = logging.getLogger("carapp")


def negatives_folder(spec: str) -> Path:
    """The folder a --negatives value names; `generated` is made once into the cache (atomically: a rename) and
    shared by every run: which of its photos a step sees is the run's seed's business."""
    if spec != GENERATED:
        folder = Path(spec)
        if not folder.is_dir():
            raise ValueError(f"--negatives {spec}: not a folder (give a folder of photos without a car, or "
                             f"'{GENERATED}')")
        return folder
    name = f"{GENERATED}-{'-'.join(OE_KINDS)}-{GENERATED_COUNT}"
    try:
        return _generated(cache_dir("negatives") / name)
    except OSError as exc:  # a read-only home (some hosts): the temp folder will do
        log.warning("cannot write the generated negatives to the cache (%s); using the temp folder", exc)
        return _generated(Path(tempfile.gettempdir()) / "carapp-negatives" / name)


def _generated(folder: Path) -> Path:
    from .demo import make_no_car_images
    if not folder.is_dir():
        scratch = folder.with_name(f".{folder.name}.{os.getpid()}")
        make_no_car_images(scratch, GENERATED_COUNT, seed=1000, kinds=OE_KINDS)  # bench/trust.py tests on seed 1
        try:
            scratch.rename(folder)
        except OSError:  # another process (a torchrun rank) made it first
            shutil.rmtree(scratch, ignore_errors=True)
    return folder


def negative_photos(spec: str) -> tuple[Path, list[str]]:
    """The folder a --negatives value names and its photos (paths relative to it); an empty one is refused."""
    folder = negatives_folder(spec)
    paths = sorted(str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file() and is_image(p.name))
    if not paths:
        raise ValueError(f"--negatives {spec}: no photos in {folder}")
    return folder, paths


class Backdrops:
    """Photos without a car that a share of the training cars is moved onto: the photo's labelled box pasted where it
    was onto a backdrop fitted to the photo's size, so the car keeps its size and place and loses its background.
    Whether a sample moves, and onto which backdrop, is drawn from the sample's own seed (exact resume)."""

    def __init__(self, spec: str, share: float):
        self.folder, self.paths = negative_photos(spec)
        self.share = share

    def __len__(self) -> int:
        return len(self.paths)

    def pick(self, seed: int) -> int | None:
        """The backdrop this sample moves onto, or None (it keeps its own background)."""
        rng = np.random.default_rng([seed, _BACKDROP_TAG])
        return int(rng.integers(len(self.paths))) if rng.random() < self.share else None

    def place(self, photo: Image.Image, box: list[float], pick: int) -> Image.Image:
        """`photo` with everything outside `box` (1-based x1 y1 x2 y2, as datasets label it) replaced by backdrop
        `pick`; an unreadable backdrop or a degenerate box leaves the photo as it is."""
        x1, y1, x2, y2 = max(0, round(box[0] - 1)), max(0, round(box[1] - 1)), round(box[2]), round(box[3])
        x2, y2 = min(x2, photo.width), min(y2, photo.height)
        if x2 - x1 < 2 or y2 - y1 < 2:
            return photo
        try:
            backdrop = open_image(self.folder / self.paths[pick])
        except ImageError as exc:
            log.debug("backdrop %s skipped: %s", self.paths[pick], exc)
            return photo
        canvas = ImageOps.fit(backdrop, photo.size, Image.BILINEAR)  # fills the photo, its middle kept
        canvas.paste(photo.crop((x1, y1, x2, y2)), (x1, y1))
        return canvas
