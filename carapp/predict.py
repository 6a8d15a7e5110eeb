"""Prediction with a Grad-CAM heatmap: the Python API the CLI and the app share.

    p = Predictor.load("checkpoints/run1")  # a run directory, a checkpoint, an exported folder, or hf://owner/name
    result = p.predict(Image.open("car.jpg"), top_k=5, cam=True)
    result.top      # [("Aurora Sprint", 0.93), ...] best first, calibrated when the run has calibration.json
    result.status   # "model" | "make" (model unsure, make confident) | "unsure" | "no-car"
    result.make     # ("Aurora", 0.97): the most likely make, its probability summed over its models
    result.cam      # PIL image: the heatmap over the whole photo with the region the network saw outlined, or None
"""
from __future__ import annotations

import dataclasses
import threading
from dataclasses import dataclass
from pathlib import Path

import torch
from PIL import Image, ImageDraw

from . import rundir
from .cam import METHODS, gradcam_from_features, overlay, package_cam
from .dataset.images import open_image
from .dataset.loader import build_transform, letterbox_box, resize_size, to_input
from .car_crops import BOX, DEFAULT_CONTEXT, car_crop, mark_small, min_box_side
from .detection.model import Box, Detector
from .engines import OnnxEngine
from .evaluation.answers import Calibration, class_makes_of, first_words
from .evaluation.evaluate import forward
from .runtime import pick_device
from .saved import load_model, model_version, onnx_export

CAM_DISPLAY_SIZE = (256, 448)  # the overlay's side: small photos are enlarged, large ones reduced


@dataclass
class Prediction:
    top: list[tuple[str, float]]
    cam: Image.Image | None = None
    explained: str | None = None            # the class the heatmap explains
    status: str = "model"                   # model | make | unsure | no-car
    make: tuple[str, float] | None = None
    makes: list[tuple[str, float]] | None = None
    ood_score: float | None = None
    ood_signal: str | None = None           # which "not a car" signal set ood_score
    reason: str = ""                        # why this status, in words
    box: list[float] | None = None          # with a detector: this car's box in the photo (x1, y1, x2, y2) ...
    det_score: float | None = None          # ... and the detector's score for it
    cars: list["Prediction"] | None = None  # with a detector, for the photo: every car; the fields above: the largest

    @classmethod
    def of(cls, answer) -> "Prediction":
        return cls(answer.top, None, None, answer.status, answer.make, answer.makes, answer.ood_score,
                   answer.ood_signal, answer.reason)

    def to_json(self) -> dict:
        return {"status": self.status, "top": [{"label": n, "prob": p} for n, p in self.top],
                "make": {"label": self.make[0], "prob": self.make[1]} if self.make else None,
                "makes": [{"label": n, "prob": p} for n, p in self.makes or []], "ood_score": self.ood_score,
                "ood_signal": self.ood_signal, "reason": self.reason,
                **({"box": self.box, "score": self.det_score} if self.box is not None else {}),
                **({"cars": [car.to_json() for car in self.cars]} if self.cars is not None else {})}


