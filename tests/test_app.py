"""The Gradio app through its API, as gradio_client users and the browser reach it."""
from __future__ import annotations

import json
import os
import time

import pytest
from gradio_client import Client, handle_file
from gradio_client.exceptions import AppError
from PIL import Image

from conftest import ROOT, serving

from carapp.runs import list_runs, run_status

START_TINY = dict(backbone="resnet18", weights="none", epochs=50, batch_size=8, lr=1e-3,
                  weight_decay=1e-5, dropout=0.2, gamma=2.0, image_size=32, patience=50, workers=0,
                  # the Advanced accordion's recipe options
                  optimizer="adamw", schedule="cosine", warmup_epochs=1, label_smoothing=0.1, decay_norm_bias=False,
                  freeze_epochs=1, layer_lr_decay=0.8, ema=0.5, resize="pad", group_duplicates=True)
ADVANCED = ("optimizer", "schedule", "warmup_epochs", "label_smoothing", "decay_norm_bias", "freeze_epochs",
            "layer_lr_decay", "ema", "resize", "group_duplicates")


@pytest.fixture(scope="module")
def app(demo_root, tiny_run, tmp_path_factory):
    runs = tmp_path_factory.mktemp("app-runs")
    with serving(demo_root, tiny_run, runs) as url:
        yield url, runs, demo_root


def client(url: str) -> Client:
    return Client(url, verbose=False, analytics_enabled=False)


def test_predict_endpoint_returns_labels_and_heatmap(app):
    url, runs, _ = app
    names = [c["name"] for c in json.loads((runs / "tiny" / "labels.json").read_text())]
    label, cam, *_ = client(url).predict(handle_file(str(ROOT / "assets/examples/aurora_sprint.jpg")),
                                     api_name="/predict")
    confidences = label["confidences"]
    assert len(confidences) == 5 and label["label"] == confidences[0]["label"]
    assert all(c["label"] in names for c in confidences)
    assert [c["confidence"] for c in confidences] == sorted((c["confidence"] for c in confidences), reverse=True)
    heat = Image.open(cam)
    assert heat.size[0] >= 256 and heat.mode == "RGB"


def test_predict_endpoint_with_every_option(app):
    url, runs, _ = app
    names = [c["name"] for c in json.loads((runs / "tiny" / "labels.json").read_text())]
    label, cam, *_ = client(url).predict(handle_file(str(ROOT / "assets/examples/dunmore_haulmark.jpg")), "tiny",
                                     "eigencam", names[1], api_name="/predict")
    assert label["confidences"] and Image.open(cam).size[0] >= 256
    label, cam, *_ = client(url).predict(handle_file(str(ROOT / "assets/examples/dunmore_haulmark.jpg")), "tiny",
                                     "none", api_name="/predict")
    assert label["confidences"] and cam is None


def test_bad_upload_gets_a_clear_message_and_server_keeps_serving(app, tmp_path):
    url, *_ = app
    bad = tmp_path / "holiday.jpg"
    bad.write_text("not a photo at all")
    with pytest.raises(AppError, match="holiday.jpg: not an image file"):
        client(url).predict(handle_file(str(bad)), api_name="/predict")
    with pytest.raises(AppError, match="Cannot load the model: .* holds no best.pt"):
        client(url).predict(handle_file(str(ROOT / "assets/examples/aurora_sprint.jpg")), "/etc",
                            api_name="/predict")
    label, *_ = client(url).predict(handle_file(str(ROOT / "assets/examples/aurora_sprint.jpg")), api_name="/predict")
    assert label["confidences"]


def _status(c: Client, run: str | None = None) -> dict:
    return c.predict(run, api_name="/training_status")[-1]


