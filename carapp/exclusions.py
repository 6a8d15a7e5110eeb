"""Exclusion lists: photos a user marked (wrong label, not a car, duplicate, exclude) that new runs leave out.

A CSV `path,reason` (paths relative to the dataset root, as split.csv has them) in a place the user owns: beside the
runs (`<runs>/exclusions.csv`, what the app writes and its new runs use) or any file given to `train --exclude`.
The dataset itself is never touched; a run records the list it left out in its config.json.
"""
from __future__ import annotations

import csv
import threading
from pathlib import Path

from .atomic import atomic_writer

REASONS = ("wrong label", "not a car", "duplicate", "exclude")
KEEP = "keep"                    # a mark that takes a photo off the list again
FILE_NAME = "exclusions.csv"     # the app's list, in its runs folder
_LOCK = threading.Lock()         # two clicks in the app: one read-modify-write at a time


def read_exclusions(path: str | Path, missing_ok: bool = False) -> dict[str, str]:
    """path -> reason; a list that is not there is an error unless missing_ok (the app's list before any mark)."""
    path = Path(path)
    if not path.is_file():
        if missing_ok:
            return {}
        raise FileNotFoundError(f"exclusion list not found: {path}")
    with open(path, newline="") as f:
        rows = list(csv.reader(f))
    if rows and rows[0][:1] == ["path"]:
        rows = rows[1:]
    bad = [i for i, r in enumerate(rows, 2) if not r or not r[0].strip()]
    if bad:
        raise ValueError(f"{path.name}: line {bad[0]} has no path (expected path,reason)")
    return {r[0].strip(): (r[1].strip() if len(r) > 1 and r[1].strip() else "exclude") for r in rows}


def mark(path: str | Path, photo: str, reason: str) -> dict[str, str]:
    """Add (or with reason 'keep', remove) one photo in the list at `path`; returns the whole list."""
    if reason not in (*REASONS, KEEP):
        raise ValueError(f"unknown mark {reason!r}: use one of {', '.join(REASONS)} or {KEEP}")
    if not photo or Path(photo).is_absolute() or ".." in Path(photo).parts:
        raise ValueError("a marked photo is a path inside the dataset")
    path = Path(path)
    with _LOCK:
        marks = read_exclusions(path, missing_ok=True)
        if reason == KEEP:
            marks.pop(photo, None)
        else:
            marks[photo] = reason
        path.parent.mkdir(parents=True, exist_ok=True)
        with atomic_writer(path, newline="") as f:
            w = csv.writer(f)
            w.writerow(["path", "reason"])
            w.writerows(sorted(marks.items()))
    return marks
