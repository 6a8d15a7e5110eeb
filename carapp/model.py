"""ResNet backbones with the paper's head: global average pool -> flatten -> Dropout(p) -> Linear(features, classes).

The trunk is torchvision's own ResNet, so its state-dict keys are torchvision's (and timm's): pretrained weights load
as they are. The head keeps the key names `fc.weight` / `fc.bias` by folding the dropout into the linear layer.
"""
from __future__ import annotations

import logging
import socket

import torch
import torch.nn as nn
import torchvision.models as tvm

from .checkpoint import load_state_file
from .config import BACKBONES

log = logging.getLogger(__name__)

# torchvision's builder and ImageNet weights for each of config.BACKBONES (the one list of names, importable
# without torch): the two must name the same backbones
_TORCHVISION = {
    "resnet18": (tvm.resnet18, "ResNet18_Weights", "IMAGENET1K_V1"),
    "resnet34": (tvm.resnet34, "ResNet34_Weights", "IMAGENET1K_V1"),
    "resnet50": (tvm.resnet50, "ResNet50_Weights", "IMAGENET1K_V2"),
    "resnet101": (tvm.resnet101, "ResNet101_Weights", "IMAGENET1K_V2"),
}
assert tuple(_TORCHVISION) == BACKBONES, "config.BACKBONES and model._TORCHVISION name different backbones"


class DropoutLinear(nn.Linear):
    """Dropout then a linear layer, under the plain Linear's parameter names."""

    def __init__(self, in_features: int, out_features: int, dropout: float = 0.2):
        super().__init__(in_features, out_features)
        self.dropout = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(self.dropout(x))


def build_model(backbone: str = "resnet50", num_classes: int = 1000, dropout: float = 0.2,
                weights: str | None = None) -> nn.Module:
    """A torchvision ResNet with the paper's head; `weights` is None/"none", "imagenet", or a .pth path."""
    if backbone not in BACKBONES:
        raise ValueError(f"unknown backbone {backbone!r}; choose from {', '.join(BACKBONES)}")
    # zero-init of each block's last BN: residual blocks start as identities, which steadies training from scratch
    model = _TORCHVISION[backbone][0](weights=None, zero_init_residual=True)
    trunk_state = _pretrained_state(backbone, weights)
    if trunk_state is not None:
        load_trunk(model, trunk_state)
    model.fc = DropoutLinear(model.fc.in_features, num_classes, dropout)
    return model


def _pretrained_state(backbone: str, weights: str | None) -> dict | None:
    if weights in (None, "", "none"):
        return None
    if weights == "imagenet":
        return _imagenet_state(backbone)
    state = load_state_file(weights)  # the same safe, clearly-worded load as checkpoints get
    for key in ("model", "state_dict"):  # accept our checkpoints and common wrappers too
        if isinstance(state, dict) and isinstance(state.get(key), dict):
            state = state[key]
    if not isinstance(state, dict):
        raise ValueError(f"{weights} holds no state dict of weights")
    return {k.removeprefix("module."): v for k, v in state.items()}


def _imagenet_state(backbone: str) -> dict | None:
    """torchvision's ImageNet weights from the hub cache, or a download; offline → a warning and None."""
    enum_name, member = _TORCHVISION[backbone][1:]
    weights = getattr(tvm, enum_name)[member]
    old_timeout = socket.getdefaulttimeout()
    socket.setdefaulttimeout(15)  # a closed network must not hang training
    try:
        return weights.get_state_dict(progress=False, check_hash=False)
    except Exception as exc:  # no network, no cache, proxy error: all mean "train from scratch"
        log.warning("ImageNet weights for %s unavailable (%s: %s); training from scratch. Put %s in the torch "
                    "hub cache (%s/checkpoints) or pass --weights PATH to use them offline.", backbone,
                    type(exc).__name__, exc, weights.url.rsplit("/", 1)[-1], torch.hub.get_dir())
        return None
    finally:
        socket.setdefaulttimeout(old_timeout)


def load_trunk(model: nn.Module, state: dict) -> None:
    """Load pretrained weights into the trunk; a classifier of another shape is left out."""
    own = model.state_dict()
    usable = {k: v for k, v in state.items() if k in own and own[k].shape == v.shape}
    missing = [k for k in own if k not in usable and not k.startswith("fc.")]
    if missing:
        raise ValueError(f"pretrained weights do not match {type(model).__name__}: {len(missing)} trunk tensors "
                         f"missing or of another shape, e.g. {missing[:3]}")
    model.load_state_dict(usable, strict=False)

