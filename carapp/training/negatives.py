"""Outlier exposure (Hendrycks et al. 2019, "Deep anomaly detection with outlier exposure"): each training step also
shows the network a few photos without a car and pulls its outputs on them towards uniform, so that what it has not
seen gets low confidence and low energy instead of a confident class.

    python -m carapp train --data ROOT --run-dir DIR --negatives generated   # photo-like negatives made once
    python -m carapp train --data ROOT --run-dir DIR --negatives DIR         # a folder of photos without a car

`generated` is carapp.dataset.demo's photo-like negatives of the kinds in OE_KINDS; the other kinds (textures,
gradients, fractal noise) are kept out of training so that bench/trust.py can report families the network never saw.
The photos of a step are drawn from (seed, epoch, step, rank) alone: a resumed run sees the very same ones.
"""
from __future__ import annotations

import logging
import os
import shutil
import tempfile
from pathlib import Path

import numpy as np
import torch

from ..cache import cache_dir
from ..dataset.images import is_image
from ..dataset.loader import CarImages, build_transform

GENERATED = "generated"
OE_KINDS = ("scene", "leaves", "noise", "shapes")
GENERATED_COUNT = 600
NEGATIVES_PER_BATCH = 0.125  # negatives per car photo of a batch
_TAG = 0x6F65                # "oe": keeps the draws apart from the sampler's
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
    from ..dataset.demo import make_no_car_images
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


class Negatives:
    """Photos without a car, a few per training step, augmented as the cars are."""

    def __init__(self, cfg, rank: int = 0):
        folder, paths = negative_photos(cfg.negatives)
        self.images = CarImages(str(folder), paths, [-1] * len(paths), None,
                                build_transform(cfg.image_size, True, cfg.jitter, cfg.resize),
                                image_size=cfg.image_size)
        self.per_batch = max(1, round(int(cfg.batch_size) * NEGATIVES_PER_BATCH))
        self.seed, self.rank = cfg.seed, rank

    def __len__(self) -> int:
        return len(self.images)

    def batch(self, epoch: int, step: int) -> torch.Tensor | None:
        """The uint8 negatives of one step (None when none of the drawn files could be read)."""
        rng = np.random.default_rng([self.seed, _TAG, epoch, step, self.rank])
        picks = rng.choice(len(self.images), size=min(self.per_batch, len(self.images)), replace=False)
        seeds = rng.integers(0, 2 ** 31, size=len(picks))
        decoded = [self.images[(int(i), int(s))][1] for i, s in zip(picks, seeds)]
        kept = [sample[0] for sample in decoded if sample is not None]
        return torch.stack(kept) if kept else None


def uniform_loss(logits: torch.Tensor) -> torch.Tensor:
    """Cross-entropy of the outputs against the uniform distribution over the classes (OE's term)."""
    return -torch.log_softmax(logits.float(), dim=1).mean()
