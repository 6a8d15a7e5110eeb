"""Car detectors on torchvision's detection API, and the one object that runs any of them: `Detector`.

- carapp's own (`train-detector`): FCOS (Tian et al. 2019, torchvision's implementation) on a small ResNet trunk
  (one BasicBlock a stage, up to layer3) with a 64-channel feature pyramid, at 256 x 192 pixels: small enough to train
  from scratch on a 2-core CPU in minutes, and cars are simple objects next to COCO's eighty.
- `coco`: torchvision's COCO-trained Faster R-CNN (MobileNetV3-Large FPN), its "car" class (with --vehicles also
  bus and truck), weights through torchvision's weights API and the torch hub cache, like `--weights imagenet`.
"""
from __future__ import annotations

import copy
import socket
from dataclasses import dataclass
from pathlib import Path

import torch
import torchvision
from PIL import Image
from torchvision.models.detection import FCOS
from torchvision.models.detection.anchor_utils import AnchorGenerator
from torchvision.models.detection.backbone_utils import BackboneWithFPN
from torchvision.models.detection.fcos import FCOSHead
from torchvision.models.resnet import BasicBlock, ResNet
from torchvision.ops.feature_pyramid_network import LastLevelP6P7
from torchvision.transforms.v2 import functional as TF

from ..checkpoint import CheckpointError, load_checkpoint, resolve_checkpoint
from ..runtime import pick_device

DETECTOR_KIND = "carapp-detector"   # what a detector checkpoint says it is (a classifier's best.pt is not one)
INPUT_SIZE = (256, 192)             # width, height the detector sees (its mosaics; photos are scaled to fit it)
PYRAMID = 64                        # channels of the feature pyramid and the head
CANDIDATE_SCORE = 0.05              # the least score FCOS decodes a box for (every one counts for AP)
MIN_SCORE = 0.3                     # detections below this score are not cars (a trained detector brings its own)
CONTAINED = 0.7                     # a box this much inside a better one is part of that car (without_parts)
COCO_VEHICLES = {"car": ("car",), "vehicles": ("car", "bus", "truck")}


def build_detector() -> FCOS:
    """carapp's detector, untrained: FCOS on a 4-block ResNet trunk with a small feature pyramid."""
    trunk = ResNet(BasicBlock, [1, 1, 1, 1])
    backbone = BackboneWithFPN(trunk, {"layer2": "0", "layer3": "1"}, [128, 256], PYRAMID,
                               extra_blocks=LastLevelP6P7(PYRAMID, PYRAMID))
    anchors = AnchorGenerator(((16,), (32,), (64,), (128,)), ((1.0,),) * 4)  # strides 8-64: one size per level
    return FCOS(backbone, num_classes=2, min_size=INPUT_SIZE[1], max_size=INPUT_SIZE[0],
                anchor_generator=anchors, head=FCOSHead(PYRAMID, 1, 2, num_convs=2), score_thresh=CANDIDATE_SCORE,
                nms_thresh=0.5, detections_per_img=30)


@dataclass
class Box:
    x1: float
    y1: float
    x2: float
    y2: float
    score: float

    @property
    def short_side(self) -> float:
        return min(self.x2 - self.x1, self.y2 - self.y1)

    def as_list(self) -> list[float]:
        return [round(self.x1, 1), round(self.y1, 1), round(self.x2, 1), round(self.y2, 1)]


