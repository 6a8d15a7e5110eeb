"""Calibrate a trained run on its validation split: a temperature, acceptance thresholds, and a "not a car" score.

    python -m carapp calibrate --run checkpoints/run1 [--target-accuracy 0.95] [--json]

Training calls this after its last epoch; older runs can be calibrated afterwards. Writes in the run directory:
- calibration.json: temperature (fitted by minimising the validation NLL, Guo et al. 2017; kept only where it lowers
  the NLL without raising the ECE, else 1, with the fitted one as `temperature_fitted`), ECE and NLL before and after, the reliability bins, and the thresholds: `model` and `make` are the lowest confidences at which the
  accepted validation answers reach the target accuracy with 90% confidence (one-sided Wilson bound: the observed
  share alone overshoots on new photos when the validation split holds only a handful of errors); `ood` is the
  feature-space distance that 99% of validation cars stay below; `ood_car` (a run trained with --negatives), the one a
  car a detector found is judged by: 99% of the validation cars stay below it when moved onto those negatives.
- feature_bank.npz: the pooled layer3 features of up to 20 training images per class (their k-NN distance is one
  "not a car" signal), and feature_stats.npz: Gaussians of the early stages' channel statistics of the same images,
  and the scale of every signal on the validation cars. The "not a car" score is the largest scaled signal
  (trust.FarScore; bench/trust.py measures why this and not max-softmax or one layer alone).
"""
from __future__ import annotations

import logging
import os
import time
from collections import Counter
from pathlib import Path

import numpy as np
from PIL import Image

from .. import rundir
from ..cam import stage_widths
from ..checkpoint import CheckpointError
from ..dataset.index import index_dataset
from ..dataset.loader import make_loader, split_images
from ..dataset.negatives import Backdrops
from ..car_crops import BOX, DEFAULT_CONTEXT, measure_context
from .answers import BANK_FILE, CALIBRATION_FILE, STATS_FILE, class_makes_of, first_words
from .evaluate import collect_outputs, load_run_model, split_dataset
from .trust import (CAR_SIGNALS, FarScore, FeatureBank, StageGaussians, accept_threshold, ece, fit_temperature,
                    make_probs, nll, ood_threshold, reliability_bins, softmax)

BANK_IMAGES_PER_CLASS = 20  # 18,540 at 927 classes: a 38 MB bank that scores a batch in milliseconds
OOD_KEEP = 0.99              # share of validation cars that must stay below the "not a car" threshold
CONFIDENCE_LEVEL = 0.9       # the accepted validation answers reach the target accuracy with this confidence
log = logging.getLogger("carapp")


def calibrate_run(run: str | Path, target_accuracy: float = 0.95, workers: int = 2, batch_size: int = 64,
                  device: str = "auto") -> dict:
    run = Path(run)
    if not 0 < target_accuracy < 1:
        raise ValueError(f"--target-accuracy must lie between 0 and 1, not {target_accuracy}")
    if not (run / "best.pt").is_file():
        raise CheckpointError(f"{run} has no best.pt: calibration needs a run that finished at least one epoch")
    started = time.time()
    model, cfg, names, dev = load_run_model(run, device)
    val = _outputs(run, cfg, "val", model, dev, workers, batch_size)
    train = _outputs(run, cfg, "train", model, dev, workers, batch_size, BANK_IMAGES_PER_CLASS)
    fitted = fit_temperature(val.logits, val.labels)
    temperature = fitted if _improves(val.logits, val.labels, fitted) else 1.0
    before, after = softmax(val.logits), softmax(val.logits, temperature)
    far = fit_far_score(model, train.features, val.features, val.logits)
    thresholds = _thresholds(after, val.labels, class_makes_of(run, names) or first_words(names),
                             target_accuracy)
    thresholds["ood"] = ood_threshold(far.score(val.features, val.logits)[0], OOD_KEEP)
    car_limit = car_ood_threshold(run, cfg, far, model, dev, workers, batch_size)
    if car_limit is not None:
        thresholds["ood_car"] = car_limit
    far.bank.save(run / BANK_FILE)
    far.save_stages(run / STATS_FILE)
    crop = car_crop_rule(cfg)
    info = {"temperature": temperature, "ece_before": ece(before, val.labels), "ece_after": ece(after, val.labels),
            "nll_before": nll(val.logits, val.labels), "nll_after": nll(val.logits, val.labels, temperature),
            "bins_before": reliability_bins(before, val.labels), "bins_after": reliability_bins(after, val.labels),
            "temperature_fitted": fitted, "val_top1": float((after.argmax(1) == val.labels).mean()),
            "target_accuracy": target_accuracy, "confidence_level": CONFIDENCE_LEVEL, "thresholds": thresholds,
            "val_images": int(len(val.labels)),
            "bank_images": int(len(train.labels)), "ood_score": "far: the largest of the signals, each scaled on the "
            "validation cars (0 at their median, 1 at their 99th percentile)", "ood_signals": far.names,
            "ood_keep": OOD_KEEP, "car_crop": crop, "seconds": round(time.time() - started, 2)}
    rundir.write_json(run / CALIBRATION_FILE, info)  # last: its presence means the run is calibrated
    return {k: v for k, v in info.items() if not k.startswith("bins_")}


