"""Outlier exposure (Hendrycks et al. 2019, "Deep anomaly detection with outlier exposure"): each training step also
shows the network a few photos without a car and pulls its outputs on them towards uniform, so that what it has not
seen gets low confidence and low energy instead of a confident class.

    python -m carapp train --data ROOT --run-dir DIR --negatives generated   # photo-like negatives made once
    python -m carapp train --data ROOT --run-dir DIR --negatives DIR         # a folder of photos without a car

What a --negatives value names, and the backdrops some training cars are moved onto (--backdrops): carapp.dataset.
negatives. The photos of a step are drawn from (seed, epoch, step, rank) alone: a resumed run sees the very same ones.
"""
from __future__ import annotations

import numpy as np
import torch

from ..dataset.loader import CarImages, build_transform
from ..dataset.negatives import negative_photos

NEGATIVES_PER_BATCH = 0.125  # negatives per car photo of a batch
_TAG = 0x6F65                # "oe": keeps the draws apart from the sampler's


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
