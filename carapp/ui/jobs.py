"""Training as a background job: a `python -m carapp train` subprocess in its own session, watched through its run
directory. It outlives the browser tab and the app itself; after a restart, runs are found again on disk. On a
ZeroGPU Space an analysis is a thread of the app instead (start_in_app), holding the same one job slot.
"""
from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import logging
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Callable

from .. import exclusions, rundir
from ..config import TrainConfig
from ..runs import STARTING, active_run, console_tail
from . import hardware

PACKAGE_PARENT = Path(__file__).resolve().parents[2]  # the folder holding carapp/: where `-m carapp` is found
JOB_FILE = ".app-job.json"              # in the runs folder: the job the app started last
REQUESTED_CONFIG = "requested_config.json"  # what the app asked a new run to train with
# A job that changes nothing in its folder for this long is taken as hung and ended (CARAPP_JOB_STALL_MINUTES):
# every kind of job writes its progress at least every few steps or photos.
STALL_SECONDS = float(os.environ.get("CARAPP_JOB_STALL_MINUTES") or 30) * 60
_START_LOCK = threading.Lock()
log = logging.getLogger("carapp")
TREND_PERIOD = "month"                  # an analysis's report counts per month; the Analyze tab redraws per choice
TREND_TIMES = "exif"                    # ... by the photos' own dates


class JobError(RuntimeError):
    """A job request that cannot be honoured; the message is for the user."""


class JobBusy(JobError):
    """Another job holds the one job slot; the message names it (a public app says less: see analyze_tab)."""


def _spawn(args: list[str], run: Path) -> subprocess.Popen:
    run.mkdir(parents=True, exist_ok=True)
    console = open(run / "console.log", "ab")
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    # A new session: the job survives the app's death and never gets the app's Ctrl-C.
    return subprocess.Popen([sys.executable, "-m", "carapp", *args], cwd=PACKAGE_PARENT, env=env,
                            stdout=console, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                            start_new_session=True)