class Detector:
    """A detection model with the labels that count as a car and the score a car needs; `detect` takes photos."""

    def __init__(self, model: torch.nn.Module, car_labels: tuple[int, ...], source: str, min_score: float = MIN_SCORE):
        self.model = model.eval()
        self.car_labels, self.source, self.min_score = car_labels, source, min_score
        self.device = torch.device("cpu")
        self.onnx = None                # an ONNX Runtime session of backbone and head (run_in_onnx), or PyTorch's
        self._levels: dict[tuple, list[tuple[int, int]]] = {}
        self._decoders: dict[float, torch.nn.Module] = {}  # by the least score decoded (_decoder)

    @property
    def exportable(self) -> bool:
        """carapp's own FCOS: its backbone and head can run in ONNX Runtime (COCO's Faster R-CNN stays in PyTorch)."""
        return isinstance(self.model, FCOS)

    def run_in_onnx(self, session) -> Detector:
        """Backbone and head in this ONNX Runtime session of engines.DetectorCore (carapp's FCOS, on a CPU)."""
        self.onnx = session
        return self

    def to(self, device: str | torch.device) -> Detector:
        self.device = torch.device(device)
        self.model.to(self.device)
        return self

    @property
    def name(self) -> str:
        """The detector by a short name, for answers people read (a run's folder name, never a server path)."""
        path = Path(self.source)
        return (path.parent if path.suffix == ".pt" else path).name

    @property
    def no_car_reason(self) -> str:
        return (f"Not a car: the detector ({self.name}) found no car in this photo (no box scores "
                f"{self.min_score:.2f} or more).")

    @torch.inference_mode()
    def detect(self, photos: list[Image.Image], batch_size: int = 8,
               min_score: float | None = None) -> list[list[Box]]:
        """The cars of each photo, best score first, in the photo's pixels; `min_score` instead of the operating
        score (evaluation keeps every candidate for AP)."""
        min_score = self.min_score if min_score is None else min_score
        found = []
        for start in range(0, len(photos), batch_size):
            chunk = photos[start:start + batch_size]
            small = [self._input_photo(p) for p in chunk]
            batch = [TF.to_dtype(TF.to_image(p), torch.float32, scale=True).to(self.device) for p in small]
            for out, photo, seen in zip(self._forward(batch, min_score), chunk, small):
                out = {k: v.cpu() for k, v in out.items()}
                keep = (out["scores"] >= min_score) & torch.isin(out["labels"], torch.tensor(self.car_labels))
                boxes, scores = out["boxes"][keep], out["scores"][keep]
                boxes = boxes * torch.tensor([photo.width / seen.width, photo.height / seen.height] * 2)
                kept = without_parts(boxes, scores)
                found.append([Box(*map(float, boxes[i]), float(scores[i])) for i in kept])
        return found

    def _input_photo(self, photo: Image.Image) -> Image.Image:
        """The photo (RGB) at the size the model's transform would scale it to, scaled by PIL: an antialiased
        reduction as the training mosaics' cells had (the transform's interpolation aliases a 3x reduction), and
        far less to normalise and copy than the whole photo. One already small enough is left as it is, and so is any
        photo for a model without torchvision's detection transform (it takes photos as they are)."""
        transform = getattr(self.model, "transform", None)
        scale = (min(transform.min_size[-1] / min(photo.size), transform.max_size / max(photo.size))
                 if transform is not None else 1.0)
        if photo.mode not in ("RGB", "L"):  # transparency and palettes: as RGB shows them, before any scaling
            photo = photo.convert("RGB")
        if scale < 1:
            photo = photo.resize((max(1, round(photo.width * scale)), max(1, round(photo.height * scale))),
                                 Image.BILINEAR)
        return photo.convert("RGB")

    def _forward(self, batch: list[torch.Tensor], min_score: float) -> list[dict]:
        model = self._decoder(min_score)
        return model(batch) if self.onnx is None else self._forward_onnx(model, batch)

    def _decoder(self, min_score: float) -> torch.nn.Module:
        """carapp's FCOS decoding only the candidates that can reach `min_score`, not every one down to
        CANDIDATE_SCORE that a prediction drops at once: a shallow copy with a threshold of its own and the same
        weights, as threads may share self.model. A box NMS keeps at `min_score` or more is only ever suppressed by a
        better one, so the boxes given are the same."""
        if not isinstance(self.model, FCOS):
            return self.model
        if min_score not in self._decoders:
            decoder = copy.copy(self.model)
            decoder.score_thresh = max(self.model.score_thresh, min_score - 1e-6)
            self._decoders[min_score] = decoder
        return self._decoders[min_score]

    def _forward_onnx(self, model: torch.nn.Module, batch: list[torch.Tensor]) -> list[dict]:
        """torchvision FCOS's forward at inference with its backbone and head in ONNX Runtime: the same transform,
        anchors and box decoding, hence the same boxes."""
        sizes = [tuple(photo.shape[-2:]) for photo in batch]
        images, _ = model.transform(batch)
        outputs = self.onnx.run(None, {"image": images.tensors.numpy()})
        head = dict(zip(("cls_logits", "bbox_regression", "bbox_ctrness"), map(torch.from_numpy, outputs)))
        levels = self._level_sizes(tuple(images.tensors.shape[-2:]))
        anchors = model.anchor_generator(images, [torch.empty(1, 0, h, w) for h, w in levels])  # reads sizes only
        counts = [h * w for h, w in levels]
        split = {name: list(value.split(counts, dim=1)) for name, value in head.items()}
        found = model.postprocess_detections(split, [list(a.split(counts)) for a in anchors], images.image_sizes)
        return model.transform.postprocess(found, images.image_sizes, sizes)

    def _level_sizes(self, size: tuple[int, int]) -> list[tuple[int, int]]:
        """The feature pyramid's (height, width) per level for a batch of this size, from one PyTorch pass."""
        if size not in self._levels:
            self._levels[size] = [tuple(f.shape[-2:]) for f in self.model.backbone(torch.zeros(1, 3, *size)).values()]
        return self._levels[size]


