"""Experiment tracking: TensorBoard for real (event files read back), MLflow and W&B through stand-in modules that
record the calls carapp makes (the real packages are not installed here)."""
from __future__ import annotations

import io
import json
import logging
import shutil
import sys
import textwrap
import types
from collections import namedtuple
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from carapp import cli, rundir
from carapp.config import make_config
from carapp.training import tracking
from carapp.training.train import train

TINY = dict(backbone="resnet18", image_size=32, batch_size=8, workers=0, steps_per_epoch=1)


def tiny_config(demo_root: Path, **overrides):
    return make_config("demo", data=str(demo_root), **{**TINY, **overrides})


def read_events(folder: Path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    events = EventAccumulator(str(folder), size_guidance={"scalars": 0, "images": 0, "tensors": 0})
    events.Reload()
    return events


def as_logged(value) -> float:
    """What a TensorBoard scalar holds of a number: its float32."""
    return float(np.float32(value))


class Calls(list):
    """The calls made on the stand-in modules, as (name, args, kwargs)."""

    def named(self, name: str) -> list:
        return [(args, kwargs) for n, args, kwargs in self if n == name]


def fake_mlflow(monkeypatch, calls: Calls, fail_on: str | None = None) -> None:
    """A stand-in for mlflow: MlflowClient records its calls; `fail_on` names one that raises (a server gone)."""

    class Client:
        def __init__(self, tracking_uri=None):
            calls.append(("MlflowClient", (tracking_uri,), {}))

        def get_experiment_by_name(self, name):
            return None

        def create_run(self, experiment_id, run_name=None):
            calls.append(("create_run", (experiment_id,), {"run_name": run_name}))
            return types.SimpleNamespace(info=types.SimpleNamespace(run_id="mlflow-run-1"))

        def __getattr__(self, name):  # every other call: recorded; create_experiment's answer is its id
            def record(*args, **kwargs):
                calls.append((name, args, kwargs))
                if name == fail_on and kwargs.get("metrics"):
                    raise ConnectionError("tracking server unreachable")
                return "experiment-1"
            return record

    module, entities = types.ModuleType("mlflow"), types.ModuleType("mlflow.entities")
    module.MlflowClient = Client
    entities.Metric = namedtuple("Metric", "key value timestamp step")
    entities.Param = namedtuple("Param", "key value")
    monkeypatch.setitem(sys.modules, "mlflow", module)
    monkeypatch.setitem(sys.modules, "mlflow.entities", entities)


def fake_wandb(monkeypatch, calls: Calls) -> None:
    """A stand-in for wandb: init returns a run that records config updates, logs and finish."""

    class Run:
        id = "wandb-run-1"
        config = types.SimpleNamespace(update=lambda values, allow_val_change=False: calls.append(
            ("config.update", (values,), {"allow_val_change": allow_val_change})))

        def log(self, values, step=None):
            calls.append(("log", (values,), {"step": step}))

        def finish(self):
            calls.append(("finish", (), {}))

    def init(**kwargs):
        calls.append(("init", (), kwargs))
        return Run()

    module = types.ModuleType("wandb")
    module.init = init
    module.Image = lambda data, caption=None: ("Image", data.shape, caption)
    monkeypatch.setitem(sys.modules, "wandb", module)


class Warnings(logging.Handler):
    """The carapp warnings logged while it is attached (caplog is per test; the tracked run is per module)."""

    def __init__(self):
        super().__init__(logging.WARNING)
        self.messages: list[str] = []

    def emit(self, record):
        self.messages.append(record.getMessage())


@pytest.fixture(scope="module")
def tracked_run(demo_root, tmp_path_factory):
    """A run tracked by TensorBoard (for real), W&B and MLflow (stand-ins; the MLflow server fails at the first figure
    each start sends it): one epoch; then a trainer that logged epoch 2 and died before its last.pt (its figure
    written straight into the event folder); then a resume to epoch 2."""
    from torch.utils.tensorboard import SummaryWriter
    run = tmp_path_factory.mktemp("tracked") / "run"
    tracked = types.SimpleNamespace(run=run, mlflow=Calls(), wandb=Calls(), warnings=Warnings(), results=[])
    logger = logging.getLogger("carapp")
    logger.addHandler(tracked.warnings)
    try:
        with pytest.MonkeyPatch.context() as patch:
            fake_mlflow(patch, tracked.mlflow, fail_on="log_batch")
            fake_wandb(patch, tracked.wandb)
            for name in ("MLFLOW_TRACKING_URI", "WANDB_PROJECT"):
                patch.delenv(name, raising=False)
            tracked.results.append(train(tiny_config(demo_root, epochs=1, log="tensorboard,mlflow,wandb"), run))
            dying = SummaryWriter(str(run / "tensorboard"))
            dying.add_scalar("train_loss", 99.0, 2)
            dying.close()
            tracked.results.append(train(tiny_config(demo_root), run, resume=True, epochs=2))
    finally:
        logger.removeHandler(tracked.warnings)
    return tracked


def test_tensorboard_holds_each_epoch_once_as_metrics_jsonl_has_it(tracked_run):
    run = tracked_run.run
    rows = rundir.read_metrics(run)
    assert [r["epoch"] for r in rows] == [1, 2]
    events = read_events(run / "tensorboard")
    for key in tracking.numbers(rows[0]).keys() - {"epoch"}:  # train/val loss and accuracy, lr, seconds
        logged = [(e.step, e.value) for e in events.Scalars(key)]
        assert logged == [(r["epoch"], as_logged(r[key])) for r in rows], key


def test_tensorboard_holds_the_config_the_test_metrics_and_the_confusion_image(tracked_run):
    run = tracked_run.run
    events = read_events(run / "tensorboard")
    texts = events.Tensors("config/text_summary")  # one per start: the resume's is the config it trained with
    assert [t.step for t in texts] == [0, 1]
    config = json.loads(textwrap.dedent(texts[-1].tensor_proto.string_val[0].decode()))
    assert config == rundir.read_json(run / "config.json") and config["epochs"] == 2
    test = tracking.numbers(rundir.read_json(run / "test_metrics.json"))
    assert {"top1", "top5", "macro_f1", "ece", "make_top1"} <= test.keys()
    for key, value in test.items():
        assert (events.Scalars(f"test/{key}")[-1].step, events.Scalars(f"test/{key}")[-1].value) == \
            (2, as_logged(value)), key
    image = events.Images("test/confusion")[-1]
    confusion = np.loadtxt(run / "test_confusion.csv", delimiter=",", ndmin=2)
    expected = tracking.confusion_image(confusion, rundir.label_names(run))
    with Image.open(io.BytesIO(image.encoded_image_string)) as png:
        assert image.step == 2 and np.array_equal(np.asarray(png.convert("RGB")), expected)


def test_confusion_image_is_row_normalised_and_names_the_rows_when_they_fit():
    few = tracking.confusion_image(np.array([[3, 1], [0, 0]]), ["Aurora Sprint", "Brightwell Pip"])
    many = tracking.confusion_image(np.eye(200, dtype=int), [f"class {i}" for i in range(200)])
    assert many.shape == (800, 800, 3) and (many[0, 0] == tracking.DARK).all() and (many[0, 4] == 255).all()
    assert few.shape[0] == 64 and few.shape[1] > 64 + 40  # two 32-pixel rows, a margin for the names
    right = few[:, -64:]
    assert tuple(right[16, 16]) == tuple(np.round(tracking.WHITE + 0.75 * (tracking.DARK - tracking.WHITE)))
    assert (right[40:60, 4:60] == 255).all()  # a class without test images: a white row, not a division by zero


def test_a_missing_tracker_package_stops_the_run_before_it_starts(demo_root, tmp_path, monkeypatch, capfd, caplog):
    monkeypatch.setitem(sys.modules, "mlflow", None)  # what `import mlflow` meets where it is not installed
    with caplog.at_level(logging.INFO, logger="carapp"):
        code = cli.main(["train", "--data", str(demo_root), "--run-dir", str(tmp_path / "run"), "--log", "mlflow",
                         "--preset", "demo", "--json"])
    lines = [r.getMessage() for r in caplog.records if r.name == "carapp"]
    assert code == 2 and len(lines) == 1 and lines[0].startswith("error: --log mlflow needs the mlflow package")
    assert lines[0].endswith(": pip install mlflow")
    assert "pip install mlflow" in json.loads(capfd.readouterr().out)["error"]
    assert not (tmp_path / "run").exists()
    with pytest.raises(tracking.TrackerMissing, match="pip install mlflow"):
        train(tiny_config(demo_root, log="tensorboard,mlflow"), tmp_path / "api-run")
    assert not (tmp_path / "api-run").exists()


def test_a_resume_asking_for_a_missing_tracker_stops_before_training(tracked_run, tmp_path, monkeypatch):
    run = shutil.copytree(tracked_run.run, tmp_path / "run")
    rundir.write_json(run / "config.json", rundir.read_json(run / "config.json") | {"log": "wandb"})
    monkeypatch.setitem(sys.modules, "wandb", None)
    with pytest.raises(tracking.TrackerMissing, match="pip install wandb"):
        train(tiny_config(""), run, resume=True, epochs=3)
    assert [r["epoch"] for r in rundir.read_metrics(run)] == [1, 2]


def test_a_tracker_failing_mid_run_is_warned_about_once_and_training_goes_on(tracked_run):
    assert [r["status"] for r in tracked_run.results] == ["finished", "finished"]
    assert [r["epoch"] for r in rundir.read_metrics(tracked_run.run)] == [1, 2]
    warned = [m for m in tracked_run.warnings.messages if m.startswith("mlflow:")]
    assert len(warned) == 2 and all("tracking server unreachable" in m for m in warned)  # once per start
    # each start stops sending to MLflow after its failure; the resume continued the MLflow run it had begun
    assert [name for name, _, _ in tracked_run.mlflow] == [
        "MlflowClient", "create_experiment", "create_run", "log_batch", "log_dict", "log_batch",
        "MlflowClient", "update_run", "log_dict", "log_batch"]
    assert tracked_run.mlflow[0][1] == (f"sqlite:///{(tracked_run.run / 'mlflow.db').resolve()}",)  # no URI: local
    assert rundir.read_json(tracked_run.run / tracking.IDS) == {"mlflow": "mlflow-run-1", "wandb": "wandb-run-1"}


def test_wandb_gets_every_epoch_the_test_and_the_confusion_image_and_a_resume_continues_its_run(tracked_run):
    run, calls = tracked_run.run, tracked_run.wandb
    first, second = [kw for _, kw in calls.named("init")]
    assert first == {"project": "carapp", "dir": str(run), "name": "run", "id": None, "resume": None}
    assert second == first | {"id": "wandb-run-1", "resume": "allow"}
    assert calls.named("config.update")[-1] == ((rundir.read_json(run / "config.json"),), {"allow_val_change": True})
    rows = rundir.read_metrics(run)
    logged = [(args[0], kw["step"]) for args, kw in calls.named("log")]
    assert [logged[0], logged[2]] == [({k: v for k, v in r.items() if k != "epoch"}, r["epoch"]) for r in rows]
    assert [step for _, step in logged] == [1, 1, 2, 2]  # each start: its epochs, then the test at the last one
    test = logged[3][0]
    assert {k: v for k, v in test.items() if k != "test/confusion"} == tracking.numbers(
        rundir.read_json(run / "test_metrics.json"), "test/") | {"test/skipped_images": 0}
    assert test["test/confusion"][0] == "Image" and "row-normalised" in test["test/confusion"][2]
    assert [name for name, _, _ in calls if name in ("init", "finish")] == ["init", "finish", "init", "finish"]


def write_tiny_report(run: Path) -> None:
    """What a finished run leaves for tracker.test: labels.json and test_confusion.csv."""
    run.mkdir(parents=True, exist_ok=True)
    rundir.write_json(run / "labels.json", [{"index": 0, "name": "Aurora Sprint"},
                                            {"index": 1, "name": "Brightwell Pip"}])
    (run / "test_confusion.csv").write_text("3,1\n0,2\n")


def test_mlflow_gets_params_metrics_per_epoch_the_confusion_image_and_continues_its_run(tmp_path, monkeypatch):
    calls = Calls()
    fake_mlflow(monkeypatch, calls)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://mlflow.example:5000")
    run = tmp_path / "run"
    write_tiny_report(run)
    cfg = make_config("demo", log="mlflow")
    tracker = tracking.open_tracker(cfg, run)
    row = {"epoch": 1, "train_loss": 2.5, "train_acc": 0.25, "val_loss": 2.0, "val_acc": 0.5, "lr": 1e-3,
           "seconds": 3.5, "raw_val_loss": 2.1, "ema_val_loss": 2.0, "val_weights": "ema"}
    tracker.epoch(row)
    tracker.test({"top1": 0.8, "top5": 1.0, "calibrated": True, "selective_accuracy": None, "split": "test",
                  "thresholds": {"model": 0.9}})
    tracker.close()
    assert calls[0] == ("MlflowClient", (None,), {})  # None: MlflowClient reads MLFLOW_TRACKING_URI itself
    assert calls.named("create_run") == [(("experiment-1",), {"run_name": "run"})]
    params = [p for args, kw in calls.named("log_batch") for p in kw.get("params", [])]
    assert {p.key: p.value for p in params} == {k: str(v) for k, v in cfg.to_dict().items()}
    assert calls.named("log_dict")[0][0][1:] == (cfg.to_dict(), "config.json")
    epoch, test = [kw["metrics"] for args, kw in calls.named("log_batch") if kw.get("metrics")]
    assert {m.key: (m.value, m.step) for m in epoch} == {k: (v, 1) for k, v in row.items()
                                                         if k not in ("epoch", "val_weights")}
    assert {m.key: (m.value, m.step) for m in test} == {"test/top1": (0.8, 1), "test/top5": (1.0, 1),
                                                        "test/thresholds/model": (0.9, 1)}
    (run_id, image, name), _ = calls.named("log_image")[0]
    assert (run_id, name) == ("mlflow-run-1", "test_confusion.png") and image.dtype == np.uint8
    assert calls.named("set_terminated")[-1][0] == ("mlflow-run-1", "FINISHED")
    calls.clear()
    rundir.append_metrics(run, row)  # a resume after epoch 1: the same MLflow run, no params again
    tracking.open_tracker(cfg, run).close()
    assert calls.named("update_run") == [(("mlflow-run-1",), {"status": "RUNNING"})]
    assert not calls.named("create_run") and not [kw for _, kw in calls.named("log_batch") if kw.get("params")]
    assert calls.named("set_terminated")[-1][0] == ("mlflow-run-1", "KILLED")  # closed before its test: unfinished


def test_wandb_project_comes_from_wandb_project(tmp_path, monkeypatch):
    calls = Calls()
    fake_wandb(monkeypatch, calls)
    monkeypatch.setenv("WANDB_PROJECT", "cars")
    tracking.open_tracker(make_config("demo", log="wandb"), tmp_path).close()
    assert calls.named("init")[0][1]["project"] == "cars"


def test_a_tracker_that_cannot_start_is_left_out(tmp_path, monkeypatch, caplog):
    def init_offline(**kwargs):
        raise TimeoutError("no network")

    calls = Calls()
    fake_wandb(monkeypatch, calls)
    sys.modules["wandb"].init = init_offline
    run = tmp_path / "run"
    write_tiny_report(run)
    with caplog.at_level(logging.WARNING, logger="carapp"):
        tracker = tracking.open_tracker(make_config("demo", log="wandb"), run)
        tracker.epoch({"epoch": 1, "train_loss": 1.0})
        tracker.test({"top1": 1.0})
        tracker.close()
    assert tracker.backends == [] and not calls
    assert [r.getMessage() for r in caplog.records if "wandb" in r.getMessage()] == [
        "wandb: could not start (TimeoutError: no network); training goes on without it"]


def test_log_names_only_known_trackers():
    assert make_config("demo", log=" tensorboard, wandb ").log == " tensorboard, wandb "
    with pytest.raises(ValueError, match="log must be empty or one or more of tensorboard, mlflow, wandb"):
        make_config("demo", log="tensorbord")


def test_a_confusion_image_that_cannot_be_drawn_leaves_the_test_numbers(tmp_path, monkeypatch, caplog):
    def broken(confusion, names):
        raise OSError("no font")

    calls = Calls()
    fake_wandb(monkeypatch, calls)
    monkeypatch.setattr(tracking, "confusion_image", broken)
    run = tmp_path / "run"
    write_tiny_report(run)
    tracker = tracking.open_tracker(make_config("demo", log="wandb"), run)
    with caplog.at_level(logging.WARNING, logger="carapp"):
        tracker.test({"top1": 0.5})
    assert calls.named("log") == [(({"test/top1": 0.5},), {"step": 0})] and len(tracker.backends) == 1
    assert "no confusion image for the trackers (OSError: no font)" in caplog.text