def _wait_until_started(proc: subprocess.Popen, progress: Path, timeout: float = 3) -> None:
    """Return once the job wrote progress of its own or has lived `timeout` seconds (importing PyTorch takes longer;
    the job file already marks it busy), or raise with its last words if it died at once (bad options)."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        if rundir.read_json(progress, {}).get("phase") != STARTING:
            return
        if proc.poll() is not None:
            raise JobError("the job did not start: " + console_tail(progress.parent))
        time.sleep(0.2)


def app_job(runs_dir: str | Path) -> dict | None:
    """The job this app started last, while it lives and moves: {"pid", "started", "since", "run", "kind", "folder",
    "progress"}. A job whose process is gone (its PID perhaps another process's now) or that changed nothing in its
    folder for STALL_SECONDS holds the one job slot no longer: it is ended with whatever it left running, and its
    log and progress say why. So neither a hung job nor a restart of the app keeps every later job refused."""
    path = Path(runs_dir) / JOB_FILE
    job = rundir.read_json(path)
    if not job:
        return None
    pid = job.get("pid", 0)
    reused = rundir.pid_alive(pid) and job.get("started") not in (None, rundir.process_started(pid))
    alive = rundir.pid_alive(pid) and not reused
    folder = Path(job.get("folder") or Path(runs_dir) / job.get("run", ""))
    quiet = time.time() - max(rundir.last_change(folder), job.get("since", 0))
    if alive and quiet < STALL_SECONDS:
        return job
    if not reused and not job.get("in_app"):  # a hung job and its loader workers, or workers a dead job left
        # behind: one process group (an in-app job's process is this app: it is only marked ended)
        with contextlib.suppress(OSError):
            os.killpg(pid, signal.SIGKILL)
    _mark_ended(job, folder, f"it made no progress for {quiet / 60:.0f} minutes" if alive else "its process is gone")
    if rundir.read_json(path) == job:  # not a job another app process started meanwhile
        path.unlink(missing_ok=True)
    return None


def _mark_ended(job: dict, folder: Path, why: str) -> None:
    """A job that ended without saying so (its progress still 'running'): a line in its console.log, and its
    progress marked — interrupted for a trainer (its last.pt makes the run resumable), failed for the others."""
    progress = folder / job.get("progress", "progress.json")
    record = rundir.read_json(progress, {})
    if record.get("status") != "running":
        return  # it finished, stopped or failed by itself and said so
    with contextlib.suppress(OSError), open(folder / "console.log", "a") as log:
        log.write(f"\ncarapp app: this {job.get('kind', '')} job was ended: {why}. The app's job slot is free.\n")
    status = "interrupted" if job.get("kind") == "train" else "failed"
    rundir.write_json(progress, {**record, "status": status, "error": f"ended by the app: {why}"})


@contextlib.contextmanager
def _one_job(runs_dir: str | Path):
    """Check and start as one step: a thread lock inside the app, an flock across app processes. The new job's
    PID is recorded before the lock opens, so the next caller sees it busy before the job's first progress write."""
    runs_dir = Path(runs_dir)
    runs_dir.mkdir(parents=True, exist_ok=True)
    with _START_LOCK, open(runs_dir / ".jobs.lock", "a") as lock_file:
        fcntl.flock(lock_file, fcntl.LOCK_EX)
        busy = active_run(runs_dir)
        job = app_job(runs_dir)
        if busy or job:
            name = busy.name if busy else job["run"]
            raise JobBusy(f"{name} is busy with a job now: wait for it or stop it (one job at a time)")
        yield


def _start(runs_dir: str | Path, args: list[str], folder: Path, kind: str, progress: str = "progress.json") -> Path:
    """One background job (`python -m carapp ARGS`) writing into `folder`, once nothing else runs."""
    with _one_job(runs_dir):
        proc = _spawn(args, folder)
        rundir.write_json(Path(runs_dir) / JOB_FILE, {"pid": proc.pid, "started": rundir.process_started(proc.pid),
                                                      "since": time.time(), "run": folder.name, "kind": kind,
                                                      "folder": str(folder), "progress": progress})
        # the job's progress, as the job itself will write it, so that every view sees it running from now on
        rundir.write_json(folder / progress, {"status": "running", "phase": STARTING, "pid": proc.pid,
                                              "updated": time.time()})
    _wait_until_started(proc, folder / progress)
    return folder


def start_in_app(runs_dir: str | Path, folder: Path, kind: str, work: Callable[[], object]) -> Path:
    """A job that runs in a thread of this app instead of a subprocess (an analysis on a ZeroGPU Space, whose GPU
    calls must come from the app itself). It holds the one job slot as any job does; when `work` raises, its
    progress says failed and why."""
    runs_dir, pid = Path(runs_dir), os.getpid()
    with _one_job(runs_dir):
        folder.mkdir(parents=True, exist_ok=True)
        job = {"pid": pid, "started": rundir.process_started(pid), "since": time.time(), "run": folder.name,
               "kind": kind, "folder": str(folder), "progress": "progress.json", "in_app": True}
        rundir.write_json(runs_dir / JOB_FILE, job)
        rundir.write_json(folder / "progress.json", {"status": "running", "phase": STARTING, "pid": pid,
                                                     "updated": time.time()})
    threading.Thread(target=_run_in_app, args=(runs_dir, folder, work, job), name=f"carapp-{kind}",
                     daemon=True).start()
    return folder


def _run_in_app(runs_dir: Path, folder: Path, work: Callable[[], object], job: dict) -> None:
    try:
        work()
    except Exception as exc:  # noqa: BLE001 - whatever it was, the job's folder says so and the slot frees
        message = getattr(exc, "message", None) or str(exc) or type(exc).__name__
        log.warning("the %s job %s failed: %s", job["kind"], folder.name, message)
        with contextlib.suppress(OSError), open(folder / "console.log", "a") as console:
            console.write(f"carapp app: this {job['kind']} job failed: {message}\n")
        record = rundir.read_json(folder / "progress.json", {})
        rundir.write_json(folder / "progress.json", {**record, "status": "failed", "error": message,
                                                     "updated": time.time()})
    finally:
        if rundir.read_json(runs_dir / JOB_FILE) == job:
            (runs_dir / JOB_FILE).unlink(missing_ok=True)


def start_training(cfg: TrainConfig, runs_dir: str | Path, name: str | None = None) -> Path:
    """Start a new run in the background; one active job at a time. The trainer gets the config itself (every
    field, as config.json will hold it), not a command line rebuilt from it."""
    name = name or time.strftime(f"{cfg.preset}-%Y%m%d-%H%M%S")
    run = Path(runs_dir) / name
    if (run / "config.json").exists():
        raise JobError(f"a run named {name} exists already")
    run.mkdir(parents=True, exist_ok=True)
    marks = Path(runs_dir) / exclusions.FILE_NAME  # photos marked in the app: every new run leaves them out
    if not cfg.exclude and marks.is_file():
        cfg = dataclasses.replace(cfg, exclude=str(marks.resolve()))
    rundir.write_json(run / REQUESTED_CONFIG, cfg.to_dict())
    return _start(runs_dir, ["train", "--run-dir", str(run), "--config", str(run / REQUESTED_CONFIG)], run, "train")


def resume_training(run: str | Path, runs_dir: str | Path, epochs: int | None = None) -> Path:
    """Continue a run; one killed before its first last.pt starts again on its frozen split, as the CLI does."""
    run = Path(run)
    if not (run / "config.json").is_file() or not (run / "split.csv").is_file():
        raise JobError(f"{run.name} has no config.json and split.csv: nothing to resume")
    args = ["train", "--resume", str(run)] + (["--epochs", str(epochs)] if epochs else [])
    return _start(runs_dir, args, run, "train")


def start_evaluation(run: str | Path, runs_dir: str | Path, split: str = "test") -> Path:
    """Evaluate a run's best.pt in the background (its files are replaced atomically when it ends)."""
    run = Path(run)
    args = ["evaluate", "--run", str(run), "--split", split, "--workers", "0"]
    return _start(runs_dir, args, run, "evaluate", rundir.EVAL_PROGRESS)


def start_analysis(sources: list[str], model: str, out: Path, runs_dir: str | Path, group_by: str = "folder",
                   detector: str | None = None) -> Path:
    """Analyse a collection in the background into `out` (predictions.csv, summary.csv, report.html); with a
    detector, one row per car. Photos' times come from their EXIF: the report shows the shares per month. On
    ZeroGPU, a job of this app made of GPU calls (hardware.analyze_in_calls)."""
    if hardware.on_zerogpu():  # the GPU is lent to this app's own calls only
        options = {"time_source": TREND_TIMES, "period": TREND_PERIOD}
        return start_in_app(runs_dir, out, "analyze", lambda: hardware.analyze_in_calls(
            sources, model, out, group_by, detector, options))
    args = ["analyze", *sources, "--run", model, "--out", str(out), "--group-by", group_by, "--workers", "1",
            "--detector", detector or "none", "--time", TREND_TIMES, "--period", TREND_PERIOD]
    return _start(runs_dir, args, out, "analyze")


def started_by_app(runs_dir: str | Path, run: str | Path) -> bool:
    job = app_job(runs_dir)
    return bool(job) and job["run"] == Path(run).name


def stop_training(run: str | Path) -> None:
    """Ask politely: the trainer finishes its step, saves last.pt and exits. The Stop names the trainer running
    now, so it never stops the one a later Resume starts."""
    rundir.request_stop(run, rundir.read_progress(Path(run)).get("pid"))
