"""Experiment tracking where users already look: `train --log tensorboard|mlflow|wandb` (comma-separated for several)
sends every metrics.jsonl figure per epoch (lr included), the configuration, the test metrics and the test confusion
matrix there too.

The run directory stays the source of truth: a tracker whose package is missing stops the run before it trains, but a
tracker that fails later (a server down) is warned about once and left out, and training goes on. A resumed run
continues its TensorBoard folder, MLflow run and W&B run (their ids are kept in tracking.json). Only rank 0 tracks.
"""
from __future__ import annotations

import importlib
import json
import logging
import os
import time
from pathlib import Path

import numpy as np

from .. import rundir
from ..config import TrainConfig, tracker_names

log = logging.getLogger("carapp")

MODULES = {"tensorboard": "torch.utils.tensorboard", "mlflow": "mlflow", "wandb": "wandb"}  # tracker (its pip name)
IDS = "tracking.json"            # the MLflow and W&B run ids of this run, so a resume continues the same runs
CAPTION = "test confusion matrix, row-normalised: rows true class, columns predicted (labels.json order)"
WHITE, DARK = np.array([255.0, 255.0, 255.0]), np.array([8.0, 48.0, 107.0])


class TrackerMissing(RuntimeError):
    """A tracker the configuration asks for cannot be imported here; the message names the package to install."""


def check_trackers(log_setting: str) -> None:
    """Raise TrackerMissing for the first tracker of a `log` setting whose package cannot be imported."""
    for name in tracker_names(log_setting):
        try:
            importlib.import_module(MODULES[name])
        except Exception as exc:  # not only ImportError: a broken install fails in its own ways
            raise TrackerMissing(f"--log {name} needs the {name} package, which cannot be imported here ({exc}): "
                                 f"pip install {name}") from None


def open_tracker(cfg: TrainConfig, run: Path) -> Tracker:
    """The trackers cfg.log names, opened on the run from the epoch metrics.jsonl has reached (0, or where a resume
    goes on). Raises TrackerMissing before opening any; one that fails to open is warned about and left out."""
    check_trackers(cfg.log)
    start = max((row["epoch"] for row in rundir.read_metrics(run)), default=0)
    tracker = Tracker(run, [], start)
    for name in tracker_names(cfg.log):
        try:
            tracker.backends.append(BACKENDS[name](cfg, run, start))
        except Exception as exc:
            log.warning("%s: could not start (%s: %s); training goes on without it", name, type(exc).__name__, exc)
    return tracker


class Tracker:
    """The run's trackers behind one face. A tracker that raises is warned about once and dropped for the rest of
    the run: a retrying client would otherwise stall every epoch, and the run directory has every figure anyway."""

    def __init__(self, run: Path, backends: list, start: int):
        self.run, self.backends, self.step, self.finished = run, backends, start, False

    def epoch(self, row: dict) -> None:
        """One metrics.jsonl line: each of its numbers under its own name, at step = epoch."""
        self.step = row["epoch"]
        self._each("epoch", {k: v for k, v in numbers(row).items() if k != "epoch"}, self.step)

    def test(self, metrics: dict) -> None:
        """The test metrics (their numbers, as test/<name>) and the image of the test confusion matrix the run
        directory holds, at the last epoch's step."""
        image = None
        if self.backends:
            try:
                confusion = np.loadtxt(self.run / "test_confusion.csv", delimiter=",", ndmin=2)
                image = confusion_image(confusion, rundir.label_names(self.run))
            except Exception as exc:  # the picture is not worth the run: the trackers get the numbers alone
                log.warning("no confusion image for the trackers (%s: %s)", type(exc).__name__, exc)
        self._each("test", numbers(metrics, "test/"), image, self.step)
        self.finished = True

    def close(self) -> None:
        self._each("close", self.finished)
        self.backends = []

    def _each(self, method: str, *args) -> None:
        for backend in list(self.backends):
            try:
                getattr(backend, method)(*args)
            except Exception as exc:
                log.warning("%s: logging failed (%s: %s); training goes on without it, the run directory keeps "
                            "every figure", backend.name, type(exc).__name__, exc)
                self.backends.remove(backend)