def fit_far_score(model, train_features: np.ndarray, val_features: np.ndarray, val_logits: np.ndarray) -> FarScore:
    """The "not a car" score of a model: fitted on training cars, scaled on validation cars."""
    low, width = stage_widths(model)
    bank = FeatureBank.fit(train_features[:, :width])
    far = FarScore(bank, StageGaussians.fit(train_features[:, width:], low))
    far.set_scale(val_features, val_logits, OOD_KEEP)
    return far


def car_ood_threshold(run: Path, cfg, far: FarScore, model, dev, workers: int, batch_size: int) -> float | None:
    """The "not a car" limit of a car a detector found: the score (trust.CAR_SIGNALS) that 99% of the validation cars
    stay below when shown on the run's --negatives photos instead of their own background, their boxes kept where
    they were. A found car stands in a street of another kind; measured on held-out scenes (bench/detect.py) the
    limit of cars on their own background refused a third of the found cars. None (the photo's limit serves) when the
    run has no negatives, trains on the box alone (no background), or its dataset has no boxes."""
    if not cfg.negatives or cfg.crop_bbox:
        return None
    try:
        backdrops = Backdrops(cfg.negatives, 1.0)
        frozen = rundir.read_run_split(run, cfg, boxes=True)
    except (OSError, ValueError) as exc:  # a run calibrated away from its negatives' folder or its dataset
        log.warning("cannot move the validation cars onto other backgrounds (%s): found cars get the photo's limit",
                    exc)
        return None
    dataset = split_images(cfg, frozen, "val", backdrops=backdrops)
    boxed = [(i, i) for i, box in enumerate(dataset.bboxes) if box]  # (index, seed): each car moved, the same way
    if not boxed:
        return None
    moved = collect_outputs(model, make_loader(dataset, batch_size, workers, boxed), dev, cfg.amp)
    return ood_threshold(far.score(moved.features, moved.logits, CAR_SIGNALS)[0], OOD_KEEP)


def car_crop_rule(cfg) -> dict:
    """How a detected car is cropped for this classifier (carapp.car_crops): the box for a --crop-bbox run, else the
    context its training photos had around their labelled cars, measured on up to 50 photos per class."""
    if cfg.crop_bbox:
        return dict(BOX)
    try:
        index = index_dataset(cfg.data, cfg.format)
    except (OSError, ValueError) as exc:  # a run calibrated away from its dataset
        log.warning("cannot measure the photos' context around their cars (%s): detected cars get the default", exc)
        return dict(DEFAULT_CONTEXT)
    sizes, boxes, per_class = [], [], Counter()
    for path, key, box in zip(index.paths, index.keys, index.bboxes):
        if box and per_class[key] < 50:
            try:
                with Image.open(os.path.join(index.root, path)) as photo:  # the header only
                    sizes.append(photo.size)
            except OSError:
                continue
            boxes.append([box[0] - 1, box[1] - 1, box[2], box[3]])  # CompCars boxes: 1-based, inclusive
            per_class[key] += 1
    return measure_context(sizes, boxes)


def _improves(logits: np.ndarray, labels: np.ndarray, temperature: float) -> bool:
    """A temperature is kept only where it lowers the validation NLL and does not raise the ECE: fitted on a few
    val images of a short run it can make the probabilities worse (seen: ECE 0.017 -> 0.056)."""
    return (nll(logits, labels, temperature) < nll(logits, labels)
            and ece(softmax(logits, temperature), labels) <= ece(softmax(logits), labels))


def _outputs(run: Path, cfg, split: str, model, dev, workers: int, batch_size: int, per_class: int | None = None):
    dataset = split_dataset(run, cfg, split, per_class)
    if not len(dataset):
        raise ValueError(f"{run} has no {split} images: calibration needs a validation split (val_frac > 0)")
    return collect_outputs(model, make_loader(dataset, batch_size, workers), dev, cfg.amp)


def _thresholds(probs: np.ndarray, labels: np.ndarray, class_makes: list[str], target: float) -> dict:
    """Lowest confidences at which the validation answers reach `target` accuracy, for models and for makes."""
    make_names, by_make = make_probs(probs, class_makes)
    true_make = np.array([make_names.index(class_makes[t]) for t in labels])
    return {"model": accept_threshold(probs.max(1), probs.argmax(1) == labels, target, CONFIDENCE_LEVEL),
            "make": accept_threshold(by_make.max(1), by_make.argmax(1) == true_make, target, CONFIDENCE_LEVEL)}