@pytest.mark.slow
def test_training_job_through_the_api(app):
    url, runs, data = app
    c = client(url)
    message = c.predict(str(data), "demo", START_TINY, api_name="/start_training")
    assert message.startswith("Started")
    deadline = time.time() + 120
    while (s := _status(c)).get("step", 0) < 2:
        assert s["status"] == "running", s
        assert time.time() < deadline
        time.sleep(0.5)
    assert s["steps"] > 0 and s["images_per_sec"] > 0
    config = json.loads((runs / s["run"] / "config.json").read_text())
    assert {k: config[k] for k in ADVANCED} == {k: START_TINY[k] for k in ADVANCED}  # the accordion reached the run
    with pytest.raises(AppError, match="one job at a time"):
        c.predict(str(data), "demo", START_TINY, api_name="/start_training")
    other = client(url)  # a new visitor sees the same job
    assert _status(other)["run"] == s["run"]
    assert "Stopping" in other.predict(api_name="/stop_training")
    deadline = time.time() + 60
    while _status(c, s["run"])["status"] == "running":
        assert time.time() < deadline
        time.sleep(0.5)
    assert _status(c, s["run"])["status"] == "stopped"
    assert (runs / s["run"] / "last.pt").is_file()


@pytest.mark.slow
def test_find_lr_button_plots_the_range_test(app, monkeypatch):
    from carapp.ui import train_tab
    monkeypatch.setattr(train_tab, "LR_FIND_STEPS", 20)  # the app serves from this process: a short sweep
    url, runs, data = app
    before = sorted(p.name for p in runs.iterdir())
    text, figure = client(url).predict(str(data), "demo", START_TINY, api_name="/find_lr")
    assert text.startswith("**Suggested learning rate: ") and "Learning rate box" in text
    plot = json.loads(figure["plot"])
    lrs = plot["data"][0]["x"]
    assert len(lrs) >= 10 and lrs == sorted(lrs) and plot["layout"]["xaxis"]["type"] == "log"
    assert sorted(p.name for p in runs.iterdir()) == before  # no run written


def test_no_trained_model_yet_says_what_to_do(demo_root, tmp_path):
    from conftest import start_app
    demo, url = start_app(demo_root, tmp_path)  # an empty runs folder, as on a fresh clone
    try:
        with pytest.raises(AppError) as err:
            client(url).predict(handle_file(str(ROOT / "assets/examples/aurora_sprint.jpg")), api_name="/predict")
        assert str(err.value).startswith("No trained model yet: press **Train the demo model** here")
    finally:
        demo.close()


@pytest.mark.slow
def test_evaluate_endpoint(app):
    url, *_ = app
    summary, per_class, *_ = client(url).predict("tiny", False, api_name="/evaluate")
    assert "top-1" in summary and "top-5" in summary and "macro-F1" in summary
    assert per_class["headers"] == ["class", "accuracy", "support"]


@pytest.mark.slow
def test_public_mode_turns_training_off(demo_root, tiny_run, tmp_path):
    with serving(demo_root, tiny_run, tmp_path, public=True) as url:
        c = client(url)
        with pytest.raises(AppError, match="turned off"):
            c.predict(str(demo_root), "demo", START_TINY, api_name="/start_training")
        with pytest.raises(AppError, match="turned off"):  # the range test trains too: the owner's alone
            c.predict(str(demo_root), "demo", START_TINY, api_name="/find_lr")
        label, *_ = c.predict(handle_file(str(ROOT / "assets/examples/aurora_sprint.jpg")), api_name="/predict")
        assert label["confidences"]
        with pytest.raises(AppError, match="Unknown model"):  # no free-form server paths for strangers
            c.predict(handle_file(str(ROOT / "assets/examples/aurora_sprint.jpg")), str(tmp_path / "tiny"),
                      api_name="/predict")


def test_scanning_a_folder_that_is_no_dataset_clears_the_tab(app, tmp_path):
    """The old dataset's summary and plots go; the summary says why, instead of red error badges over them."""
    from carapp.ui import dataset_tab
    from carapp.ui.settings import resolve_settings
    settings = resolve_settings(str(app[2]), None, str(app[1]))
    shown = dataset_tab.scan(str(app[2]), False, settings)
    assert "images" in shown[0] and shown[1] is not None
    empty = tmp_path / "empty"
    empty.mkdir()
    summary, *plots, classes = dataset_tab.scan(str(empty), False, settings)
    assert "is not a dataset" in summary and plots == [None] * 4
    assert dataset_tab.samples(str(empty), None, settings) == []


