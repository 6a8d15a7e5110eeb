"""Evaluate a run's best checkpoint on one split: top-1, top-5, macro-F1, per-class accuracy, confusion matrix.

    python -m carapp evaluate --run checkpoints/run1 [--split test] [--json]

Writes <split>_metrics.json, <split>_per_class.csv, <split>_confusion.csv and <split>_predictions.csv in the run.
"""
from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
import torch

from . import rundir
from .checkpoint import CheckpointError, load_checkpoint, resolve_checkpoint
from .config import TrainConfig
from .data import index_dataset
from .loader import CarImages, build_transform, make_loader, to_input
from .model import model_from_checkpoint
from .resized import ResizedCache
from .runtime import autocast, pick_device


@torch.inference_mode()
def predict_probs(model, loader, device, amp: bool = True) -> tuple[np.ndarray, np.ndarray, list[int]]:
    """Softmax probabilities, true labels, and the dataset indices that were readable."""
    probs, labels, kept = [], [], []
    for batch in loader:
        if batch.images is None:
            continue
        with autocast(device, amp):
            logits = model(to_input(batch.images, device, channels_last=True))
        probs.append(logits.float().softmax(1).cpu().numpy())
        labels.append(batch.labels.numpy())
        kept += batch.indices
    if not kept:
        raise ValueError("no readable image in this split")
    return np.concatenate(probs), np.concatenate(labels), kept


def compute_metrics(probs: np.ndarray, labels: np.ndarray, num_classes: int) -> dict:
    from sklearn.metrics import accuracy_score, confusion_matrix, f1_score, top_k_accuracy_score
    pred = probs.argmax(1)
    classes = np.arange(num_classes)
    k = min(5, num_classes)
    top5 = 1.0 if num_classes <= k or num_classes <= 2 else top_k_accuracy_score(labels, probs, k=k, labels=classes)
    cm = confusion_matrix(labels, pred, labels=classes)
    support = cm.sum(1)
    return {
        "top1": float(accuracy_score(labels, pred)),
        "top5": float(top5),
        "macro_f1": float(f1_score(labels, pred, average="macro", zero_division=0)),
        "num_images": int(len(labels)),
        "per_class_accuracy": [float(cm[i, i] / support[i]) if support[i] else None for i in classes],
        "support": support.tolist(),
        "confusion": cm,
    }


def evaluate_run(run: str | Path, split: str = "test", workers: int = 2, batch_size: int = 64,
                 device: str = "auto") -> dict:
    run = Path(run)
    if not (run / "split.csv").is_file():
        raise CheckpointError(f"{run} is not a run directory (no split.csv)")
    model, cfg_dict, names = model_from_checkpoint(load_checkpoint(resolve_checkpoint(run)))
    cfg = TrainConfig.from_dict(cfg_dict)
    boxes = None
    if cfg.crop_bbox:
        index = index_dataset(cfg.data, cfg.format)
        boxes = dict(zip(index.paths, index.bboxes))
    paths, labels, bboxes = rundir.read_split(run, boxes).subset(split)
    if not paths:
        raise ValueError(f"the {split} split of {run} is empty")
    dev = pick_device(device)
    dataset = CarImages(cfg.data, paths, labels, bboxes, build_transform(cfg.image_size, False), cfg.crop_bbox,
                        cfg.image_size, ResizedCache.find(cfg.data, cfg.image_size))
    model = model.to(dev, memory_format=torch.channels_last) if dev.type == "cuda" else model.to(dev)
    probs, y, kept = predict_probs(model, make_loader(dataset, batch_size, workers), dev, cfg.amp)
    metrics = compute_metrics(probs, y, len(names))
    _save(run, split, metrics, names, [paths[i] for i in kept], probs, y)
    return {k: v for k, v in metrics.items() if k not in ("confusion", "per_class_accuracy", "support")} | {
        "split": split, "skipped_images": len(paths) - len(y)}


def _save(run: Path, split: str, metrics: dict, names: list[str], paths: list[str], probs: np.ndarray,
          labels: np.ndarray) -> None:
    summary = {k: v for k, v in metrics.items() if k not in ("confusion", "per_class_accuracy", "support")}
    rundir.write_json(run / f"{split}_metrics.json", summary | {"split": split})
    with open(run / f"{split}_per_class.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["index", "name", "support", "accuracy"])
        w.writerows((i, n, s, "" if a is None else round(a, 6)) for i, (n, s, a) in
                    enumerate(zip(names, metrics["support"], metrics["per_class_accuracy"])))
    np.savetxt(run / f"{split}_confusion.csv", metrics["confusion"], fmt="%d", delimiter=",")
    pred = probs.argmax(1)
    with open(run / f"{split}_predictions.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["path", "label", "pred", "prob"])
        w.writerows((p, int(t), int(q), round(float(probs[i, q]), 6)) for i, (p, t, q) in
                    enumerate(zip(paths, labels, pred)))


def read_report(run: str | Path, split: str = "test") -> dict | None:
    """What evaluate_run saved for a split: metrics, per-class rows, confusion matrix, predictions; None if absent."""
    run = Path(run)
    if not (run / f"{split}_metrics.json").is_file():
        return None
    with open(run / f"{split}_per_class.csv", newline="") as f:
        per_class = list(csv.DictReader(f))
    with open(run / f"{split}_predictions.csv", newline="") as f:
        predictions = list(csv.DictReader(f))
    cm = np.loadtxt(run / f"{split}_confusion.csv", delimiter=",", dtype=np.int64, ndmin=2)
    return {"metrics": rundir.read_json(run / f"{split}_metrics.json"), "per_class": per_class,
            "confusion": cm, "predictions": predictions, "names": rundir.label_names(run),
            "data": (rundir.read_json(run / "config.json") or {}).get("data", "")}
