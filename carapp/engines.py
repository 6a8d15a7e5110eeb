"""What runs the network over batches of a collection: PyTorch, or ONNX Runtime (float or int8) on CPUs.

Every engine takes a uint8 batch (N, 3, H, W) as the loader makes it and returns (logits, pooled layer3 features) as
float32 numpy arrays: what Calibration.answers reads. On a 2-core CPU, ONNX Runtime runs ResNet-50 about 1.9x
faster than PyTorch eager at batch 16, with the same top-1 on every photo; int8 (static quantisation, calibrated on
the first photos of the collection) is faster still, at a small cost in agreement (bench/analyze_throughput.py).
"""
from __future__ import annotations

import contextlib
import hashlib
import importlib.util
import json
import logging
import os
from pathlib import Path

import numpy as np
import torch

from .atomic import atomic_path
from .cache import cache_dir
from .dataset.loader import IMAGENET_MEAN, IMAGENET_STD, to_input
from .evaluation.evaluate import FEATURES_VERSION, forward
from .saved import model_version

log = logging.getLogger("carapp")
ENGINES = ("auto", "torch", "onnx", "int8")
ONNX_OPSET = 18
KEEP_ENGINES = 4          # shared ONNX exports kept in the cache, the most recently used
# Photos (at 224 px) from which auto exports to ONNX: on a 2-core CPU ONNX Runtime takes a ResNet-50 38 ms a photo
# against PyTorch's 72 (docs/BENCHMARKS.md), so a ~30 s export is won back after ~900 photos.
EXPORT_PAYS_OFF = 1000


class TorchEngine:
    def __init__(self, model: torch.nn.Module, device: torch.device):
        self.model, self.device = model, device

    @torch.inference_mode()
    def __call__(self, images: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
        logits, features, _ = forward(self.model, to_input(images, self.device, channels_last=True))
        return logits.float().cpu().numpy(), features.float().cpu().numpy()


class WithFeatures(torch.nn.Module):
    """The classifier with the "not a car" features as a second output, for export."""

    def __init__(self, model: torch.nn.Module):
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor):
        logits, features, _ = forward(self.model, x)
        return logits, features


def onnx_session(path: Path):
    import onnxruntime as ort
    options = ort.SessionOptions()
    options.intra_op_num_threads = os.cpu_count() or 1
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


class OnnxEngine:
    def __init__(self, path: Path):
        self.session = onnx_session(path)
        self.mean = np.array(IMAGENET_MEAN, dtype=np.float32).reshape(1, 3, 1, 1)
        self.std = np.array(IMAGENET_STD, dtype=np.float32).reshape(1, 3, 1, 1)

    def prepare(self, images: torch.Tensor) -> np.ndarray:
        return ((images.numpy().astype(np.float32) / 255.0 - self.mean) / self.std).astype(np.float32)

    def __call__(self, images: torch.Tensor) -> tuple[np.ndarray, np.ndarray | None]:
        outputs = self.session.run(None, {"image": self.prepare(images)})
        return outputs[0], outputs[1] if len(outputs) > 1 else None  # exports older than the features output


def export_with_features(model: torch.nn.Module, image_size: int, path: Path) -> Path:
    """ONNX (opset 18, dynamic batch) with outputs logits and features; written to a temp name, then renamed."""
    batch = torch.export.Dim("batch", min=1, max=1024)
    with atomic_path(path) as tmp:
        torch.onnx.export(WithFeatures(model).eval(), (torch.randn(2, 3, image_size, image_size),), str(tmp),
                          input_names=["image"], output_names=["logits", "features"], opset_version=ONNX_OPSET,
                          dynamic_shapes={"x": {0: batch}}, dynamo=True, external_data=False, verbose=False)
    return path


def quantize(float_model: Path, path: Path, calibration: list[np.ndarray]) -> Path:
    """Static int8 quantisation (QDQ, per-channel weights), activations calibrated on a few real batches."""
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    class Batches(CalibrationDataReader):
        def __init__(self):
            self.batches = iter(calibration)

        def get_next(self):
            batch = next(self.batches, None)
            return None if batch is None else {"image": batch}

    prepared = path.with_name(f".{path.name}.{os.getpid()}.pre.onnx")  # scratch: the pre-processed float model
    try:
        with atomic_path(path) as tmp:
            quant_pre_process(str(float_model), str(prepared))
            quantize_static(str(prepared), str(tmp), Batches(), quant_format=QuantFormat.QDQ, per_channel=True,
                            weight_type=QuantType.QInt8, activation_type=QuantType.QUInt8)
    finally:
        prepared.unlink(missing_ok=True)
    return path


