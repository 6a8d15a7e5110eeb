"""The run directory: the only contract between the trainer and everything that watches it (CLI, app, tests).

config.json, labels.json, split.csv, metrics.jsonl, progress.json (live status), last.pt / best.pt,
<split>_metrics.json / _per_class.csv / _confusion.csv / _predictions.csv (after training: test), bad_images.txt,
train.log; with --log (carapp.training.tracking) tensorboard/, mlflow.db, mlartifacts/, wandb/ and tracking.json;
a STOP file asks a running trainer to stop.
"""
from __future__ import annotations

import csv
import json
import os
import time
from pathlib import Path

from .atomic import atomic_writer
from .dataset.index import index_dataset
from .dataset.split import Split

STEPS_FILE = "steps.jsonl"                 # running training figures, about once a second (read_steps)
EVAL_PROGRESS = "evaluate_progress.json"   # live progress of an evaluation (status, split, done, total, pid)



def write_json(path: Path, obj) -> None:
    """Atomic, so a reader polling the file never sees half of it."""
    with atomic_writer(path) as f:
        f.write(json.dumps(obj, indent=2))


def read_json(path: Path, default=None):
    try:
        return json.loads(Path(path).read_text())
    except (OSError, ValueError):
        return default


def write_split(run: Path, split: Split) -> None:
    with atomic_writer(run / "split.csv", newline="") as f:
        w = csv.writer(f)
        w.writerow(["path", "label", "split"])
        w.writerows(zip(split.paths, split.labels, split.splits))
    labels = [{"index": i, **info} for i, info in enumerate(split.class_info)]
    write_json(run / "labels.json", labels)


