"""`--batch-size auto`: the largest batch that fits on the GPU, found with a few trial steps before the run starts.

Sizes are tried from MAX_BATCH down, halving on every out-of-memory error; each trial runs TRIAL_STEPS full training
steps (forward, focal loss, backward, optimizer step: the optimizer's state is part of what must fit) on random
images of the run's size, with the run's model, optimizer and precision. Found once, the size is written into the
run's config.json: a resumed run keeps it, and its sample positions stay exact. An out-of-memory error later in
the run (a larger batch of big photos, memory another process took) halves it and goes on (train.halve_batch).
"""
from __future__ import annotations

import logging

import torch

from ..config import TrainConfig
from .optim import make_optimizer

log = logging.getLogger("carapp")

AUTO = "auto"
MAX_BATCH = 1024
TRIAL_STEPS = 2
CPU_BATCH = TrainConfig.batch_size  # no GPU memory to fill: the paper's batch


def resolve_batch_size(cfg: TrainConfig, num_classes: int) -> TrainConfig:
    """cfg with batch_size a number: as given, or for "auto" the largest that fits (CPU: the paper's, logged)."""
    if cfg.batch_size != AUTO:
        return cfg
    from ..runtime import pick_device
    device = pick_device(cfg.device)
    if device.type != "cuda":
        log.info("--batch-size auto: no CUDA device (%s), using batch size %d", device.type, CPU_BATCH)
        cfg.batch_size = CPU_BATCH
        return cfg
    cfg.batch_size = largest_fitting(lambda size: trial_steps(cfg, num_classes, device, size))
    cfg.batch_size_auto = True
    log.info("--batch-size auto: %d fits on %s", cfg.batch_size, torch.cuda.get_device_name(device))
    return cfg


def largest_fitting(try_size, start: int = MAX_BATCH) -> int:
    """The first of start, start/2, ... 1 for which try_size(size) raises no CUDA out-of-memory error."""
    size = start
    while size >= 1:
        try:
            try_size(size)
            return size
        except torch.cuda.OutOfMemoryError:
            log.info("--batch-size auto: %d does not fit", size)
            torch.cuda.empty_cache()
            size //= 2
    raise torch.cuda.OutOfMemoryError("--batch-size auto: not even a batch of 1 fits on this GPU")


def trial_steps(cfg: TrainConfig, num_classes: int, device: torch.device, size: int) -> None:
    """TRIAL_STEPS training steps at this batch size, on a throwaway copy of the run's model and optimizer."""
    from ..losses import FocalLoss
    from ..model import build_model
    from ..runtime import autocast
    net = build_model(cfg.backbone, num_classes, cfg.dropout).to(device)
    if cfg.channels_last:
        net = net.to(memory_format=torch.channels_last)
    optimizer, criterion = make_optimizer(net, cfg), FocalLoss(None, cfg.gamma)
    try:
        for _ in range(TRIAL_STEPS):
            x = torch.randn(size, 3, cfg.image_size, cfg.image_size, device=device)
            y = torch.randint(0, num_classes, (size,), device=device)
            with autocast(device, cfg.amp):
                loss = criterion(net(x), y)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
        torch.cuda.synchronize(device)
    finally:
        del net, optimizer
        torch.cuda.empty_cache()
