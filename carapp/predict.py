"""Prediction with a Grad-CAM heatmap: the Python API the CLI and the app share.

    p = Predictor.load("checkpoints/run1")          # a run directory or a checkpoint file
    result = p.predict(Image.open("car.jpg"), top_k=5, cam=True)
    result.top   # [("Aurora Sprint", 0.93), ...] best first
    result.cam   # PIL image: the heatmap over the photo, or None
"""
from __future__ import annotations

import threading
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from .checkpoint import load_checkpoint, resolve_checkpoint
from .images import open_image
from .loader import build_transform, resize_size
from .model import model_from_checkpoint
from .runtime import pick_device

CAM_METHODS = {"gradcam": "GradCAM", "gradcam++": "GradCAMPlusPlus", "scorecam": "ScoreCAM",
               "eigencam": "EigenCAM", "layercam": "LayerCAM"}
CAM_DISPLAY_SIZE = (256, 448)  # the overlay's side: small photos are enlarged, large ones reduced


@dataclass
class Prediction:
    top: list[tuple[str, float]]
    cam: Image.Image | None = None
    explained: str | None = None    # the class the heatmap explains


class Predictor:
    def __init__(self, model: torch.nn.Module, labels: list[str], config: dict, device: str = "auto"):
        self.device = pick_device(device)
        self.model = model.to(self.device).eval()
        self.labels, self.config = labels, config
        self.image_size = int(config.get("image_size", 224))
        self.transform = build_transform(self.image_size, train=False)
        self._lock = threading.Lock()  # CAM hooks the model: one explanation at a time

    @classmethod
    def load(cls, path: str | Path, device: str = "auto") -> "Predictor":
        model, config, labels = model_from_checkpoint(load_checkpoint(resolve_checkpoint(path)))
        return cls(model, labels, config, device)

    def predict(self, image: Image.Image | str | Path, top_k: int = 5, cam: bool = True,
                method: str = "gradcam", target: int | str | None = None) -> Prediction:
        """Top-k (label, prob) best first; with cam, a heatmap for `target` (class index or name; top-1 default)."""
        if not isinstance(image, Image.Image):
            image = open_image(image)
        image = image.convert("RGB")
        x = self.transform(image).unsqueeze(0).to(self.device)
        with torch.inference_mode():
            probs = self.model(x).float().softmax(1)[0].cpu()
        values, idx = probs.topk(min(top_k, len(self.labels)))
        top = [(self.labels[i], float(v)) for v, i in zip(values.tolist(), idx.tolist())]
        if not cam:
            return Prediction(top)
        target_idx = self._class_index(target) if target is not None else int(idx[0])
        heat = self.heatmap(x, target_idx, method)
        return Prediction(top, overlay(image, heat, self.image_size), self.labels[target_idx])

    def _class_index(self, target: int | str) -> int:
        if isinstance(target, str):
            if target not in self.labels:
                raise ValueError(f"unknown class {target!r}")
            return self.labels.index(target)
        if not 0 <= target < len(self.labels):
            raise ValueError(f"class index {target} out of range 0..{len(self.labels) - 1}")
        return int(target)

    def heatmap(self, x: torch.Tensor, target: int, method: str = "gradcam") -> np.ndarray:
        """A [0, 1] map of the input's size from pytorch-grad-cam (imported only when a heatmap is asked for)."""
        if method not in CAM_METHODS:
            raise ValueError(f"unknown CAM method {method!r}; choose from {', '.join(CAM_METHODS)}")
        import pytorch_grad_cam
        from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget
        cam_class = getattr(pytorch_grad_cam, CAM_METHODS[method])
        with self._lock, cam_class(model=self.model, target_layers=[self.model.layer4[-1]]) as cam:
            return cam(input_tensor=x, targets=[ClassifierOutputTarget(target)])[0]


def overlay(image: Image.Image, heat: np.ndarray, image_size: int) -> Image.Image:
    """The heatmap over the part of the photo the network saw (the eval centre crop), at display size."""
    side = min(image.size) * image_size / resize_size(image_size)
    left, top = (image.width - side) / 2, (image.height - side) / 2
    display = min(CAM_DISPLAY_SIZE[1], max(CAM_DISPLAY_SIZE[0], round(side)))
    photo = image.crop((round(left), round(top), round(left + side), round(top + side))).resize(
        (display, display), Image.BICUBIC)
    mask = Image.fromarray(np.uint8(np.clip(heat, 0, 1) * 255)).resize((display, display), Image.BILINEAR)
    from pytorch_grad_cam.utils.image import show_cam_on_image
    rgb = np.asarray(photo, dtype=np.float32) / 255.0
    return Image.fromarray(show_cam_on_image(rgb, np.asarray(mask, dtype=np.float32) / 255.0, use_rgb=True))


_CACHE: dict[tuple[str, float], Predictor] = {}


def cached_predictor(source: str | Path) -> Predictor:
    """One Predictor per checkpoint file and version: loaded once, reloaded when best.pt is rewritten."""
    path = resolve_checkpoint(source)
    key = (str(path.resolve()), path.stat().st_mtime)
    if key not in _CACHE:
        if len(_CACHE) >= 4:
            _CACHE.pop(next(iter(_CACHE)))
        _CACHE[key] = Predictor.load(path)
    return _CACHE[key]
