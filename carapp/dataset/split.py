"""Which classes a run keeps and how their images are split: the paper's floor(mean) class filter, a stratified
train/val/test split with a fixed seed (duplicate groups kept whole when asked), and the figures `carapp stats` prints.
"""
from __future__ import annotations

import logging
import math
from dataclasses import dataclass

import numpy as np

from .index import VIEWPOINTS, DatasetError, DatasetIndex

log = logging.getLogger(__name__)


def default_min_images(counts: dict[str, int]) -> int:
    """floor(mean images per class over the classes that have images): 79 on CompCars web-nature."""
    return math.floor(sum(counts.values()) / len(counts)) if counts else 0


def kept_classes(index: DatasetIndex, min_images: int | None = None) -> tuple[list[str], int]:
    """Class keys with at least min_images images (None: floor of the mean), in a stable order, and the threshold."""
    counts = index.class_counts()
    threshold = default_min_images(counts) if min_images is None else int(min_images)
    keys = [k for k, n in counts.items() if n >= threshold]
    return sorted(keys, key=_natural_key), threshold


def _natural_key(key: str):
    return (0, int(key), "") if key.isdigit() else (1, 0, key)


def stratified_split(labels: list[int], val_frac: float = 0.15, test_frac: float = 0.15,
                     seed: int = 0, groups: list[list[int]] | None = None) -> list[str]:
    """train/val/test per image, split class by class so every split keeps the class proportions.

    A class with at least 3 images gets at least one val and one test image; smaller classes stay in train.
    `groups` (lists of positions: duplicates of one photo) are kept whole: a group counts for the class of its first
    member, goes to val or test only where it fits whole, and all its members go where it goes. Without groups
    every image is its own unit and the split is the same as it always was for a seed.
    """
    rng = np.random.default_rng(seed)
    labels_arr = np.asarray(labels)
    unit = np.arange(len(labels_arr))       # the representative (lowest position) of each image's group
    for g in groups or ():
        unit[list(g)] = min(g)
    size = np.bincount(unit, minlength=len(unit))
    split = np.full(len(labels_arr), "train", dtype=object)
    small = []
    for c in np.unique(labels_arr):
        members = np.flatnonzero(labels_arr == c)
        order = rng.permutation(members[unit[members] == members])
        if len(order) < 3:
            small.append(int(c))
            continue
        n_val = max(1, round(val_frac * len(members)))
        n_test = max(1, round(test_frac * len(members)))
        room = {"val": n_val, "test": n_test}
        for u in order:  # val first, then test, then train; a group goes only where it fits whole
            which = next((s for s in ("val", "test") if size[u] <= room[s]), "train")
            split[u] = which
            if which != "train":
                room[which] -= size[u]
    if small:
        log.warning("%d classes have fewer than 3 images: all their images go to train", len(small))
    return split[unit].tolist()


@dataclass
class Split:
    """The kept images of a dataset with their class index and split: what a run directory freezes."""
    paths: list[str]
    labels: list[int]
    splits: list[str]
    bboxes: list[list[int] | None]
    class_info: list[dict]          # index → {"key", "name", "make", "model", "count"}

    def subset(self, which: str) -> tuple[list[str], list[int], list]:
        keep = [i for i, s in enumerate(self.splits) if s == which]
        return [self.paths[i] for i in keep], [self.labels[i] for i in keep], [self.bboxes[i] for i in keep]

    def counts(self, which: str = "train") -> list[int]:
        counts = [0] * len(self.class_info)
        for label, s in zip(self.labels, self.splits):
            if s == which:
                counts[label] += 1
        return counts


def make_split(index: DatasetIndex, min_images: int | None = None, val_frac: float = 0.15,
               test_frac: float = 0.15, seed: int = 0, groups: list[list[str]] | None = None) -> Split:
    """The kept classes' images, split; `groups` (of paths, from carapp.dataset.health) each stay in one split."""
    keys, _ = kept_classes(index, min_images)
    if not keys:
        raise DatasetError("no class has enough images: lower --min-images")
    position = {k: i for i, k in enumerate(keys)}
    chosen = [i for i, k in enumerate(index.keys) if k in position]
    labels = [position[index.keys[i]] for i in chosen]
    counts = index.class_counts()
    class_info = [{"key": k, **index.classes[k], "count": counts[k]} for k in keys]
    paths = [index.paths[i] for i in chosen]
    return Split(paths=paths, labels=labels,
                 splits=stratified_split(labels, val_frac, test_frac, seed, _positions(groups, paths)),
                 bboxes=[index.bboxes[i] for i in chosen], class_info=class_info)


def _positions(groups: list[list[str]] | None, paths: list[str]) -> list[list[int]]:
    """Path groups as position groups among the kept images (members of dropped classes fall out)."""
    where = {p: i for i, p in enumerate(paths)}
    found = ([where[p] for p in g if p in where] for g in groups or ())
    return [g for g in found if len(g) > 1]


def dataset_stats(index: DatasetIndex, min_images: int | None = None, val_frac: float = 0.15,
                  test_frac: float = 0.15, seed: int = 0, groups: list[list[str]] | None = None) -> dict:
    """The figures `carapp stats` prints and the Dataset tab shows; with duplicate groups, the grouped split."""
    counts = index.class_counts()
    keys, threshold = kept_classes(index, min_images)
    split = make_split(index, min_images, val_frac, test_frac, seed, groups) if keys else None
    kept_counts = sorted((counts[k] for k in keys), reverse=True)
    viewpoints: dict[str, int] = {}
    for v in index.viewpoints:
        if v is not None:
            name = VIEWPOINTS.get(v, str(v))
            viewpoints[name] = viewpoints.get(name, 0) + 1
    return {
        "root": index.root,
        "format": index.format,
        "num_images": len(index.paths),
        "num_classes": len(counts),
        "num_makes": len({c["make"] for c in index.classes.values()}),
        "min_images": threshold,
        "num_classes_kept": len(keys),
        "num_images_kept": sum(kept_counts),
        "splits": {s: split.splits.count(s) if split else 0 for s in ("train", "val", "test")},
        "imbalance": {
            "largest_class": kept_counts[0] if kept_counts else 0,
            "smallest_class": kept_counts[-1] if kept_counts else 0,
            "ratio": round(kept_counts[0] / kept_counts[-1], 2) if kept_counts else 0,
        },
        "viewpoints": viewpoints,
        **({"duplicate_groups_merged": len(_positions(groups, split.paths)) if split else 0}
           if groups is not None else {}),
    }
