"""The runs of a runs folder, as the app and `python -m carapp runs` list them: status, epochs, best figure, pace.

    python -m carapp runs [--dir checkpoints] [--json]

A run's status is read from its progress.json and whether its trainer still lives: `running` only while that process
does; a dead `running` run was `interrupted` (resumable), or `failed` when it died before it spoke. Reading a run is
cached by the modification times of the files it is read from, so the app's timers and every handler of a click
share one scan; the liveness of a trainer is checked on every call (a process dies without touching a file).
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from . import rundir

STARTING = "starting"     # progress phase of a job whose process has not spoken yet
_READ_FROM = ("progress.json", "metrics.jsonl", "config.json")


@dataclass
class RunInfo:
    name: str
    path: Path
    status: str          # running | stopped | finished | failed | interrupted | new
    epochs_done: int
    epochs: int | None
    best_val_acc: float | None  # of the epoch best.pt holds: the lowest val loss (not the highest val acc)
    updated: float
    progress: dict       # progress.json as read (its status is the file's; `status` above is the live one)
    metrics: list[dict]  # metrics.jsonl's epochs
    kind: str = "classifier"  # or "detector" (train-detector): not a model to classify with

    def to_json(self) -> dict:
        return {"name": self.name, "path": str(self.path), "status": self.status, "epochs_done": self.epochs_done,
                "epochs": self.epochs, "best_val_acc": self.best_val_acc, "updated": self.updated,
                "eta_seconds": run_eta(self.progress, self.metrics), "kind": self.kind}


def status_of(progress: dict) -> str:
    """The live status of a progress record already read."""
    status = progress.get("status", "new")
    if status == "running" and not (progress.get("pid") and rundir.pid_alive(progress["pid"])):
        return "failed" if progress.get("phase") == STARTING else "interrupted"  # died before it spoke: bad options
    return status


def run_status(run: Path) -> str:
    return status_of(rundir.read_progress(run))


_READ: dict[Path, tuple[tuple, dict]] = {}  # run folder -> (the modification times it was read at, what was read)


def _signature(run: Path) -> tuple:
    def stamp(path: Path) -> int:
        try:
            return os.stat(path).st_mtime_ns
        except OSError:
            return 0
    # the folder's own time moves with every atomic rewrite (a rename) and every new file: last.pt, best.pt, ...
    return (stamp(run), *(stamp(run / name) for name in _READ_FROM))


def run_info(run: Path) -> RunInfo:
    signature = _signature(run)
    cached = _READ.get(run)
    if cached is None or cached[0] != signature:
        metrics = rundir.read_metrics(run)
        cached = (signature, {"progress": rundir.read_progress(run), "metrics": metrics,
                              "config": rundir.read_json(run / "config.json", {}) or {},
                              "updated": rundir.last_change(run)})
        _READ[run] = cached
    read = cached[1]
    metrics = read["metrics"]
    scored = [m for m in metrics if "val_loss" in m and "val_acc" in m]  # a detector's epochs have AP50 instead
    return RunInfo(name=run.name, path=run, status=status_of(read["progress"]), epochs_done=len(metrics),
                   epochs=read["config"].get("epochs"),
                   best_val_acc=min(scored, key=lambda m: m["val_loss"])["val_acc"] if scored else None,
                   updated=read["updated"], progress=read["progress"], metrics=metrics,
                   kind=_kind(read["config"]))


def _kind(config: dict) -> str:
    """A run's kind as its config.json says; a detector run from before configs said so has no backbone."""
    return config.get("kind") or ("detector" if "steps_per_epoch" in config and "backbone" not in config
                                  else "classifier")


def newest_detector(runs_dir: str | Path) -> Path | None:
    """The newest detector run of a runs folder that has a best.pt: the app's detector when none is configured."""
    return next((r.path for r in list_runs(runs_dir, "detector") if (r.path / "best.pt").is_file()), None)


def list_runs(runs_dir: str | Path, kind: str | None = None) -> list[RunInfo]:
    """Run directories under runs_dir, newest first; of one kind (classifier, detector) when given."""
    runs_dir = Path(runs_dir)
    if not runs_dir.is_dir():
        return []
    # progress.json too: a trainer announces itself there before its config is written
    runs = [run_info(p) for p in runs_dir.iterdir()
            if p.is_dir() and ((p / "config.json").is_file() or (p / "progress.json").is_file())]
    return sorted((r for r in runs if kind in (None, r.kind)), key=lambda r: r.updated, reverse=True)


def find_run(runs_dir: str | Path, name: str | None, kind: str | None = "classifier") -> Path | None:
    """A run by name, only among the runs listed under runs_dir (a name is never a path); a classifier unless
    another kind is asked for."""
    return next((r.path for r in list_runs(runs_dir, kind) if r.name == name), None) if name else None


def active_run(runs_dir: str | Path) -> RunInfo | None:
    return next((r for r in list_runs(runs_dir) if r.status == "running"), None)


def job_status(progress_file: Path) -> dict:
    """A job's progress file (a run's, an evaluation's, an analysis's), with a dead 'running' job marked
    'interrupted', or 'failed' with its last words when it died before it spoke."""
    progress = rundir.read_json(progress_file, {})
    if progress.get("status") == "running" and not rundir.pid_alive(progress.get("pid", 0)):
        progress["status"] = "interrupted"
        if progress.get("phase") == STARTING:
            progress["status"], progress["error"] = "failed", console_tail(progress_file.parent)
    return progress


def console_tail(folder: Path, lines: int = 3) -> str:
    try:
        return " / ".join((folder / "console.log").read_text(errors="replace").strip().splitlines()[-lines:])
    except OSError:
        return ""


def evaluation_status(run: str | Path) -> dict:
    """The evaluation progress of a run: status running | finished | failed | interrupted, done, total."""
    return job_status(Path(run) / rundir.EVAL_PROGRESS)


def run_eta(p: dict, metrics: list[dict]) -> float | None:
    """Seconds until a running run's last epoch ends at its present pace (early stopping may end it sooner), from
    its progress record and epoch lines as the caller read them."""
    if status_of(p) != "running" or not p.get("steps") or "eta_seconds" not in p:
        return None
    epoch_seconds = (sum(m["seconds"] for m in metrics) / len(metrics) if metrics
                     else p["eta_seconds"] * p["steps"] / max(p["steps"] - p["step"], 1))
    return p["eta_seconds"] + max(0, (p.get("epochs") or p["epoch"]) - p["epoch"]) * epoch_seconds
