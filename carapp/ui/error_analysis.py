"""Error analysis in the Evaluate tab: from "these two classes are confused" to the photos behind it (with
heatmaps), the top losses, the label suspects — and marks on those photos that new runs leave out.

Marks go to `<runs>/exclusions.csv` (carapp.exclusions), never into the dataset; only the owner may mark.
"""
from __future__ import annotations

import math
import os
from pathlib import Path

import gradio as gr
import numpy as np
import pandas as pd

from .. import exclusions
from ..dataset.images import ImageError, open_image
from ..runs import find_run
from . import hardware
from .photos import thumbnails
from .settings import AppSettings

PHOTOS = 12                     # photos of one pair, each with its heatmap
GALLERY = 24                    # top losses, label suspects
MARK_COLUMNS = ["path", "reason"]


def pair_choices(report: dict) -> gr.Dropdown:
    """Every (true, predicted) cell of the confusion matrix with wrong answers, the most frequent first."""
    cm, names = report["confusion"], report["names"]
    cells = [(int(cm[i, j]), i, j) for i, j in zip(*np.nonzero(cm)) if i != j]
    choices = [(f"{names[i]} → {names[j]} ({n})", f"{i},{j}") for n, i, j in sorted(cells, key=lambda c: -c[0])]
    return gr.Dropdown(choices=choices, value=None)


def pair_from_row(settings: AppSettings, name: str | None, pairs: pd.DataFrame, evt: gr.SelectData):
    """A click on a row of the most-confused pairs table chooses that pair."""
    row = evt.index[0] if isinstance(evt.index, (list, tuple)) else evt.index
    report = _report(name, settings)
    if report is None or pairs is None or not 0 <= row < len(pairs):
        return gr.skip()
    names = report["names"]
    return f"{names.index(pairs.iloc[row]['true'])},{names.index(pairs.iloc[row]['predicted as'])}"


_REPORTS: dict[Path, tuple[tuple, dict | None]] = {}  # run -> (its report files' times, the report as read)


def _report(name: str | None, settings: AppSettings) -> dict | None:
    """A run's stored test report, read once per version of its files: each click on a row or a pair reads no
    predictions.csv again (a re-evaluation rewrites the files, and is read anew)."""
    from .. import rundir
    from ..evaluation.evaluate import read_report
    run = find_run(settings.runs_dir, name)
    if run is None:
        return None
    stamp = tuple(rundir.mtime(run / f"test_{part}") for part in ("metrics.json", "predictions.csv", "per_class.csv",
                                                                  "confusion.csv", "label_issues.csv"))
    if _REPORTS.get(run, (None,))[0] != stamp:
        if len(_REPORTS) >= 4:
            _REPORTS.pop(next(iter(_REPORTS)))
        _REPORTS[run] = (stamp, read_report(run))
    return _REPORTS[run][1]


def pair_photos(name: str | None, pair: str | None, settings: AppSettings):
    """The test photos of one confusion cell, each over its heatmap of the predicted class (what made the network
    say it)."""
    report = _report(name, settings)
    if not pair or not report:
        return [], []
    true, pred = (int(v) for v in pair.split(","))
    rows = [r for r in report["predictions"] if int(r["label"]) == true and int(r["pred"]) == pred][:PHOTOS]
    photos, paths = _open(report, rows)
    if not photos:
        return [], []
    answers = hardware.answer_photos(str(find_run(settings.runs_dir, name)), [img for img, _ in photos],
                                     {"top_k": 1, "cam": True, "target": pred})
    names = report["names"]
    return ([(a.cam, f"{names[true]} → {names[pred]} ({float(r['prob']):.0%})")
             for a, (_, r) in zip(answers, photos)], paths)


def top_losses(report: dict) -> tuple[list, list[str]]:
    """The test photos whose own label the model found least likely (fastai's plot_top_losses)."""
    if not report["predictions"] or "true_prob" not in report["predictions"][0]:
        return [], []  # a report from before true_prob was saved: re-evaluate
    rows = sorted(report["predictions"], key=lambda r: float(r["true_prob"]))[:GALLERY]
    names = report["names"]
    return _captioned(report, rows, lambda r: f"{names[int(r['label'])]} → {names[int(r['pred'])]} · loss "
                      f"{-math.log(max(float(r['true_prob']), 1e-12)):.2f}")


def label_suspects(report: dict) -> tuple[list, list[str]]:
    names = report["names"]
    return _captioned(report, report.get("label_issues", [])[:GALLERY],
                      lambda r: f"labelled {names[int(r['label'])]}, looks like {names[int(r['suggested'])]}")


def _captioned(report: dict, rows: list[dict], caption) -> tuple[list, list[str]]:
    """Thumbnails of the rows whose photo still opens, each with its caption, and their paths."""
    by_path = {r["path"]: r for r in rows}
    shown = thumbnails(report["data"], by_path, GALLERY)
    return [(img, caption(by_path[rel])) for img, rel in shown], [rel for _, rel in shown]


def _open(report: dict, rows: list[dict]) -> tuple[list, list[str]]:
    """(photo, row) for the rows whose file still opens, and their paths."""
    out = []
    for row in rows:
        try:
            out.append((open_image(os.path.join(report["data"], row["path"])), row))
        except (ImageError, OSError):
            continue
    return out, [r["path"] for _, r in out]


def marks_file(settings: AppSettings) -> Path:
    return Path(settings.runs_dir) / exclusions.FILE_NAME


def marks_table(settings: AppSettings) -> pd.DataFrame:
    marks = exclusions.read_exclusions(marks_file(settings), missing_ok=True) if settings.training_enabled else {}
    return pd.DataFrame(sorted(marks.items()), columns=MARK_COLUMNS)


def select_photo(paths: list[str], evt: gr.SelectData) -> tuple[str | None, str]:
    path = paths[evt.index] if paths and 0 <= evt.index < len(paths) else None
    return path, f"Selected: `{path}`" if path else ""


def mark_photo(path: str | None, reason: str, settings: AppSettings):
    """Add the selected photo to the owner's exclusion list (or take it off with 'keep')."""
    if not settings.training_enabled:
        raise gr.Error("Marking photos is for the app's owner.", print_exception=False)
    if not path:
        raise gr.Error("Click a photo in one of the galleries first.", print_exception=False)
    try:
        exclusions.mark(marks_file(settings), path, reason)
    except (ValueError, OSError) as exc:
        raise gr.Error(settings.redact(str(exc)), print_exception=False) from None
    done = "taken off the list" if reason == exclusions.KEEP else f"marked '{reason}'"
    return f"`{path}` {done}: new runs started here leave the listed photos out.", marks_table(settings)