@pytest.mark.slow
def test_the_app_hands_the_trainer_every_config_field(demo_root, tmp_path):
    """Start from the app's job layer with every field away from its default: the run's config.json holds them
    all (a command line rebuilt from the config used to drop val_frac, test_frac, jitter and channels_last)."""
    import dataclasses
    from carapp.ui import jobs
    from carapp.config import TrainConfig, make_config
    cfg = make_config("demo", data=str(demo_root), format="compcars", min_images=2, crop_bbox=True, val_frac=0.2,
                      test_frac=0.1, image_size=32, backbone="resnet18", dropout=0.1, sampler="none", alpha="effective",
                      gamma=1.5, epochs=1, batch_size=4, lr=2e-3, weight_decay=0.0, lr_factor=0.5, lr_patience=2,
                      patience=5, steps_per_epoch=1, seed=3, workers=0, device="cpu", amp=False, channels_last=False,
                      jitter=0.05, label_smoothing=0.1, schedule="cosine", warmup_epochs=0.5, optimizer="adamw",
                      decay_norm_bias=False, freeze_epochs=1, layer_lr_decay=0.5, ema=0.5, resize="pad",
                      batch_size_auto=True, group_duplicates=True, exclude=str(tmp_path / "marks.csv"),
                      log="tensorboard", negatives_weight=0.3)  # negatives: the demo preset's "generated"
    first = sorted((demo_root / "data" / "image").rglob("*.jpg"))[0].relative_to(demo_root).as_posix()
    (tmp_path / "marks.csv").write_text(f"path,reason\n{first},not a car\n")
    same = {f.name for f in dataclasses.fields(TrainConfig) if getattr(cfg, f.name) == getattr(TrainConfig(), f.name)}
    # imagenet weights would need the network; compile takes minutes; split official refuses --group-duplicates
    # (test_official_split trains with it)
    assert same == {"weights", "compile", "split"}
    run = jobs.start_training(cfg, tmp_path)
    deadline = time.time() + 120
    while jobs.app_job(tmp_path) and time.time() < deadline:
        time.sleep(0.5)
    assert run_status(run) == "finished", (run / "console.log").read_text()[-2000:]
    recorded = {"excluded": [{"path": first, "reason": "not a car"}], "duplicate_groups": 0}  # besides the config
    assert json.loads((run / "config.json").read_text()) == cfg.to_dict() | recorded


@pytest.mark.slow
def test_a_stop_pressed_while_the_job_starts_is_not_lost(demo_root, tmp_path):
    """Stop right after Start, while the trainer is still importing PyTorch: it stops after its first step instead
    of dropping the request and training all its epochs."""
    from carapp.ui import jobs
    from carapp.config import make_config
    cfg = make_config("demo", data=str(demo_root), backbone="resnet18", image_size=32, batch_size=8, epochs=50,
                      workers=0, patience=50)
    run = jobs.start_training(cfg, tmp_path)
    jobs.stop_training(run)
    deadline = time.time() + 90
    while jobs.app_job(tmp_path) and time.time() < deadline:
        time.sleep(0.5)
    assert run_status(run) == "stopped", (run / "console.log").read_text()[-2000:]
    assert json.loads((run / "progress.json").read_text())["epoch"] <= 1