class Predictor:
    """A model with its calibration: PyTorch (heatmaps included), or ONNX Runtime for an ONNX export (`onnx_file`;
    answers and the "not a car" score, no heatmap)."""

    def __init__(self, model: torch.nn.Module | None, labels: list[str], config: dict, device: str = "auto",
                 calibration: Calibration | None = None, onnx_file: Path | None = None):
        self.device = pick_device(device) if onnx_file is None else torch.device("cpu")
        self.model = model.to(self.device).eval() if model is not None else None
        if self.device.type == "cuda":
            self.model = self.model.to(memory_format=torch.channels_last)
        self.onnx_file = onnx_file
        self.onnx = OnnxEngine(onnx_file) if onnx_file is not None else None
        self.labels, self.config = labels, config
        self.calibration = calibration or Calibration(labels, first_words(labels))
        self.image_size = int(config.get("image_size", 224))
        self.resize = config.get("resize", "crop")  # the run's own choice: crop or letterbox, as it trained
        self.transform = build_transform(self.image_size, train=False, resize=self.resize)
        self._lock = threading.Lock()  # pytorch-grad-cam hooks the model: one package CAM at a time

    @classmethod
    def load(cls, source: str | Path, device: str = "auto") -> "Predictor":
        """A run directory, a checkpoint file, an exported folder, or hf://owner/name[@revision]; the calibration
        beside the model (calibration.json, feature_bank.npz, feature_stats.npz) comes along when there is one."""
        folder = onnx_export(source)
        if folder is not None:
            labels = [c["name"] for c in rundir.read_json(folder / "labels.json", [])]
            config = (rundir.read_json(folder / "config.json") or {}).get("training", {})
            return cls(None, labels, config, device, Calibration.load(folder, labels, class_makes_of(folder, labels)),
                       onnx_file=folder / "model.onnx")
        model, config, labels, folder = load_model(source)
        calibration = Calibration.load(folder, labels, class_makes_of(folder, labels))
        return cls(model, labels, config, device, calibration)

    def describe(self) -> str:
        """One line about the model, for people: backbone, classes, input size, calibration."""
        backbone = self.config.get("backbone", "ResNet")
        return (f"{backbone} · {len(self.labels)} classes · {self.image_size} px input · "
                + ("calibrated" if self.calibration.calibrated else "not calibrated")
                + (" · ONNX Runtime (no heatmap)" if self.onnx else ""))

    def predict(self, image: Image.Image | str | Path, top_k: int = 5, cam: bool = True,
                method: str = "gradcam", target: int | str | None = None, tta: bool = False,
                thresholds: dict | None = None, detector: Detector | None = None) -> Prediction:
        """Top-k (label, prob) best first with the answer's status; with cam, a heatmap for `target` (class index
        or name; top-1 default); tta averages with the mirrored photo; thresholds override the calibrated ones.
        With a detector, one answer per car (`cars`), the top level describing the largest."""
        if not isinstance(image, Image.Image):
            image = open_image(image)
        if detector is not None:
            return self.predict_cars([image], detector, top_k, cam, method, tta, thresholds)[0]
        return self.predict_many([image], top_k, cam, method, target, tta, thresholds)[0]

    @property
    def crop_rule(self) -> dict:
        """How a detected car is cropped for this model: as calibrate measured it, else by how it trained."""
        return self.calibration.car_crop or (dict(BOX) if self.config.get("crop_bbox") else dict(DEFAULT_CONTEXT))

    @property
    def min_box(self) -> int:
        """Cars whose box's shorter side is below this are `small`, not named (car_crops.min_box_side)."""
        return min_box_side(self.crop_rule, self.image_size)

    def predict_cars(self, images: list[Image.Image], detector: Detector, top_k: int = 5, cam: bool = False,
                     method: str = "gradcam", tta: bool = False, thresholds: dict | None = None,
                     min_box: int | None = None) -> list[Prediction]:
        """Per photo: every car the detector finds, cropped as this model trained and answered in one batch; the
        photo's own fields are its largest car's (a photo without a car: `no-car`, saying so)."""
        images = [im.convert("RGB") for im in images]
        return self.answer_cars(images, detector.detect(images), detector, top_k, cam, method, tta, thresholds,
                                min_box)

    def answer_cars(self, images: list[Image.Image], found: list[list[Box]], detector: Detector, top_k: int = 5,
                    cam: bool = False, method: str = "gradcam", tta: bool = False, thresholds: dict | None = None,
                    min_box: int | None = None) -> list[Prediction]:
        """predict_cars for boxes already found (`found[i]`: the cars of RGB photo i)."""
        min_box = self.min_box if min_box is None else min_box
        crops = [(i, box, car_crop(images[i], box.as_list(), self.crop_rule)) for i, boxes in enumerate(found)
                 for box in boxes]
        answers = self.predict_many([c for _, _, c in crops], top_k, cam, method, None, tta, thresholds,
                                    cars=True) if crops else []
        cars: list[list[Prediction]] = [[] for _ in images]
        for (i, box, _), car in zip(crops, answers):
            car.box, car.det_score = box.as_list(), box.score
            mark_small(car, box.short_side, min_box)
            cars[i].append(car)
        empty = [i for i, mine in enumerate(cars) if not mine]
        whole = dict(zip(empty, self.predict_many([images[i] for i in empty], top_k, cam, method, None, tta,
                                                  thresholds))) if empty else {}
        return [_photo_answer(mine, whole.get(i), detector) for i, mine in enumerate(cars)]

    def predict_many(self, images: list[Image.Image], top_k: int = 5, cam: bool = True, method: str = "gradcam",
                     target: int | str | None = None, tta: bool = False, thresholds: dict | None = None,
                     cars: bool = False) -> list[Prediction]:
        """One batched forward pass for several photos; the default heatmaps come from that same pass. `cars`: the
        photos are crops of cars a detector found (judged "not a car" by trust.CAR_SIGNALS alone)."""
        if cam and method not in METHODS:
            raise ValueError(f"unknown CAM method {method!r}; choose from {', '.join(METHODS)}")
        images = [im.convert("RGB") for im in images]
        if self.onnx is not None:
            return self._predict_onnx(images, top_k, tta, thresholds, cars)
        x = self.prepare(images)
        with torch.inference_mode():
            logits, pooled, features = forward(self.model, x, tta)
            answers = self.calibration.answers(logits.float().cpu().numpy(), pooled.float().cpu().numpy(),
                                               min(top_k, len(self.labels)), thresholds, cars)
            preds = [Prediction.of(a) for a in answers]
            if not cam:
                return preds
            targets = [self._class_index(target) if target is not None else self.labels.index(a.top[0][0])
                       for a in answers]
            if method == "gradcam":  # from this very forward pass: no backward, no hooks
                heats = gradcam_from_features(features, self.model.fc.weight, targets, tuple(x.shape[-2:]))
        if method != "gradcam":
            with self._lock:
                heats = [package_cam(self.model, x[i:i + 1], t, method) for i, t in enumerate(targets)]
        for pred, im, heat, t in zip(preds, images, heats, targets):
            pred.cam, pred.explained = overlay_on_photo(im, heat, self.image_size, self.resize), self.labels[t]
        return preds

    def _predict_onnx(self, images: list[Image.Image], top_k: int, tta: bool, thresholds: dict | None, cars: bool):
        batch = torch.stack([self.transform(im) for im in images])
        logits, pooled = self.onnx(batch)
        if tta:  # as forward() does: the logits averaged with the mirrored photo's
            logits = (logits + self.onnx(batch.flip(-1))[0]) / 2
        answers = self.calibration.answers(logits, pooled, min(top_k, len(self.labels)), thresholds, cars)
        return [Prediction.of(a) for a in answers]

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


