"""A detector (and the classifier behind it) measured on scenes with true boxes (carapp.dataset.scenes).

    python -m carapp evaluate --run CLASSIFIER --detector DETECTOR --scenes DIR [--json]

Reports AP50 over every detection, car recall and precision and the exact-count rate at the detector's operating
score, the share of scenes without a car that get none, and, for the cars found (matched to a true car at IoU 0.5),
the classifier's top-1 and the share answered with a model and how many of those are right.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

from ..dataset.images import open_image
from ..dataset.scenes import read_scenes
from .metrics import average_precision, count_figures, match
from .model import CANDIDATE_SCORE  # every detection down to it counts for AP; the operating score for the rest




def evaluate_detector(detector, scenes_dir: str | Path, predictor=None, batch_size: int = 8) -> dict:
    records = read_scenes(scenes_dir)
    if not records:
        raise ValueError(f"{scenes_dir} holds no scenes")
    photos = [open_image(Path(scenes_dir) / r["image"]) for r in records]
    truths = [np.array([c["box"] for c in r["cars"]], dtype=np.float32).reshape(-1, 4) for r in records]
    candidates = detector.detect(photos, batch_size, min_score=CANDIDATE_SCORE)  # the one detection pass
    preds = [(np.array([b.as_list() for b in boxes]).reshape(-1, 4), np.array([b.score for b in boxes]))
             for boxes in candidates]
    operating = [[b for b in boxes if b.score >= detector.min_score] for boxes in candidates]
    result = {"scenes": len(records), "cars": int(sum(len(t) for t in truths)),
              "ap50": average_precision(preds, truths),
              **count_figures([p[0][p[1] >= detector.min_score] for p in preds], truths),
              "min_score": detector.min_score, "detector": detector.source}
    if predictor is not None:
        answers = predictor.answer_cars([p.convert("RGB") for p in photos], operating, detector, top_k=1)
        result |= _named_cars(predictor, answers, records, truths)
    return result


def _named_cars(predictor, answers, records, truths) -> dict:
    """The classifier on the cars the detector found: top-1 of those matched to a true car of a class it knows."""
    known = set(predictor.labels)
    right = named = named_right = counted = 0
    for answer, record, truth in zip(answers, records, truths):
        boxes = np.array([car.box for car in answer.cars], dtype=np.float32).reshape(-1, 4)
        for car, j in zip(answer.cars, match(boxes, truth)):
            if j is None or record["cars"][j]["class"] not in known:
                continue
            counted += 1
            correct = car.top[0][0] == record["cars"][j]["class"]
            right += correct
            if car.status == "model":
                named += 1
                named_right += correct
    return {"matched_known_cars": counted, "car_top1": right / counted if counted else None,
            "car_answered_model": named / counted if counted else None,
            "car_model_right": named_right / named if named else None}
