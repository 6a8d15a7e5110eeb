"""Training as a background job: a `python -m carapp train` subprocess in its own session, watched through its run
directory. It outlives the browser tab and the app itself; after a restart, runs are found again on disk.
"""
from __future__ import annotations

import os
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from . import rundir
from .cli import train_args
from .config import TrainConfig

PACKAGE_PARENT = Path(__file__).resolve().parents[1]


class JobError(RuntimeError):
    """A job request that cannot be honoured; the message is for the user."""


@dataclass
class RunInfo:
    name: str
    path: Path
    status: str          # running | stopped | finished | failed | interrupted | new
    epochs_done: int
    epochs: int | None
    best_val_acc: float | None
    updated: float


def run_status(run: Path) -> str:
    """'running' only while the trainer's process lives; a dead 'running' run was interrupted (resumable)."""
    progress = rundir.read_progress(run)
    status = progress.get("status", "new")
    if status == "running" and not (progress.get("pid") and rundir.pid_alive(progress["pid"])):
        return "interrupted"
    return status


def run_info(run: Path) -> RunInfo:
    metrics = rundir.read_metrics(run)
    config = rundir.read_json(run / "config.json", {}) or {}
    return RunInfo(name=run.name, path=run, status=run_status(run), epochs_done=len(metrics),
                   epochs=config.get("epochs"), best_val_acc=max((m["val_acc"] for m in metrics), default=None),
                   updated=max((p.stat().st_mtime for p in run.iterdir()), default=0.0))


def list_runs(runs_dir: str | Path) -> list[RunInfo]:
    """Run directories under runs_dir, newest first."""
    runs_dir = Path(runs_dir)
    if not runs_dir.is_dir():
        return []
    runs = [run_info(p) for p in runs_dir.iterdir() if p.is_dir() and (p / "config.json").is_file()]
    return sorted(runs, key=lambda r: r.updated, reverse=True)


def find_run(runs_dir: str | Path, name: str | None) -> Path | None:
    """A run by name, only among the runs listed under runs_dir (a name is never a path)."""
    return next((r.path for r in list_runs(runs_dir) if r.name == name), None) if name else None


def active_run(runs_dir: str | Path) -> RunInfo | None:
    return next((r for r in list_runs(runs_dir) if r.status == "running"), None)


def newest_checkpoint(runs_dir: str | Path) -> Path | None:
    """The most recently updated run that has a best.pt: the app's default model."""
    return next((r.path for r in list_runs(runs_dir) if (r.path / "best.pt").is_file()), None)


def _spawn(args: list[str], run: Path) -> subprocess.Popen:
    run.mkdir(parents=True, exist_ok=True)
    console = open(run / "console.log", "ab")
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    # A new session: the job survives the app's death and never gets the app's Ctrl-C.
    return subprocess.Popen([sys.executable, "-m", "carapp", *args], cwd=PACKAGE_PARENT, env=env,
                            stdout=console, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                            start_new_session=True)


def _wait_until_started(proc: subprocess.Popen, run: Path, timeout: float = 60) -> None:
    """Return once the trainer wrote its first progress (or died, with its last words as the error)."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        if rundir.read_progress(run).get("pid") == proc.pid:
            return
        if proc.poll() is not None:
            tail = (run / "console.log").read_text(errors="replace").strip().splitlines()[-3:]
            raise JobError("training did not start: " + " / ".join(tail))
        time.sleep(0.2)


def start_training(cfg: TrainConfig, runs_dir: str | Path, name: str | None = None) -> Path:
    """Start a new run in the background; one active job at a time."""
    _refuse_if_busy(runs_dir)
    name = name or time.strftime(f"{cfg.preset}-%Y%m%d-%H%M%S")
    run = Path(runs_dir) / name
    if (run / "config.json").exists():
        raise JobError(f"a run named {name} exists already")
    proc = _spawn(["train", "--run-dir", str(run), *train_args(cfg)], run)
    _wait_until_started(proc, run)
    return run


def resume_training(run: str | Path, runs_dir: str | Path, epochs: int | None = None) -> Path:
    _refuse_if_busy(runs_dir)
    run = Path(run)
    if not (run / "last.pt").is_file():
        raise JobError(f"{run.name} has no last.pt yet: nothing to resume")
    proc = _spawn(["train", "--resume", str(run)] + (["--epochs", str(epochs)] if epochs else []), run)
    _wait_until_started(proc, run)
    return run


def stop_training(run: str | Path) -> None:
    """Ask politely: the trainer finishes its step, saves last.pt and exits."""
    rundir.request_stop(run)


def _refuse_if_busy(runs_dir: str | Path) -> None:
    busy = active_run(runs_dir)
    if busy:
        raise JobError(f"run {busy.name} is training now: stop it first (one job at a time)")
