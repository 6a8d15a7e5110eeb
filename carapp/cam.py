"""Class activation maps.

The default, Grad-CAM at layer4 under global-average-pool + linear, needs no backward pass: the class score is
y_c = w_c · mean_hw(A) + b_c, so dy_c/dA_k,h,w = w_c,k / (H W) and Grad-CAM's channel weights are w_c / (H W).
The heatmap therefore comes from the activations of the very forward pass that made the prediction, and equals
pytorch-grad-cam's GradCAM (same ReLU, min-max scaling and bilinear resize). Other methods use pytorch-grad-cam,
imported only when chosen.
"""
from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from .config import CAM_METHODS as METHODS

# method name -> pytorch-grad-cam class; "gradcam" itself is computed here in one forward pass
PACKAGE_METHODS = dict(zip(METHODS, ("GradCAM", "GradCAMPlusPlus", "ScoreCAM", "EigenCAM", "LayerCAM")))


def stages(model: torch.nn.Module, x: torch.Tensor) -> tuple[list[torch.Tensor], torch.Tensor, torch.Tensor]:
    """A torchvision ResNet up to layer4: (the outputs of the stem, layer1 and layer2, whose channel statistics
    the "not a car" score reads; layer3's activations, whose pooled features it reads too; layer4's, which
    Grad-CAM explains and the classifier pools)."""
    stem = model.maxpool(model.relu(model.bn1(model.conv1(x))))
    low = [stem, model.layer1(stem)]
    low.append(model.layer2(low[-1]))
    mid = model.layer3(low[-1])
    return low, mid, model.layer4(mid)


def stage_widths(model: torch.nn.Module) -> tuple[list[int], int]:
    """(channels of the stem, layer1 and layer2 outputs; channels of layer3's): the widths of stages()' outputs."""
    width = [model.bn1.num_features, *(layer[-1].conv1.in_channels for layer in (model.layer1, model.layer2))]
    return width, model.layer3[-1].conv1.in_channels


def trunk(model: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    return stages(model, x)[2]


def head(model: torch.nn.Module, features: torch.Tensor) -> torch.Tensor:
    return model.fc(torch.flatten(model.avgpool(features), 1))


def _min_max(cam: torch.Tensor) -> torch.Tensor:
    cam = cam - cam.amin(dim=(-2, -1), keepdim=True)
    return cam / (1e-7 + cam.amax(dim=(-2, -1), keepdim=True))


def gradcam_from_features(features: torch.Tensor, fc_weight: torch.Tensor, targets: list[int],
                          size: tuple[int, int]) -> np.ndarray:
    """(B, H, W) heatmaps in [0, 1] for one target class per image, from layer4 activations (B, C, h, w)."""
    a = features.detach().float()
    weights = fc_weight.detach().float()[targets] / (a.shape[-2] * a.shape[-1])     # (B, C)
    cam = torch.einsum("bc,bchw->bhw", weights, a).clamp(min=0)
    cam = F.interpolate(_min_max(cam)[:, None], size=size, mode="bilinear", align_corners=False)[:, 0]
    return _min_max(cam.clamp(min=0)).cpu().numpy()


def package_cam(model: torch.nn.Module, x: torch.Tensor, target: int, method: str) -> np.ndarray:
    """A heatmap from pytorch-grad-cam (forward + backward of its own)."""
    import pytorch_grad_cam
    from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget
    cam_class = getattr(pytorch_grad_cam, PACKAGE_METHODS[method])
    with cam_class(model=model, target_layers=[model.layer4[-1]]) as cam:
        result = cam(input_tensor=x, targets=[ClassifierOutputTarget(target)])
    return result[0]


def _jet_palette() -> list[int]:
    """The JET colour map (blue → red) for the 256 mask levels, as a flat PIL palette, without OpenCV."""
    x = np.linspace(0, 1, 256)[:, None]
    return np.uint8(255 * np.clip(1.5 - np.abs(4 * x - np.array([3, 2, 1])), 0, 1)).ravel().tolist()


JET_PALETTE = _jet_palette()


def overlay(photo: Image.Image, heat: np.ndarray, image_weight: float = 0.5) -> Image.Image:
    """Blend the coloured heatmap over the photo, like grad-cam's show_cam_on_image, in PIL's C code."""
    mask = Image.fromarray(np.uint8(np.clip(heat, 0, 1) * 255)).resize(photo.size, Image.BILINEAR)
    mask.putpalette(JET_PALETTE)
    return Image.blend(mask.convert("RGB"), photo, image_weight)
