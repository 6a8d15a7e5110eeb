"""Evaluate a run's best checkpoint on one split: top-1, top-5, macro-F1, per-class accuracy, confusion matrix, and
how far the answers can be trusted: calibration error, make-level top-1, coverage and accuracy of confident answers,
accuracy per viewpoint.

    python -m carapp evaluate --run checkpoints/run1 [--split test] [--tta] [--json]

Writes <split>_metrics.json, <split>_per_class.csv, <split>_confusion.csv, <split>_predictions.csv (with each image's
probability of its own label, for the top losses) and <split>_label_issues.csv (label suspects) in the run.
"""
from __future__ import annotations

import csv
import dataclasses
import os
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from .. import rundir
from ..atomic import atomic_writer
from ..cam import head, stages, trunk
from ..checkpoint import CheckpointError
from ..config import TrainConfig
from ..dataset.index import VIEWPOINTS, index_dataset
from ..dataset.loader import CarImages, make_loader, split_images, to_input
from ..runtime import autocast, pick_device
from ..saved import load_model
from .answers import Calibration, class_makes_of
from .trust import coverage_curve, ece, make_probs, reliability_bins, softmax

# What forward's features hold; an ONNX export made for another version has other outputs (the engine cache keys on it)
FEATURES_VERSION = 2


@dataclass
class Outputs:
    logits: np.ndarray      # (N, classes), float32
    features: np.ndarray    # (N, D): what the "not a car" score reads (see forward)
    labels: np.ndarray      # (N,)
    kept: list[int]         # dataset indices that were readable, in order


def forward(model, x: torch.Tensor, tta: bool = False) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(logits, features, layer4 activations) of a batch; with tta, the logits are averaged with the mirrored
    photo's. The features are what the "not a car" score (trust.FarScore) reads: the pooled layer3 activations,
    then the mean and standard deviation of every channel of the stem, layer1 and layer2 (FEATURES_VERSION 2)."""
    low, mid, activations = stages(model, x)
    logits = head(model, activations)
    if tta:
        logits = (logits + head(model, trunk(model, x.flip(-1)))) / 2
    statistics = [torch.cat([a.float().mean((2, 3)), a.float().std((2, 3))], 1) for a in low]
    return logits, torch.cat([mid.float().mean((2, 3)), *statistics], 1), activations


@torch.inference_mode()
def collect_outputs(model, loader, device, amp: bool = True, tta: bool = False, on_batch=None) -> Outputs:
    """Logits and features of every readable image of a loader; on_batch(images done) after each batch."""
    logits, features, labels, kept, done = [], [], [], [], 0
    for batch in loader:
        done += len(batch.indices) + len(batch.bad)
        if batch.images is not None:
            with autocast(device, amp):
                out, pooled, _ = forward(model, to_input(batch.images, device, channels_last=True), tta)
            logits.append(out.float().cpu().numpy())
            features.append(pooled.float().cpu().numpy())
            labels.append(batch.labels.numpy())
            kept += batch.indices
        if on_batch:
            on_batch(done)
    if not kept:
        raise ValueError("no readable image in this split")
    return Outputs(np.concatenate(logits), np.concatenate(features), np.concatenate(labels), kept)


def load_run_model(run: Path, device: str = "auto"):
    """(model on its device, TrainConfig, class names, device) of a run's best.pt."""
    if not (run / "split.csv").is_file():
        raise CheckpointError(f"{run} is not a run directory (no split.csv)")
    model, cfg_dict, names, _ = load_model(run)
    dev = pick_device(device)
    model = model.to(dev, memory_format=torch.channels_last) if dev.type == "cuda" else model.to(dev)
    return model, TrainConfig.from_dict(cfg_dict), names, dev


def split_dataset(run: Path, cfg: TrainConfig, split: str, per_class: int | None = None) -> CarImages:
    """The images of one split of a run, as evaluation sees them (no augmentation); with per_class, only the first
    that many of each class (a fixed subset: a rerun sees the same images)."""
    frozen = rundir.read_run_split(run, cfg)
    if per_class:
        seen: Counter[int] = Counter()
        for i, (y, s) in enumerate(zip(frozen.labels, frozen.splits)):
            if s == split:
                seen[y] += 1
                if seen[y] > per_class:
                    frozen.splits[i] = "beyond the per-class subset"
    return split_images(cfg, frozen, split)


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
                 device: str = "auto", tta: bool = False) -> dict:
    """Evaluate best.pt on a split, reporting progress in evaluate_progress.json; the result files are replaced
    atomically at the end, so readers see the old report or the new one, never a mix of half-written files."""
    run = Path(run)
    if not (run / "split.csv").is_file():
        raise CheckpointError(f"{run} is not a run directory (no split.csv)")
    progress = Progress(run / rundir.EVAL_PROGRESS, split)
    try:
        result = _evaluate(run, split, workers, batch_size, device, tta, progress)
    except BaseException as exc:
        progress.write(status="failed" if isinstance(exc, Exception) else "interrupted", error=str(exc))
        raise
    total = result["num_images"] + result["skipped_images"]
    progress.write(status="finished", done=total, total=total)
    # which split the run was trained on: "official" (the dataset's own lists) is comparable with published results
    result["dataset_split"] = (rundir.read_json(run / "config.json") or {}).get("split", "paper")
    return result