def test_one_definition_of_a_runs_figures_everywhere(tmp_path):
    """The Model list named the highest val acc of any epoch while best.pt holds the lowest val loss; the Run list
    said "0 of 12 epochs" while the status line said "epoch 1/12"."""
    from carapp import rundir
    from carapp.ui import predict_tab, train_tab
    from carapp.ui.settings import resolve_settings
    run = tmp_path / "r1"
    run.mkdir()
    (run / "config.json").write_text(json.dumps({"epochs": 12}))
    (run / "best.pt").write_bytes(b"")
    for epoch, loss, acc in ((1, 1.0, 0.80), (2, 0.5, 0.926), (3, 0.7, 0.959)):
        rundir.append_metrics(run, {"epoch": epoch, "train_loss": 1, "train_acc": 0.5, "val_loss": loss,
                                    "val_acc": acc, "lr": 1e-3, "seconds": 1})
    settings = resolve_settings(None, None, str(tmp_path))
    assert predict_tab.model_choices(settings) == [("r1 (best.pt: val acc 92.6%)", "r1")]
    (run / "progress.json").write_text(json.dumps({"status": "running", "pid": os.getpid(), "epoch": 4}))
    assert train_tab.run_labels(list_runs(tmp_path)) == [("r1 (running, epoch 4 of 12)", "r1")]
    (run / "progress.json").write_text(json.dumps({"status": "stopped", "epoch": 4}))
    assert train_tab.run_labels(list_runs(tmp_path)) == [("r1 (stopped, 3 of 12 epochs)", "r1")]


def test_presentation_says_no_model_once_and_headlines_no_model_it_did_not_name(tiny_run, tmp_path):
    import gradio as gr

    from carapp import plots
    from carapp.ui import predict_tab
    from carapp.ui.settings import resolve_settings
    example = str(ROOT / "assets/examples/aurora_sprint.jpg")
    empty = resolve_settings(None, None, str(tmp_path / "none"))
    assert predict_tab.show_answer(example, settings=empty)[2] == "**Nothing to classify with yet** (see above)."
    import shutil
    shutil.copytree(tiny_run, tmp_path / "runs" / "tiny")
    settings = resolve_settings(None, None, str(tmp_path / "runs"))
    top, cam, answer, makes, boxes, chooser, views = predict_tab.show_answer(example, settings=settings)
    assert not boxes.visible and not chooser.visible and views == []  # no detector: no cars panel
    assert isinstance(top, gr.Label) and top.show_heading is False  # the one-epoch model names nothing: unsure
    assert isinstance(makes, gr.Label) and makes.show_heading is False  # nor a make in big letters above its list
    assert "not sure" in answer.lower() or "not a car" in answer.lower(), answer
    assert "_Why: Not " in answer, answer  # and says why, with its numbers
    flat = [{"coverage": c / 10, "accuracy": 0.99 - c / 1000, "threshold": 1 - c / 10} for c in range(1, 11)]
    assert plots.coverage_figure(flat, 0.5).layout.yaxis.tickformat == ".1%"  # 99.0%, 98.9%: no repeated ticks


def test_log_scale_redraws_the_class_counts_alone(demo_root, tmp_path, monkeypatch):
    """Ticking log scale redraws one chart from the cached index: no statistics, no image sizes read again."""
    from carapp.ui import dataset_tab
    from carapp.ui.settings import resolve_settings
    settings = resolve_settings(str(demo_root), None, str(tmp_path))
    read = []
    monkeypatch.setattr(dataset_tab, "sample_sizes", lambda *args: read.append(args) or [])
    figure = dataset_tab.counts_only(str(demo_root), True, settings)
    assert figure.layout.yaxis.type == "log" and not read
    assert sum(figure.data[0].y) == len(dataset_tab._index(str(demo_root), settings).paths)
    assert dataset_tab.counts_only(str(demo_root), False, settings).layout.yaxis.type == "linear"


def test_a_report_is_read_once_per_version_for_the_error_analysis_clicks(tiny_run, tmp_path, monkeypatch):
    import shutil

    from carapp.evaluation import evaluate
    from carapp.ui import error_analysis
    from carapp.ui.settings import resolve_settings
    shutil.copytree(tiny_run, tmp_path / "tiny")
    settings = resolve_settings(None, None, str(tmp_path))
    reads, real = [], evaluate.read_report
    monkeypatch.setattr(evaluate, "read_report", lambda run, *a: reads.append(run) or real(run, *a))
    first = error_analysis._report("tiny", settings)
    assert first is not None and error_analysis._report("tiny", settings) is first and len(reads) == 1
    predictions = tmp_path / "tiny" / "test_predictions.csv"
    os.utime(predictions, (time.time() + 5, time.time() + 5))  # a re-evaluation rewrote it
    assert error_analysis._report("tiny", settings) is not first and len(reads) == 2