def without_parts(boxes: torch.Tensor, scores: torch.Tensor, contained: float = CONTAINED) -> list[int]:
    """Best score first, the boxes not lying mostly inside a better one (intersection over the smaller box's area
    >= `contained`): NMS at IoU 0.5 keeps a box on the front half of a large car, which is no second car."""
    order = torch.argsort(scores, descending=True).tolist()
    area = (boxes[:, 2] - boxes[:, 0]).clamp(min=0) * (boxes[:, 3] - boxes[:, 1]).clamp(min=0)
    kept: list[int] = []
    for i in order:
        lt, rb = torch.max(boxes[i, :2], boxes[kept, :2]), torch.min(boxes[i, 2:], boxes[kept, 2:])
        inter = (rb - lt).clamp(min=0).prod(-1)
        if not kept or bool((inter / torch.minimum(area[i], area[kept]).clamp(min=1e-9) < contained).all()):
            kept.append(i)
    return kept


def load_detector(spec: str | Path | None, vehicles: bool = False, device: str = "auto") -> Detector | None:
    """`--detector`: none (or empty), coco, a detector run directory or its checkpoint file; on the GPU where there
    is one (`device` as runtime.pick_device takes it)."""
    detector = _load_detector(spec, vehicles)
    return detector.to(pick_device(device)) if detector is not None else None


def _load_detector(spec: str | Path | None, vehicles: bool) -> Detector | None:
    if spec in (None, "", "none"):
        return None
    if str(spec) == "coco":
        return _coco_detector(vehicles)
    path = resolve_checkpoint(spec)
    ckpt = load_checkpoint(path)
    if ckpt.get("kind") != DETECTOR_KIND:
        raise CheckpointError(f"{path} is not a carapp detector (train one with `python -m carapp train-detector`, "
                              f"or use --detector coco)")
    model = build_detector()
    model.load_state_dict(ckpt["model"])
    # the operating score chosen on its validation mosaics (best F1), recorded with the weights
    return Detector(model, (1,), str(spec), float(ckpt.get("metrics", {}).get("min_score", MIN_SCORE)))


_CACHE: dict[tuple, Detector] = {}


def cached_detector(spec: str, vehicles: bool = False, device: str = "auto") -> Detector | None:
    """load_detector, once per detector, version (a retrained run's best.pt is read again) and device."""
    if spec in (None, "", "none"):
        return None
    from ..saved import model_version
    key = (model_version(spec) if str(spec) != "coco" else "coco", vehicles, device)
    if key not in _CACHE:
        if len(_CACHE) >= 2:
            _CACHE.pop(next(iter(_CACHE)))
        _CACHE[key] = load_detector(spec, vehicles, device)
    return _CACHE[key]


def _coco_detector(vehicles: bool) -> Detector:
    weights = torchvision.models.detection.FasterRCNN_MobileNet_V3_Large_FPN_Weights.COCO_V1
    old_timeout = socket.getdefaulttimeout()
    socket.setdefaulttimeout(15)  # a closed network must not hang the app
    try:
        state = weights.get_state_dict(progress=False, check_hash=False)
    except Exception as exc:  # no network and no cached file
        raise OSError(f"the COCO detector's weights are not available offline ({type(exc).__name__}): put "
                      f"{weights.url.rsplit('/', 1)[-1]} (from {weights.url}) in "
                      f"{Path(torch.hub.get_dir()) / 'checkpoints'}, or train one: python -m carapp "
                      f"train-detector") from None
    finally:
        socket.setdefaulttimeout(old_timeout)
    model = torchvision.models.detection.fasterrcnn_mobilenet_v3_large_fpn(weights=None, weights_backbone=None)
    model.load_state_dict(state)
    names = weights.meta["categories"]
    labels = tuple(names.index(n) for n in COCO_VEHICLES["vehicles" if vehicles else "car"])
    return Detector(model, labels, "coco")