class Progress:
    """evaluate_progress.json, rewritten at most once a second while running."""

    def __init__(self, path: Path, split: str):
        self.path, self.split, self.last = path, split, 0.0
        self.write(status="running", done=0, total=None)

    def write(self, **fields) -> None:
        rundir.write_json(self.path, {"split": self.split, "pid": os.getpid(), "updated": time.time(), **fields})

    def running(self, done: int, total: int) -> None:
        if time.time() - self.last >= 1.0:
            self.last = time.time()
            self.write(status="running", done=done, total=total)


def _evaluate(run: Path, split: str, workers: int, batch_size: int, device: str, tta: bool,
              progress: Progress) -> dict:
    model, cfg, names, dev = load_run_model(run, device)
    dataset = split_dataset(run, cfg, split)
    if not len(dataset):
        raise ValueError(f"the {split} split of {run} is empty")
    out = collect_outputs(model, make_loader(dataset, batch_size, workers), dev, cfg.amp, tta,
                          lambda done: progress.running(done, len(dataset)))
    calibration = Calibration.load(run, names, class_makes_of(run, names))
    probs = calibration.probs(out.logits)
    paths = [dataset.paths[i] for i in out.kept]
    metrics = compute_metrics(probs, out.labels, len(names))
    trust, answers = trust_metrics(calibration, out, probs, _viewpoints(cfg, paths))
    suspects = label_suspects(probs, out.labels)
    metrics |= trust | {"tta": tta, "label_suspects": len(suspects)}
    if cfg.split == "official":  # the two figures the field quotes: on the whole photo and on the car's box
        metrics |= _both_crops(model, run, cfg, split, batch_size, workers, dev, tta, calibration, metrics)
    _save(run, split, metrics, names, paths, probs, out.labels, answers, suspects)
    return {k: v for k, v in metrics.items() if k not in REPORT_ONLY} | {
        "split": split, "skipped_images": len(dataset) - len(out.labels)}


def _both_crops(model, run: Path, cfg: TrainConfig, split: str, batch_size: int, workers: int, dev, tta: bool,
                calibration: Calibration, metrics: dict) -> dict:
    """top-1 / top-5 on the whole photo and on the labelled box, where the dataset has boxes: the run's own way
    is the report's figure, the other is one more pass over the split (a reproduction of the CompCars GoogLeNet
    scored 91.1% on whole photos and 68.1% on tighter crops: a figure means little without its crop)."""
    flipped = dataclasses.replace(cfg, crop_bbox=not cfg.crop_bbox)
    frozen = rundir.read_run_split(run, cfg, boxes=True)
    if not any(b for b, s in zip(frozen.bboxes, frozen.splits) if s == split):
        return {}
    out = collect_outputs(model, make_loader(split_images(flipped, frozen, split), batch_size, workers), dev,
                          cfg.amp, tta)
    other = compute_metrics(calibration.probs(out.logits), out.labels, len(calibration.labels))
    own, theirs = ("box_crop", "whole_photo") if cfg.crop_bbox else ("whole_photo", "box_crop")
    return {f"top1_{own}": metrics["top1"], f"top5_{own}": metrics["top5"], f"top1_{theirs}": other["top1"],
            f"top5_{theirs}": other["top5"]}


# in <split>_metrics.json for the Evaluate tab, but too long for the CLI's summary
REPORT_ONLY = ("confusion", "per_class_accuracy", "support", "reliability_before", "reliability_after",
               "coverage_curve")


