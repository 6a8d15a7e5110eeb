"""Which classes a run keeps and how their images are split: the paper's floor(mean) class filter, a stratified
train/val/test split with a fixed seed (duplicate groups kept whole when asked), and the figures `carapp stats` prints.
`--split official` instead takes the dataset's own train/test lists (index.official), carves a stratified validation
part out of train and filters no class: the split published results are measured on.
"""
from __future__ import annotations

import logging
import math
from collections import Counter
from dataclasses import dataclass

import numpy as np

from .index import OFFICIAL_LISTS, VIEWPOINTS, DatasetError, DatasetIndex

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
        n_val = max(1, round(val_frac * len(members))) if val_frac > 0 else 0
        n_test = max(1, round(test_frac * len(members))) if test_frac > 0 else 0
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


def choose_split(index: DatasetIndex, split: str = "paper", min_images: int | None = None, val_frac: float = 0.15,
                 test_frac: float = 0.15, seed: int = 0, groups: list[list[str]] | None = None) -> Split:
    """The run's split as --split names it: paper (make_split) or official (official_split)."""
    if split == "official":
        if groups:
            raise DatasetError("--group-duplicates keeps duplicates in one split of the paper's split; the official "
                               "lists are the dataset's own (leave one of the two out)")
        return official_split(index, val_frac, seed)
    return make_split(index, min_images, val_frac, test_frac, seed, groups)


def official_split(index: DatasetIndex, val_frac: float = 0.15, seed: int = 0) -> Split:
    """The dataset's own train and test lists, every class they name (no class filter), a stratified validation
    part carved out of train; listed photos that are missing were left out by the index (official_lists says how
    many)."""
    if not index.official_lists:
        lists = " or ".join(" + ".join(v.values()) for v in OFFICIAL_LISTS.values())
        raise DatasetError(f"{index.root} ({index.format} format) has no official train/test lists ({lists}): use "
                           f"--split paper")
    for which, info in index.official_lists.items():
        if info["listed"] and info["missing"] == info["listed"]:
            raise DatasetError(f"{info['file']} names {info['listed']} photos and none of them is in {index.root} "
                               f"(e.g. {info['missing_examples'][0]})")
        if info["missing"]:
            log.warning("%s: %d of its %d photos are missing and left out (e.g. %s)", info["file"], info["missing"],
                        info["listed"], ", ".join(info["missing_examples"][:3]))
    chosen = [i for i, p in enumerate(index.paths) if p in index.official]
    keys = sorted({index.keys[i] for i in chosen}, key=_natural_key)
    position = {k: n for n, k in enumerate(keys)}
    labels = [position[index.keys[i]] for i in chosen]
    roles = [index.official[index.paths[i]] for i in chosen]
    train = [n for n, r in enumerate(roles) if r == "train"]
    carved = stratified_split([labels[n] for n in train], val_frac, 0.0, seed)
    splits = list(roles)
    for n, which in zip(train, carved):
        splits[n] = which
    counts = Counter(index.keys[i] for i in chosen)
    return Split(paths=[index.paths[i] for i in chosen], labels=labels, splits=splits,
                 bboxes=[index.bboxes[i] for i in chosen],
                 class_info=[{"key": k, **index.classes[k], "count": counts[k]} for k in keys])


def _positions(groups: list[list[str]] | None, paths: list[str]) -> list[list[int]]:
    """Path groups as position groups among the kept images (members of dropped classes fall out)."""
    where = {p: i for i, p in enumerate(paths)}
    found = ([where[p] for p in g if p in where] for g in groups or ())
    return [g for g in found if len(g) > 1]


def dataset_stats(index: DatasetIndex, min_images: int | None = None, val_frac: float = 0.15,
                  test_frac: float = 0.15, seed: int = 0, groups: list[list[str]] | None = None,
                  split: str = "paper") -> dict:
    """The figures `carapp stats` prints and the Dataset tab shows; with duplicate groups, the grouped split; with
    split official, the official split's sizes and classes, no class filter (min_images 0), and `official` naming the
    lists and what is missing from them."""
    counts = index.class_counts()
    if split == "official":
        made, threshold = official_split(index, val_frac, seed), 0
        kept_counts = sorted((c["count"] for c in made.class_info), reverse=True)
    else:
        keys, threshold = kept_classes(index, min_images)
        made = make_split(index, min_images, val_frac, test_frac, seed, groups) if keys else None
        kept_counts = sorted((counts[k] for k in keys), reverse=True)
    viewpoints: dict[str, int] = {}
    for v in index.viewpoints:
        if v is not None:
            name = VIEWPOINTS.get(v, str(v))
            viewpoints[name] = viewpoints.get(name, 0) + 1
    return {
        "root": index.root,
        "format": index.format,
        "split": split,
        "num_images": len(index.paths),
        "num_classes": len(counts),
        "num_makes": len({c["make"] for c in index.classes.values()}),
        "min_images": threshold,
        "num_classes_kept": len(kept_counts),
        "num_images_kept": sum(kept_counts),
        "splits": {s: made.splits.count(s) if made else 0 for s in ("train", "val", "test")},
        "imbalance": {
            "largest_class": kept_counts[0] if kept_counts else 0,
            "smallest_class": kept_counts[-1] if kept_counts else 0,
            "ratio": round(kept_counts[0] / kept_counts[-1], 2) if kept_counts else 0,
        },
        "viewpoints": viewpoints,
        **({"duplicate_groups_merged": len(_positions(groups, made.paths)) if made else 0}
           if groups is not None else {}),
        **({"official": index.official_lists} if split == "official" else {}),
    }