def shared_onnx_path(predictor, source: str | Path) -> Path:
    """Where the ONNX export of the model behind `source` lives in the engine cache: one file per model version
    (its weights file and their mtime, its labels, input size, the exporting torch and what its features hold),
    shared by every analysis of it, the app's and the CLI's. An export is a ~94 MB file and ~30 s of a 2-core CPU
    for a ResNet-50."""
    return _cached_export("model", [list(model_version(source)), predictor.labels, predictor.image_size,
                                    torch.__version__, FEATURES_VERSION])


def _cached_export(kind: str, key: list) -> Path:
    """An export's place in the engine cache: its kind, then a hash of what makes it (_made_once prunes per kind)."""
    return cache_dir("engines") / f"{kind}-{hashlib.sha256(json.dumps(key).encode()).hexdigest()[:16]}.onnx"


def export_shared(predictor, path: Path) -> Path:
    """The shared export, made on first use."""
    return _made_once(path, "the model", lambda: export_with_features(predictor.model.cpu(), predictor.image_size,
                                                                       path))


def _made_once(path: Path, what: str, export) -> Path:
    """`path`, exported on first use; of its kind (the name up to its key) the least recently used beyond
    KEEP_ENGINES are deleted."""
    if path.is_file():
        with contextlib.suppress(OSError):
            os.utime(path)  # used now: the last to be pruned
        return path
    path.parent.mkdir(parents=True, exist_ok=True)
    log.info("exporting %s to ONNX for ONNX Runtime (once, kept in %s)", what, path.parent)
    export()
    kind = path.name.split("-")[0]
    for old in sorted(path.parent.glob(f"{kind}-*.onnx"), key=lambda f: f.stat().st_mtime)[:-KEEP_ENGINES]:
        old.unlink(missing_ok=True)
    return path


class DetectorCore(torch.nn.Module):
    """An FCOS detector's backbone and head, where its time goes (~2x faster in ONNX Runtime on a 2-core CPU):
    torchvision's transform before and box decoding after stay in PyTorch, so the boxes are the same."""

    def __init__(self, fcos: torch.nn.Module):
        super().__init__()
        self.backbone, self.head = fcos.backbone, fcos.head

    def forward(self, x: torch.Tensor):
        out = self.head(list(self.backbone(x).values()))
        return out["cls_logits"], out["bbox_regression"], out["bbox_ctrness"]


def detector_onnx_path(source: str | Path) -> Path:
    """Where the ONNX export of the detector behind `source` lives in the engine cache, one per detector version."""
    return _cached_export("detector", [list(model_version(source)), torch.__version__])


def export_detector_shared(fcos: torch.nn.Module, path: Path) -> Path:
    """The detector's shared export, made on first use (~20 s on a 2-core CPU)."""
    return _made_once(path, "the detector", lambda: _export_detector(fcos, path))


def _export_detector(fcos: torch.nn.Module, path: Path) -> None:
    batch, h, w = (torch.export.Dim(n, min=1, max=m) for n, m in (("batch", 1024), ("h", 128), ("w", 128)))
    with atomic_path(path) as tmp:  # torchvision's transform pads a batch to multiples of 32
        torch.onnx.export(DetectorCore(fcos).cpu().eval(), (torch.zeros(2, 3, 192, 256),), str(tmp),
                          input_names=["image"], output_names=["cls_logits", "bbox_regression", "bbox_ctrness"],
                          opset_version=ONNX_OPSET, dynamic_shapes={"x": {0: batch, 2: 32 * h, 3: 32 * w}},
                          dynamo=True, external_data=False, verbose=False)


def pick_engine(name: str, device: torch.device, work: float, exported: bool) -> str:
    """auto: ONNX Runtime on CPUs when it is installed and pays: the model is exported already, or the job is
    large enough (`work`: photos at 224 px, scaled by their pixels) that the export's time is won back. PyTorch on
    GPUs and for small jobs, so that auto never makes a job slower than PyTorch alone."""
    if name != "auto":
        return name
    if device.type != "cpu" or importlib.util.find_spec("onnxruntime") is None:
        return "torch"
    return "onnx" if exported or work >= EXPORT_PAYS_OFF else "torch"


def detector_engine(detector, engine: str, photos: int) -> None:
    """carapp's own detector (FCOS) runs its backbone and head in ONNX Runtime by the classifier's rule: asked for
    (onnx; under int8 the detector stays float), or on a CPU when exported already or `photos` win the export back."""
    if detector is None or not detector.exportable:
        return
    path = detector_onnx_path(detector.source)
    if pick_engine("onnx" if engine == "int8" else engine, detector.device, photos, path.is_file()) == "onnx":
        detector.run_in_onnx(onnx_session(export_detector_shared(detector.model, path)))