def _photo_answer(cars: list[Prediction], whole: Prediction | None, detector: Detector) -> Prediction:
    """A photo's answer: its largest named car's fields (the largest of all when none is named) and every car."""
    if not cars:
        whole.status, whole.ood_signal, whole.cars = "no-car", "detector", []
        whole.reason = detector.no_car_reason
        return whole
    named = [c for c in cars if c.status != "small"] or cars
    main = max(named, key=lambda c: (c.box[2] - c.box[0]) * (c.box[3] - c.box[1]))
    return dataclasses.replace(main, cars=cars)


def seen_region(size: tuple[int, int], image_size: int, resize: str = "crop") -> tuple[float, float, float, float]:
    """The box of the photo the network saw: the eval transform's centre crop, in the photo's pixels (pad: all)."""
    width, height = size
    if resize == "pad":
        return 0.0, 0.0, float(width), float(height)
    side = min(size) * image_size / resize_size(image_size)
    left, top = (width - side) / 2, (height - side) / 2
    return left, top, left + side, top + side


def overlay_on_photo(image: Image.Image, heat, image_size: int, resize: str = "crop") -> Image.Image:
    """The heatmap over the region the network saw, outlined, inside the whole photo at display size: a user sees
    what was cut away as well as what counted. The cut-away margins are dimmed."""
    scale = min(CAM_DISPLAY_SIZE[1], max(CAM_DISPLAY_SIZE[0], max(image.size))) / max(image.size)
    photo = image.resize((max(1, round(image.width * scale)), max(1, round(image.height * scale))), Image.BILINEAR)
    box = tuple(round(v * scale) for v in seen_region(image.size, image_size, resize))
    if resize == "pad":  # the heatmap covers the padded square: keep the part over the photo
        left, top, right, bottom = letterbox_box(image.size, image_size)
        heat = heat[top:bottom, left:right]
    canvas = Image.blend(Image.new("RGB", photo.size), photo, 0.6)
    canvas.paste(overlay(photo.crop(box), heat), box[:2])
    ImageDraw.Draw(canvas).rectangle((box[0], box[1], box[2] - 1, box[3] - 1), outline=(255, 255, 255),
                                     width=max(1, photo.width // 200))
    return canvas


_CACHE: dict[tuple, Predictor] = {}


def cached_predictor(source: str | Path, device: str = "auto") -> Predictor:
    """One Predictor per model, version and device: loaded once, reloaded when its weights file is rewritten."""
    key = (*model_version(source), device)
    if key not in _CACHE:
        if len(_CACHE) >= 4:
            _CACHE.pop(next(iter(_CACHE)))
        _CACHE[key] = Predictor.load(source, device)
    return _CACHE[key]