def trust_metrics(calibration: Calibration, out: Outputs, probs: np.ndarray,
                  viewpoints: list[int | None] | None) -> tuple[dict, list]:
    """Calibration error before/after, make-level top-1, the share answered with a model and its accuracy, the
    reliability bins and coverage curve for the plots, and accuracy per viewpoint."""
    labels = out.labels
    make_names, by_make = make_probs(probs, calibration.class_makes)
    true_make = np.array([make_names.index(calibration.class_makes[t]) for t in labels])
    answers = calibration.answers(out.logits, out.features, top_k=1)
    status = np.array([a.status for a in answers])
    correct = probs.argmax(1) == labels
    model_answers = status == "model"
    plain = softmax(out.logits)  # temperature 1: what the network says before calibration
    metrics = {
        "calibrated": calibration.calibrated, "temperature": calibration.temperature,
        "ece": ece(probs, labels), "ece_uncalibrated": ece(plain, labels),
        "make_top1": float((by_make.argmax(1) == true_make).mean()),
        "make_top5": float((np.argsort(-by_make, 1)[:, :5] == true_make[:, None]).any(1).mean()),
        "coverage": float(model_answers.mean()),
        "selective_accuracy": float(correct[model_answers].mean()) if model_answers.any() else None,
        "status_counts": {s: int((status == s).sum()) for s in ("model", "make", "unsure", "no-car")},
        "thresholds": calibration.thresholds,
        "reliability_before": reliability_bins(plain, labels), "reliability_after": reliability_bins(probs, labels),
        "coverage_curve": coverage_curve(probs.max(1), correct),
    }
    if viewpoints:
        metrics["per_viewpoint"] = {
            VIEWPOINTS.get(v, str(v)): {"accuracy": float(correct[[i for i, w in enumerate(viewpoints) if w == v]]
                                                          .mean()), "images": viewpoints.count(v)}
            for v in sorted({v for v in viewpoints if v is not None})}
    return metrics, answers


def _viewpoints(cfg: TrainConfig, paths: list[str]) -> list[int | None] | None:
    """The CompCars viewpoint label of each image, when the dataset has them and is still there."""
    try:
        index = index_dataset(cfg.data, cfg.format)
    except (ValueError, OSError):
        return None
    by_path = dict(zip(index.paths, index.viewpoints or []))
    views = [by_path.get(p) for p in paths]
    return views if any(v is not None for v in views) else None


def _save(run: Path, split: str, metrics: dict, names: list[str], paths: list[str], probs: np.ndarray,
          labels: np.ndarray, answers: list, suspects: list[int]) -> None:
    summary = {k: v for k, v in metrics.items() if k not in ("confusion", "per_class_accuracy", "support")}
    with atomic_writer(run / f"{split}_per_class.csv", newline="") as f:
        w = csv.writer(f)
        w.writerow(["index", "name", "support", "accuracy"])
        w.writerows((i, n, s, "" if a is None else round(a, 6)) for i, (n, s, a) in
                    enumerate(zip(names, metrics["support"], metrics["per_class_accuracy"])))
    with atomic_writer(run / f"{split}_confusion.csv") as f:
        np.savetxt(f, metrics["confusion"], fmt="%d", delimiter=",")
    pred = probs.argmax(1)
    with atomic_writer(run / f"{split}_predictions.csv", newline="") as f:
        w = csv.writer(f)
        w.writerow(["path", "label", "pred", "prob", "status", "make", "make_prob", "true_prob"])
        w.writerows((p, int(t), int(q), round(float(probs[i, q]), 6), a.status, a.make[0], round(a.make[1], 6),
                     round(float(probs[i, t]), 6)) for i, (p, t, q, a) in enumerate(zip(paths, labels, pred, answers)))
    with atomic_writer(run / f"{split}_label_issues.csv", newline="") as f:
        w = csv.writer(f)
        w.writerow(["path", "label", "suggested", "label_quality"])
        w.writerows((paths[i], int(labels[i]), int(pred[i]), round(float(probs[i, labels[i]]), 6))
                    for i in suspects)
    rundir.write_json(run / f"{split}_metrics.json", summary | {"split": split})  # last: it marks a report done


def label_suspects(probs: np.ndarray, labels: np.ndarray) -> list[int]:
    """Images whose label the held-out predictions doubt, most doubtful first: cleanlab's confident learning
    (find_label_issues, ranked by self-confidence) on the calibrated probabilities of images the run never trained
    on. Classes with few images get few flags (cleanlab needs examples to estimate a class's threshold)."""
    import warnings

    from cleanlab.filter import find_label_issues
    if len(labels) < 2 or probs.shape[1] < 2:
        return []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "too few examples in class k": expected on small test splits
        # n_jobs=1: its default forks a pool, which can hang a process that already runs torch threads (seen)
        return [int(i) for i in find_label_issues(labels, probs, return_indices_ranked_by="self_confidence",
                                                  n_jobs=1)]


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
    suspects = []
    if (run / f"{split}_label_issues.csv").is_file():  # reports from before label suspects lack it
        with open(run / f"{split}_label_issues.csv", newline="") as f:
            suspects = list(csv.DictReader(f))
    config = rundir.read_json(run / "config.json") or {}
    return {"metrics": rundir.read_json(run / f"{split}_metrics.json"), "per_class": per_class,
            "confusion": cm, "predictions": predictions, "label_issues": suspects, "names": rundir.label_names(run),
            "data": config.get("data", ""), "backbone": config.get("backbone", "resnet50"),
            "image_size": config.get("image_size")}
