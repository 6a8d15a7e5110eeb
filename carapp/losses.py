"""Focal loss (Lin et al.) with per-class alpha, as the paper uses against CompCars' class imbalance."""
from __future__ import annotations

from typing import Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F


def focal_loss(logits: torch.Tensor, targets: torch.Tensor, alpha: torch.Tensor | None = None,
               gamma: float = 2.0, reduction: str = "mean", label_smoothing: float = 0.0) -> torch.Tensor:
    """FL = -alpha_t (1 - p_t)^gamma log p_t, with p_t the softmax probability of the true class.

    With label smoothing e over K classes the target becomes q = (1 - e) one_hot(t) + e / K, and every class k
    contributes with its own focal factor:  FL = -alpha_t * sum_k q_k (1 - p_k)^gamma log p_k.
    At e = 0 this is the focal loss above; at gamma = 0 it is cross-entropy with label smoothing (as PyTorch's).
    `reduction="mean"` is the plain average over samples of the alpha_t-weighted terms (not divided by sum alpha_t).
    """
    log_p = F.log_softmax(logits.float(), dim=1)
    if label_smoothing:
        q = torch.full_like(log_p, label_smoothing / log_p.shape[1])
        q.scatter_add_(1, targets[:, None], torch.full_like(log_p[:, :1], 1.0 - label_smoothing))
        loss = -(q * (1.0 - log_p.exp()) ** gamma * log_p).sum(1)
    else:
        log_p_t = log_p.gather(1, targets[:, None]).squeeze(1)
        loss = -((1.0 - log_p_t.exp()) ** gamma) * log_p_t
    if alpha is not None:
        loss = alpha.to(loss.device, loss.dtype)[targets] * loss
    if reduction == "mean":
        return loss.mean()
    if reduction == "sum":
        return loss.sum()
    if reduction == "none":
        return loss
    raise ValueError(f"reduction must be mean, sum or none, not {reduction!r}")


class FocalLoss(nn.Module):
    def __init__(self, alpha: torch.Tensor | None = None, gamma: float = 2.0, reduction: str = "mean",
                 label_smoothing: float = 0.0):
        super().__init__()
        self.register_buffer("alpha", None if alpha is None else torch.as_tensor(alpha, dtype=torch.float32))
        self.gamma = gamma
        self.reduction = reduction
        self.label_smoothing = label_smoothing

    def forward(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        return focal_loss(logits, targets, self.alpha, self.gamma, self.reduction, self.label_smoothing)


def class_alpha(counts: Sequence[int], kind: str = "inverse", beta: float = 0.999) -> torch.Tensor | None:
    """Per-class alpha from training counts, normalised to mean 1 over classes.

    inverse: alpha_c ∝ 1 / n_c (the paper); effective: alpha_c ∝ (1 - beta) / (1 - beta^n_c) (Cui et al. 2019);
    none: no weighting.
    """
    if kind == "none":
        return None
    n = torch.as_tensor(counts, dtype=torch.float64).clamp(min=1)
    if kind == "inverse":
        w = 1.0 / n
    elif kind == "effective":
        w = (1.0 - beta) / (1.0 - beta ** n)
    else:
        raise ValueError(f"alpha must be inverse, effective or none, not {kind!r}")
    return (w / w.mean()).float()
