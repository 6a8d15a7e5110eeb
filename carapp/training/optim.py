"""Optimisation: the optimizer and its parameter groups (layer-wise learning rates, no weight decay on norm and
bias), the learning-rate schedule, the weights' moving average, and the frozen trunk of a head-only epoch.
Shared by training, the batch-size search and the learning-rate range test."""
from __future__ import annotations

import math

import torch

from ..config import TrainConfig


def stage_of(name: str) -> int:
    """Depth of a ResNet parameter from the top: 0 the head (fc), 1-4 layer4..layer1, 5 the stem (conv1, bn1)."""
    top = name.split(".", 1)[0]
    if top == "fc":
        return 0
    return 5 - int(top[5:]) if top.startswith("layer") else 5


def param_groups(net: torch.nn.Module, cfg: TrainConfig) -> list[dict]:
    """Optimizer groups: lr x layer_lr_decay^depth per ResNet stage (head first, at the full lr: the lr that
    metrics.jsonl reports), and with decay_norm_bias off, weight decay 0 on 1-d tensors (norm weights, biases)."""
    if cfg.decay_norm_bias and cfg.layer_lr_decay == 1.0:
        return [{"params": list(net.parameters()), "name": "all"}]  # the paper's single group
    groups: dict[tuple[int, bool], dict] = {}
    for name, p in net.named_parameters():
        depth, exempt = stage_of(name), not cfg.decay_norm_bias and p.ndim <= 1
        group = groups.setdefault((depth, exempt), {
            "params": [], "lr": cfg.lr * cfg.layer_lr_decay ** depth, "weight_decay": 0.0 if exempt else
            cfg.weight_decay, "name": ("head", "layer4", "layer3", "layer2", "layer1", "stem")[depth]
            + (" norm/bias" if exempt else "")})
        group["params"].append(p)
    return [groups[k] for k in sorted(groups)]


def make_optimizer(net: torch.nn.Module, cfg: TrainConfig) -> torch.optim.Optimizer:
    """adam: the paper's (L2 weight decay in the gradient); adamw: decoupled decay; sgd: momentum 0.9, Nesterov."""
    groups = param_groups(net, cfg)
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(groups, lr=cfg.lr, momentum=0.9, nesterov=True, weight_decay=cfg.weight_decay)
    optimizer = torch.optim.AdamW if cfg.optimizer == "adamw" else torch.optim.Adam
    return optimizer(groups, lr=cfg.lr, weight_decay=cfg.weight_decay)


def make_ema(net: torch.nn.Module, decay: float):
    """An exponential moving average of the weights and BN statistics, updated after every optimizer step."""
    if not decay:
        return None
    from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn
    return AveragedModel(net, multi_avg_fn=get_ema_multi_avg_fn(decay), use_buffers=True)


def freeze_trunk_statistics(net: torch.nn.Module) -> None:
    """In a frozen epoch the trunk is a fixed feature extractor: its BN layers keep their running statistics."""
    for name, module in net.named_children():
        if name != "fc":
            module.eval()


def make_scheduler(optimizer, cfg: TrainConfig, steps_per_epoch: int):
    """plateau: ReduceLROnPlateau, stepped with the val loss after each epoch (the paper's). cosine: stepped after
    every optimizer step, linear warmup over warmup_epochs, then half a cosine down to 0 at the last epoch's end."""
    if cfg.schedule == "plateau":
        return torch.optim.lr_scheduler.ReduceLROnPlateau(optimizer, factor=cfg.lr_factor, patience=cfg.lr_patience)
    total, warmup = cfg.epochs * steps_per_epoch, round(cfg.warmup_epochs * steps_per_epoch)

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        return 0.5 * (1.0 + math.cos(math.pi * min(1.0, (step - warmup) / max(1, total - warmup))))
    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