def read_split(run: Path, bboxes_by_path: dict | None = None) -> Split:
    """The frozen split of a run; boxes come from the dataset index (they are not part of the contract)."""
    with open(run / "split.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    labels = read_json(run / "labels.json")
    bboxes_by_path = bboxes_by_path or {}
    return Split(paths=[r["path"] for r in rows], labels=[int(r["label"]) for r in rows],
                 splits=[r["split"] for r in rows], bboxes=[bboxes_by_path.get(r["path"]) for r in rows],
                 class_info=[{k: v for k, v in c.items() if k != "index"} for c in labels])


def read_run_split(run: Path, cfg, boxes: bool = False) -> Split:
    """The frozen split of a run (cfg: its TrainConfig), with the dataset's car boxes when asked (`boxes`) or when
    the run uses them: it crops to them, or moves cars onto backdrops."""
    if boxes or cfg.crop_bbox or cfg.backdrops:
        index = index_dataset(cfg.data, cfg.format)
        return read_split(run, dict(zip(index.paths, index.bboxes)))
    return read_split(run)


def label_names(run: Path) -> list[str]:
    return [c["name"] for c in read_json(Path(run) / "labels.json", [])]


def append_metrics(run: Path, row: dict) -> None:
    with open(run / "metrics.jsonl", "a") as f:
        f.write(json.dumps(row) + "\n")
        f.flush()
        os.fsync(f.fileno())


def read_metrics(run: Path) -> list[dict]:
    """Finished epochs; a torn last line (a crash mid-write) is ignored."""
    return _read_lines(Path(run) / "metrics.jsonl")


def append_step(run: Path, row: dict) -> None:
    """A line of steps.jsonl, the training pass's running figures as the live progress shows them (about once a
    second): the curves show them before the first epoch ends. A view only: not fsynced."""
    with open(run / STEPS_FILE, "a") as f:
        f.write(json.dumps(row) + "\n")


def read_steps(run: Path, most: int = 2000) -> list[dict]:
    """The running figures, one per (epoch, step) — a resumed pass's own where it went over the same steps again —
    in order, thinned to at most `most` rows."""
    rows = {(r["epoch"], r["step"]): r for r in _read_lines(Path(run) / STEPS_FILE) if {"epoch", "step"} <= set(r)}
    ordered = [rows[k] for k in sorted(rows)]
    return ordered[::-(-len(ordered) // most)] if len(ordered) > most else ordered


def _read_lines(path: Path) -> list[dict]:
    rows = []
    try:
        lines = path.read_text().splitlines()
    except OSError:
        return rows
    for line in lines:
        try:
            rows.append(json.loads(line))
        except ValueError:
            continue
    return rows


def truncate_metrics(run: Path, epochs_done: int) -> None:
    """On resume, keep only the epochs the checkpoint knows, so no epoch is listed twice."""
    rows = [r for r in read_metrics(run) if r["epoch"] <= epochs_done]
    with atomic_writer(run / "metrics.jsonl") as f:
        f.write("".join(json.dumps(r) + "\n" for r in rows))


def write_progress(run: Path, **fields) -> None:
    write_json(run / "progress.json", {**fields, "updated": time.time(), "pid": os.getpid()})


def read_progress(run: Path) -> dict:
    return read_json(Path(run) / "progress.json", {})


def mtime(path: Path) -> float:
    """Modification time, 0.0 for a file that is gone: a trainer replaces and deletes files while the app looks."""
    try:
        return path.stat().st_mtime
    except OSError:
        return 0.0


def last_change(run: Path) -> float:
    """When anything in the run last changed (its temp files come and go mid-listing)."""
    try:
        return max((mtime(p) for p in run.iterdir()), default=0.0)
    except OSError:  # the run folder itself went away
        return 0.0


def stop_target(run: Path) -> str | None:
    """What a STOP file in the run asks: None (there is none), "" (whichever trainer runs: `touch STOP`), or the
    PID of the one trainer it was pressed for (the app's Stop)."""
    try:
        return (Path(run) / "STOP").read_text().strip()
    except OSError:
        return None


def stop_requested(run: Path, pid: int | None = None) -> bool:
    """Whether the trainer with this PID (default: this process) is asked to stop. A Stop pressed for one job never
    stops the next one: a resumed trainer is another process."""
    return stop_target(run) in ("", str(pid or os.getpid()))


def request_stop(run: str | os.PathLike, pid: int | None = None) -> None:
    """Ask the trainer with this PID to stop (None: whichever trainer runs the run now)."""
    with atomic_writer(Path(run) / "STOP") as f:
        f.write(str(pid) if pid else "")


class RunLocked(RuntimeError):
    """Another live process is training this run."""


def acquire_lock(run: Path) -> Path:
    """train.lock holds the trainer's PID; a lock whose process is gone is stale and taken over."""
    lock = run / "train.lock"
    while True:
        try:
            fd = os.open(lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
        except FileExistsError:
            try:
                pid = int(lock.read_text().strip() or 0)
            except (OSError, ValueError):
                pid = 0
            if pid and pid != os.getpid() and pid_alive(pid):
                raise RunLocked(f"{run} is being trained by process {pid}; stop it first (touch {run}/STOP)") from None
            lock.unlink(missing_ok=True)  # stale: its trainer died without cleaning up
            continue
        with os.fdopen(fd, "w") as f:
            f.write(str(os.getpid()))
        return lock


def pid_alive(pid: int | None) -> bool:
    if not pid or pid < 1:  # 0 and negatives would name process groups, not a process
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    fields = _proc_stat(pid)  # a zombie (exited, not yet reaped) holds nothing
    return fields is None or fields[0] != "Z"


def process_started(pid: int) -> int | None:
    """When a process started (clock ticks since boot): with the PID, it names one process, never its successor."""
    fields = _proc_stat(pid)
    try:
        return int(fields[19]) if fields else None
    except (ValueError, IndexError):
        return None


def _proc_stat(pid: int) -> list[str] | None:
    """/proc/PID/stat from its state field on (the command name before it may hold spaces), or None."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(") ", 1)[-1].split()
    except OSError:
        return None


def remove_stale_temp_files(run: Path) -> None:
    """Half-written checkpoints of a killed trainer (the real files were never touched)."""
    for tmp in run.glob(".*.tmp"):
        tmp.unlink(missing_ok=True)
