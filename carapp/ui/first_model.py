"""A first model for an app with nothing to predict with: the demo preset, trained in the background. A public app
trains it by itself at start-up (the first visitor of a fresh Space sees its progress on Predict, and real answers
for the examples once it is ready); a private one offers it on Predict with one button."""
from __future__ import annotations

import logging
import threading
from pathlib import Path

from .. import rundir
from ..config import make_config
from ..runs import list_runs, run_eta, status_of
from . import jobs
from .settings import AppSettings, ensure_data

NAME = "demo-model"  # the run's name under the runs folder
log = logging.getLogger("carapp")


def needed(settings: AppSettings) -> bool:
    """Public, on a demo dataset, with no configured model and no trained run (or the first model's run was cut
    off by a restart)."""
    if not (settings.public and settings.first_model and not settings.checkpoint and settings.is_demo_like
            and not settings.zerogpu):  # ZeroGPU: a training subprocess gets no GPU (settings.training_off)
        return False
    runs = list_runs(settings.runs_dir, "classifier")
    return not any((r.path / "best.pt").is_file() for r in runs) or \
        any(r.name == NAME and r.status in ("interrupted", "stopped") for r in runs)


def start_in_background(settings: AppSettings) -> threading.Thread | None:
    if not needed(settings):
        return None
    thread = threading.Thread(target=_start, args=(settings,), name="carapp-first-model", daemon=True)
    thread.start()
    return thread


def _start(settings: AppSettings) -> None:
    try:
        start_now(settings)
        log.info("no model configured: training the demo preset as %s", Path(settings.runs_dir) / NAME)
    except (jobs.JobError, OSError, ValueError) as exc:  # busy, or a broken folder: the app serves on without it
        log.warning("could not start the first model: %s", exc)


def offered(settings: AppSettings) -> bool:
    """A private app with no model offers the first model on Predict, where a newcomer is (a public one trains
    it by itself)."""
    return settings.training_enabled and not settings.public and not settings.checkpoint and not any(
        (r.path / "best.pt").is_file() for r in list_runs(settings.runs_dir, "classifier"))


def start_now(settings: AppSettings) -> None:
    """The owner's click: the demo preset on the app's dataset, as the first model (raises JobError when busy)."""
    run = Path(settings.runs_dir) / NAME
    ensure_data(settings)
    if (run / "config.json").is_file() and (run / "split.csv").is_file():
        jobs.resume_training(run, settings.runs_dir)
    else:
        jobs.start_training(make_config("demo", data=settings.data), settings.runs_dir, name=NAME)


def progress(settings: AppSettings) -> str | None:
    """One line while the first model trains (or its job is starting), else None."""
    run = Path(settings.runs_dir) / NAME
    p = rundir.read_progress(run)
    if status_of(p) != "running":
        return None
    eta = run_eta(p, rundir.read_metrics(run))
    where = f"epoch {p['epoch']} of {p.get('epochs', '?')}" if p.get("epoch") else "loading PyTorch and the data"
    return (f"**A first model is being trained for this app** on the synthetic demo cars ({where}"
            + (f", about {eta / 60:.0f} min left" if eta is not None else "") +
            "). The examples can be classified once it is ready; this page picks it up by itself.")
