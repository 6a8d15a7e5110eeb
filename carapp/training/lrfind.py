"""Learning-rate range test (Smith 2015; fastai's lr_find): train for a short while with the learning rate growing
exponentially from tiny to huge, watch the smoothed loss, stop when it diverges.

    python -m carapp lr-find --data ROOT [train options] [--steps 100] [--json]

It builds the model, loss, optimizer and training loader exactly as `train` would for the same options, but writes no
run directory: the weights it changes are thrown away.
"""
from __future__ import annotations

import dataclasses
import logging
import math

import numpy as np

from ..config import TrainConfig
from ..dataset.index import index_dataset
from ..dataset.split import choose_split
from ..runtime import Dist
from .autobatch import resolve_batch_size
from .trainer import Trainer

log = logging.getLogger("carapp")

SMOOTHING = 0.98        # exponential moving average of the loss, bias-corrected (fastai's)
DIVERGED = 4.0          # stop once the smoothed loss is this many times its best


def lr_find(cfg: TrainConfig, start_lr: float = 1e-7, end_lr: float = 10.0, steps: int = 100) -> dict:
    """{"suggested_lr", "min_loss_lr", "lrs", "losses" (smoothed), "raw_losses", "steps", "diverged"}."""
    if not (0 < start_lr < end_lr):
        raise ValueError(f"start_lr and end_lr must satisfy 0 < start_lr < end_lr (got {start_lr}, {end_lr})")
    if steps < 5:
        raise ValueError(f"steps must be at least 5 (got {steps})")
    # the whole network, raw weights, and no schedule of its own: the range test sets the lr of every step
    cfg = dataclasses.replace(cfg, steps_per_epoch=steps, freeze_epochs=0, ema=0.0, schedule="plateau",
                              warmup_epochs=0.0)
    split = choose_split(index_dataset(cfg.data, cfg.format), cfg.split, cfg.min_images, cfg.val_frac, cfg.test_frac,
                         cfg.seed)
    cfg = resolve_batch_size(cfg, len(split.class_info))
    trainer = Trainer(cfg, split, None, Dist())
    ratios = [g["lr"] / cfg.lr if cfg.lr else 1.0 for g in trainer.optimizer.param_groups]  # layer-wise lrs keep shape
    lrs, raw, smoothed = [], [], []
    average, best, diverged = 0.0, math.inf, False
    trainer.sampler.set_epoch(1)
    trainer.model.train()
    for step, (images, labels, _, _) in enumerate(trainer.train_loader):
        if images is None:
            continue
        lr = start_lr * (end_lr / start_lr) ** (step / (steps - 1))
        for group, ratio in zip(trainer.optimizer.param_groups, ratios):
            group["lr"] = lr * ratio
        loss = trainer.forward(images, labels)[2]
        trainer.step(loss)
        loss = loss.item()
        if not math.isfinite(loss):
            diverged = True
            break
        average = SMOOTHING * average + (1 - SMOOTHING) * loss
        value = average / (1 - SMOOTHING ** (len(raw) + 1))
        lrs.append(lr), raw.append(loss), smoothed.append(value)
        best = min(best, value)
        if value > DIVERGED * best:
            diverged = True
            break
    if len(lrs) < 2:
        raise ValueError("the range test ended before two readable batches: check the dataset and --start-lr")
    suggested, at_min = suggest_lr(lrs, smoothed)
    log.info("lr-find: %d steps from %.1e to %.1e%s; suggested lr %.2e (minimum of the loss at %.2e)", len(lrs),
             lrs[0], lrs[-1], ", stopped when the loss diverged" if diverged else "", suggested, at_min)
    return {"suggested_lr": suggested, "min_loss_lr": at_min, "lrs": lrs, "losses": smoothed, "raw_losses": raw,
            "steps": len(lrs), "diverged": diverged}


def suggest_lr(lrs: list[float], losses: list[float]) -> tuple[float, float]:
    """(steepest descent of the smoothed loss against log lr before its minimum, the lr of that minimum). The first
    tenth of the sweep is left out: the average has not settled there yet. Too short a descent for a slope (under 5
    points): the minimum's lr / 10, the classic rule of thumb."""
    skip = len(losses) // 10
    lowest = skip + int(np.argmin(losses[skip:]))
    at_min = lrs[lowest]
    if lowest - skip < 4:
        return at_min / 10, at_min
    slopes = np.gradient(np.asarray(losses[skip:lowest + 1]), np.log(np.asarray(lrs[skip:lowest + 1])))
    return float(lrs[skip + int(np.argmin(slopes))]), at_min
