"""How well boxes were found: AP at IoU 0.5 (PASCAL VOC's all-point interpolation), recall, precision, exact counts.

A detection matches the unmatched true box it overlaps most (IoU >= 0.5), best scores first, as VOC and COCO do.
"""
from __future__ import annotations

import numpy as np
import torch
from torchvision.ops import box_iou

IOU = 0.5


def match(pred: np.ndarray, truth: np.ndarray, iou: float = IOU) -> list[int | None]:
    """For each predicted box (best score first), the index of the true box it matches, or None."""
    if len(pred) == 0 or len(truth) == 0:
        return [None] * len(pred)
    overlaps = box_iou(torch.as_tensor(pred, dtype=torch.float32), torch.as_tensor(truth, dtype=torch.float32))
    taken, out = set(), []
    for row in overlaps.numpy():
        candidates = [j for j in np.argsort(-row) if row[j] >= iou and j not in taken]
        out.append(candidates[0] if candidates else None)
        if candidates:
            taken.add(candidates[0])
    return out


def average_precision(preds: list[tuple[np.ndarray, np.ndarray]], truths: list[np.ndarray],
                      iou: float = IOU) -> float:
    """AP over photos: preds[i] = (boxes (N, 4), scores (N,)), truths[i] = boxes (M, 4)."""
    scored, total = [], sum(len(t) for t in truths)
    for (boxes, scores), truth in zip(preds, truths):
        order = np.argsort(-np.asarray(scores))
        matched = match(np.asarray(boxes)[order], truth, iou)
        scored += [(float(np.asarray(scores)[i]), m is not None) for i, m in zip(order, matched)]
    if total == 0:
        return float("nan")
    scored.sort(key=lambda s: -s[0])
    hits = np.cumsum([hit for _, hit in scored]) if scored else np.zeros(0)
    recall = np.concatenate([[0.0], hits / total])
    precision = np.concatenate([[1.0], hits / np.arange(1, len(scored) + 1)]) if scored else np.ones(1)
    precision = np.maximum.accumulate(precision[::-1])[::-1]  # the envelope: best precision at this recall or more
    return float(np.sum(np.diff(recall) * precision[1:]))


def count_figures(preds: list[np.ndarray], truths: list[np.ndarray], iou: float = IOU) -> dict:
    """At the operating score (the boxes given): car recall and precision, and the share of photos whose count is
    exact; also the photos without a car that got none."""
    found = right = 0
    exact = empty = empty_ok = 0
    for boxes, truth in zip(preds, truths):
        matched = match(np.asarray(boxes).reshape(-1, 4), np.asarray(truth).reshape(-1, 4), iou)
        found += len(matched)
        right += sum(m is not None for m in matched)
        exact += len(matched) == len(truth)
        if len(truth) == 0:
            empty += 1
            empty_ok += len(matched) == 0
    cars = sum(len(t) for t in truths)
    return {"recall": right / cars if cars else None, "precision": right / found if found else None,
            "exact_count": exact / len(truths) if truths else None,
            "no_car_photos": empty, "no_car_photos_right": empty_ok / empty if empty else None}


def operating_score(preds: list[tuple[np.ndarray, np.ndarray]], truths: list[np.ndarray], iou: float = IOU,
                    floor: float = 0.1) -> float:
    """The detection score that maximises F1 (car recall and precision at once) over these photos: chosen on the
    validation mosaics, kept with the detector, so no photo it is measured on chose it."""
    candidates = sorted({round(float(s), 3) for _, scores in preds for s in scores if s >= floor})
    best, best_f1 = floor, -1.0
    for threshold in candidates:
        figures = count_figures([b[np.asarray(s) >= threshold] for b, s in preds], truths, iou)
        recall, precision = figures["recall"] or 0.0, figures["precision"] or 0.0
        f1 = 2 * recall * precision / (recall + precision) if recall + precision else 0.0
        if f1 >= best_f1:  # ties: the higher score, fewer false cars
            best, best_f1 = threshold, f1
    return best
