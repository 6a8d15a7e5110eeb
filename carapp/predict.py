"""Prediction with a Grad-CAM heatmap: the Python API the CLI and the app share.

    p = Predictor.load("checkpoints/run1")  # a run directory, a checkpoint, an exported folder, or hf://owner/name
    result = p.predict(Image.open("car.jpg"), top_k=5, cam=True)
    result.top   # [("Aurora Sprint", 0.93), ...] best first
    result.cam   # PIL image: the heatmap over the photo, or None
"""
from __future__ import annotations

import threading
from dataclasses import dataclass
from pathlib import Path

import torch
from PIL import Image

from .cam import METHODS, gradcam_from_features, head, overlay, package_cam, trunk
from .checkpoint import load_checkpoint, resolve_checkpoint
from .images import open_image
from .loader import build_transform, resize_size, to_input
from .model import model_from_checkpoint
from .runtime import pick_device

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
        if self.device.type == "cuda":
            self.model = self.model.to(memory_format=torch.channels_last)
        self.labels, self.config = labels, config
        self.image_size = int(config.get("image_size", 224))
        self.transform = build_transform(self.image_size, train=False)
        self._lock = threading.Lock()  # pytorch-grad-cam hooks the model: one package CAM at a time

    @classmethod
    def load(cls, source: str | Path, device: str = "auto") -> "Predictor":
        """A run directory, a checkpoint file, an exported folder, or hf://owner/name[@revision]."""
        model, config, labels = load_source(source)
        return cls(model, labels, config, device)

    def predict(self, image: Image.Image | str | Path, top_k: int = 5, cam: bool = True,
                method: str = "gradcam", target: int | str | None = None) -> Prediction:
        """Top-k (label, prob) best first; with cam, a heatmap for `target` (class index or name; top-1 default)."""
        if not isinstance(image, Image.Image):
            image = open_image(image)
        return self.predict_many([image], top_k, cam, method, target)[0]

    def predict_many(self, images: list[Image.Image], top_k: int = 5, cam: bool = True, method: str = "gradcam",
                     target: int | str | None = None) -> list[Prediction]:
        """One batched forward pass for several photos; the default heatmaps come from that same pass."""
        if cam and method not in METHODS:
            raise ValueError(f"unknown CAM method {method!r}; choose from {', '.join(METHODS)}")
        images = [im.convert("RGB") for im in images]
        x = self.prepare(images)
        with torch.inference_mode():
            features = trunk(self.model, x)
            probs = head(self.model, features).float().softmax(1).cpu()
            values, idx = probs.topk(min(top_k, len(self.labels)))
            tops = [[(self.labels[i], float(v)) for v, i in zip(vs, ids)] for vs, ids in
                    zip(values.tolist(), idx.tolist())]
            if not cam:
                return [Prediction(top) for top in tops]
            targets = [self._class_index(target) if target is not None else int(ids[0]) for ids in idx]
            if method == "gradcam":  # from this very forward pass: no backward, no hooks
                heats = gradcam_from_features(features, self.model.fc.weight, targets, tuple(x.shape[-2:]))
        if method != "gradcam":
            with self._lock:
                heats = [package_cam(self.model, x[i:i + 1], t, method) for i, t in enumerate(targets)]
        return [Prediction(top, overlay(display_crop(im, self.image_size), heat), self.labels[t])
                for im, top, heat, t in zip(images, tops, heats, targets)]

    def prepare(self, images: list[Image.Image]) -> torch.Tensor:
        return to_input(torch.stack([self.transform(im) for im in images]), self.device, channels_last=True)

    def _class_index(self, target: int | str) -> int:
        if isinstance(target, str):
            if target not in self.labels:
                raise ValueError(f"unknown class {target!r}")
            return self.labels.index(target)
        if not 0 <= target < len(self.labels):
            raise ValueError(f"class index {target} out of range 0..{len(self.labels) - 1}")
        return int(target)


def display_crop(image: Image.Image, image_size: int) -> Image.Image:
    """The part of the photo the network saw (the eval centre crop), at display size."""
    side = min(image.size) * image_size / resize_size(image_size)
    left, top = (image.width - side) / 2, (image.height - side) / 2
    display = min(CAM_DISPLAY_SIZE[1], max(CAM_DISPLAY_SIZE[0], round(side)))
    return image.crop((round(left), round(top), round(left + side), round(top + side))).resize(
        (display, display), Image.BILINEAR)


def load_source(source: str | Path) -> tuple[torch.nn.Module, dict, list[str]]:
    from .export import hub_snapshot, is_export, load_exported
    if str(source).startswith("hf://"):
        return load_exported(hub_snapshot(str(source)))
    if is_export(Path(source)):
        return load_exported(Path(source))
    return model_from_checkpoint(load_checkpoint(resolve_checkpoint(source)))


_CACHE: dict[tuple[str, float], Predictor] = {}


def cached_predictor(source: str | Path) -> Predictor:
    """One Predictor per model and version: loaded once, reloaded when its weights file is rewritten."""
    from .export import is_export
    if str(source).startswith("hf://"):
        key = (str(source), 0.0)  # a Hub revision does not change under us within a session
    else:
        version = Path(source) / "config.json" if is_export(Path(source)) else resolve_checkpoint(source)
        key = (str(version.resolve()), version.stat().st_mtime)
    if key not in _CACHE:
        if len(_CACHE) >= 4:
            _CACHE.pop(next(iter(_CACHE)))
        _CACHE[key] = Predictor.load(source)
    return _CACHE[key]