def numbers(values: dict, prefix: str = "") -> dict[str, float]:
    """The numbers of a dict, nested dicts flattened as a/b; flags, text, lists and None left out."""
    found: dict[str, float] = {}
    for key, value in values.items():
        if isinstance(value, dict):
            found |= numbers(value, f"{prefix}{key}/")
        elif isinstance(value, (int, float)) and not isinstance(value, bool):
            found[prefix + key] = value
    return found


def confusion_image(confusion: np.ndarray, names: list[str]) -> np.ndarray:
    """The row-normalised confusion matrix as an (H, W, 3) uint8 array, white (0) to dark blue (1), about 960 pixels
    across at most; with few enough classes for a readable row, their names in a margin on the left."""
    counts = confusion.astype(np.float64)
    rows = counts / np.maximum(counts.sum(1, keepdims=True), 1)
    cell = max(1, min(32, 960 // max(len(rows), 1)))
    colours = WHITE + rows[..., None] * (DARK - WHITE)
    image = np.repeat(np.repeat(colours, cell, 0), cell, 1).round().astype(np.uint8)
    return with_row_names(image, names, cell) if cell >= 12 and len(names) == len(rows) else image


def with_row_names(image: np.ndarray, names: list[str], cell: int) -> np.ndarray:
    """The image framed, with a white margin on the left holding each row's class name (PIL's built-in font)."""
    from PIL import Image, ImageDraw, ImageFont
    font = ImageFont.load_default()
    labels = [name[:32] for name in names]
    margin = 8 + max(int(ImageDraw.Draw(Image.new("RGB", (1, 1))).textlength(t, font=font)) for t in labels)
    canvas = Image.new("RGB", (margin + image.shape[1], image.shape[0]), "white")
    canvas.paste(Image.fromarray(image), (margin, 0))
    draw = ImageDraw.Draw(canvas)
    draw.rectangle((margin - 1, 0, canvas.width - 1, canvas.height - 1), outline="grey")  # white cells on white
    for i, label in enumerate(labels):  # right-aligned by hand: anchors need a TrueType font, and Pillow's built-in
        left, top, right, bottom = draw.textbbox((0, 0), label, font=font)  # font is a bitmap one before 10.1
        draw.text((margin - 4 - right, i * cell + (cell - top - bottom) // 2), label, fill="black", font=font)
    return np.asarray(canvas)


def _config_markdown(config: dict) -> str:
    """config.json as a Markdown code block (TensorBoard renders text as Markdown)."""
    return "\n".join("    " + line for line in json.dumps(config, indent=2).splitlines())


def _save_id(run: Path, name: str, run_id: str) -> None:
    rundir.write_json(run / IDS, rundir.read_json(run / IDS, {}) | {name: run_id})


class TensorBoard:
    """Event files in <run>/tensorboard/: `tensorboard --logdir checkpoints/` shows every run."""
    name = "tensorboard"

    def __init__(self, cfg: TrainConfig, run: Path, start: int):
        from torch.utils.tensorboard import SummaryWriter

        # A resume hides whatever an earlier start logged past the epochs last.pt kept (they are trained again); a
        # fresh start hides everything, its config too.
        self.writer = SummaryWriter(str(run / "tensorboard"), purge_step=start + 1 if start else 0)
        self.writer.add_text("config", _config_markdown(cfg.to_dict()), start)
        self.writer.flush()

    def epoch(self, values: dict, step: int) -> None:
        for key, value in values.items():
            self.writer.add_scalar(key, value, step)
        self.writer.flush()  # a TensorBoard open beside the run shows each epoch as it ends

    def test(self, values: dict, image: np.ndarray, step: int) -> None:
        for key, value in values.items():
            self.writer.add_scalar(key, value, step)
        if image is not None:
            self.writer.add_image("test/confusion", image, step, dataformats="HWC")
        self.writer.flush()

    def close(self, finished: bool) -> None:
        self.writer.close()


class MLflow:
    """A run in the experiment MLFLOW_EXPERIMENT_NAME (default carapp) at MLFLOW_TRACKING_URI (default a SQLite store
    in <run>/mlflow.db and files in <run>/mlartifacts; MLflow 3 refuses new file stores): the configuration as params
    and as config.json, the figures as metrics, the confusion image."""
    name = "mlflow"

    def __init__(self, cfg: TrainConfig, run: Path, start: int):
        import mlflow
        from mlflow.entities import Metric, Param
        self.Metric = Metric
        local = not os.environ.get("MLFLOW_TRACKING_URI")
        self.client = mlflow.MlflowClient(f"sqlite:///{(run / 'mlflow.db').resolve()}" if local else None)
        self.run_id = rundir.read_json(run / IDS, {}).get("mlflow")
        if self.run_id:  # a resume: MLflow refuses a param changed (--epochs), so config.json alone is updated
            self.client.update_run(self.run_id, status="RUNNING")
        else:
            artifacts = (run / "mlartifacts").resolve().as_uri() if local else None  # None: the server decides
            self.run_id = self.client.create_run(self._experiment(artifacts), run_name=run.name).info.run_id
            _save_id(run, "mlflow", self.run_id)
            params = [Param(k, str(v)) for k, v in cfg.to_dict().items()]
            for i in range(0, len(params), 100):  # at most 100 params per request
                self.client.log_batch(self.run_id, params=params[i:i + 100])
        self.client.log_dict(self.run_id, cfg.to_dict(), "config.json")

    def _experiment(self, artifacts: str | None) -> str:
        """The experiment's id, created where missing (artifacts: where its files go; None: the server decides)."""
        name = os.environ.get("MLFLOW_EXPERIMENT_NAME") or "carapp"
        found = self.client.get_experiment_by_name(name)
        return found.experiment_id if found else self.client.create_experiment(name, artifact_location=artifacts)

    def epoch(self, values: dict, step: int) -> None:
        now = int(time.time() * 1000)
        self.client.log_batch(self.run_id, metrics=[self.Metric(k, float(v), now, step) for k, v in values.items()])

    def test(self, values: dict, image: np.ndarray, step: int) -> None:
        self.epoch(values, step)
        if image is not None:
            self.client.log_image(self.run_id, image, "test_confusion.png")

    def close(self, finished: bool) -> None:
        self.client.set_terminated(self.run_id, "FINISHED" if finished else "KILLED")  # KILLED: stopped or failed


class WandB:
    """A Weights & Biases run in project WANDB_PROJECT (default carapp), files under <run>/wandb/; WANDB_MODE=offline
    works without a network (`wandb sync` uploads later)."""
    name = "wandb"

    def __init__(self, cfg: TrainConfig, run: Path, start: int):
        import wandb
        self.wandb = wandb
        stored = rundir.read_json(run / IDS, {}).get("wandb")
        self.run = wandb.init(project=os.environ.get("WANDB_PROJECT") or "carapp", dir=str(run), name=run.name,
                              id=stored, resume="allow" if stored else None)
        self.run.config.update(cfg.to_dict(), allow_val_change=True)  # a resume may change epochs
        _save_id(run, "wandb", self.run.id)

    def epoch(self, values: dict, step: int) -> None:
        self.run.log(values, step=step)

    def test(self, values: dict, image: np.ndarray, step: int) -> None:
        pictures = {"test/confusion": self.wandb.Image(image, caption=CAPTION)} if image is not None else {}
        self.run.log(values | pictures, step=step)

    def close(self, finished: bool) -> None:
        self.run.finish()


BACKENDS = {"tensorboard": TensorBoard, "mlflow": MLflow, "wandb": WandB}
