"""Training end to end through the CLI, as a GPU server would run it (tiny images, ResNet-18, CPU)."""
from __future__ import annotations

import csv
import json
import logging
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import ROOT, cli_error, cli_json, run_cli
from PIL import Image

from carapp.checkpoint import load_checkpoint
from carapp.predict import Predictor
from carapp.rundir import read_metrics, read_progress

FAST = ["--backbone", "resnet18", "--image-size", "32", "--batch-size", "16", "--workers", "0"]
METRIC_KEYS = {"epoch", "train_loss", "train_acc", "val_loss", "val_acc", "lr", "seconds"}


def read_split_csv(run: Path) -> list[dict]:
    with open(run / "split.csv", newline="") as f:
        return list(csv.DictReader(f))


@pytest.fixture(scope="module")
def trained_run(demo_root, tmp_path_factory):
    """A run trained for 2 epochs, then resumed to 3."""
    run = tmp_path_factory.mktemp("runs") / "r1"
    first = cli_json("train", "--data", demo_root, "--run-dir", run, "--epochs", "2", *FAST)
    assert first["status"] == "finished" and first["epochs"] == 2
    split_before = (run / "split.csv").read_text()
    metrics_before = read_metrics(run)
    second = cli_json("train", "--resume", run, "--epochs", "3")
    return run, first, second, split_before, metrics_before


def test_run_directory_contract(trained_run):
    run, first, *_ = trained_run
    for name in ("config.json", "labels.json", "split.csv", "metrics.jsonl", "progress.json", "last.pt", "best.pt",
                 "test_metrics.json", "test_per_class.csv", "test_confusion.csv", "train.log"):
        assert (run / name).is_file(), name
    config = json.loads((run / "config.json").read_text())
    assert config["backbone"] == "resnet18" and config["gamma"] == 2.0 and config["lr"] == 1e-3
    labels = json.loads((run / "labels.json").read_text())
    rows = read_split_csv(run)
    assert set(rows[0]) == {"path", "label", "split"}
    assert {r["split"] for r in rows} == {"train", "val", "test"}
    assert {int(r["label"]) for r in rows} == set(range(len(labels)))
    assert all((Path(config["data"]) / r["path"]).is_file() for r in rows)
    for name in ("last.pt", "best.pt"):
        state = torch.load(run / name, weights_only=True)  # plain types only
        assert state["labels"] == [c["name"] for c in labels]
    test = json.loads((run / "test_metrics.json").read_text())
    assert {"top1", "top5", "macro_f1", "num_images"} <= set(test)
    assert test["num_images"] == sum(r["split"] == "test" for r in rows)
    # the running figures within each epoch, for the live curves before an epoch ends: every epoch's last step
    from carapp import plots
    from carapp.rundir import read_steps
    steps = read_steps(run)
    assert {s["epoch"] for s in steps if s["step"] == s["steps"]} == {m["epoch"] for m in read_metrics(run)}
    names = [t.name for t in plots.curves_figure([], steps).data]
    assert names[:1] == ["train loss (running)"] and "train acc (running)" in names


def test_resume_continues_with_same_split_and_metrics(trained_run):
    run, first, second, split_before, metrics_before = trained_run
    assert second["status"] == "finished" and second["epochs"] == 3
    assert (run / "split.csv").read_text() == split_before
    metrics = read_metrics(run)
    assert [m["epoch"] for m in metrics] == [1, 2, 3]
    assert metrics[:2] == metrics_before
    assert all(set(m) == METRIC_KEYS for m in metrics)
    assert load_checkpoint(run / "last.pt")["epoch"] == 3


def test_evaluate_and_predict_json_and_cam(trained_run, tmp_path):
    run = trained_run[0]
    result = cli_json("evaluate", "--run", run, "--workers", "0")
    assert {"top1", "top5", "num_images"} <= set(result) and 0 <= result["top1"] <= result["top5"] <= 1
    labels = [c["name"] for c in json.loads((run / "labels.json").read_text())]
    config = json.loads((run / "config.json").read_text())
    images = [Path(config["data"]) / r["path"] for r in read_split_csv(run)[:2]]
    out = cli_json("predict", *images, "--run", run, "--top-k", "3", "--cam", tmp_path / "cams")
    assert [e["image"] for e in out] == [str(p) for p in images]
    for entry in out:
        assert len(entry["top"]) == 3 and all(t["label"] in labels for t in entry["top"])
        probs = [t["prob"] for t in entry["top"]]
        assert probs == sorted(probs, reverse=True) and 0 < sum(probs) <= 1.0001
    pngs = sorted((tmp_path / "cams").glob("*.png"))
    assert len(pngs) == 2 and Image.open(pngs[0]).mode == "RGB" and min(Image.open(pngs[0]).size) >= 32


@pytest.mark.slow
def test_predict_api_and_bad_file_in_batch(trained_run, tmp_path):
    run = trained_run[0]
    predictor = Predictor.load(run)
    photo = Image.new("RGB", (120, 90), (200, 30, 30))
    result = predictor.predict(photo, top_k=2, cam=True)
    assert len(result.top) == 2 and result.top[0][1] >= result.top[1][1]
    assert isinstance(result.cam, Image.Image) and result.explained == result.top[0][0]
    assert predictor.predict(photo, cam=False).cam is None
    bad = tmp_path / "notes.jpg"
    bad.write_text("this is not a photo")
    good = tmp_path / "car.png"
    photo.save(good)
    proc = run_cli("predict", good, bad, "--run", run, "--json", check=False)
    assert proc.returncode == 1
    entries = json.loads(proc.stdout)
    assert "top" in entries[0] and "not an image" in entries[1]["error"]


@pytest.mark.slow
def test_early_stopping_fires(demo_root, tmp_path):
    # lr 0: the validation loss never improves after epoch 1, so patience 2 stops after epoch 3 of 10.
    result = cli_json("train", "--data", demo_root, "--run-dir", tmp_path / "es", "--epochs", "10", "--lr", "0",
                      "--patience", "2", "--steps-per-epoch", "1", *FAST)
    assert result["status"] == "finished" and result["epochs"] == 3
    assert len(read_metrics(tmp_path / "es")) == 3


def _start_training(demo_root, run: Path) -> subprocess.Popen:
    args = ["train", "--data", demo_root, "--run-dir", run, "--epochs", "2", "--steps-per-epoch", "40", *FAST]
    return subprocess.Popen([sys.executable, "-m", "carapp", *map(str, args)], cwd=ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _wait_for_step(run: Path, step: int, proc: subprocess.Popen, timeout: float = 120) -> None:
    deadline = time.time() + timeout
    while read_progress(run).get("step", 0) < step:
        assert proc.poll() is None, proc.stderr.read()
        assert time.time() < deadline, "training made no progress"
        time.sleep(0.2)


@pytest.mark.slow
@pytest.mark.parametrize("how", ["stop-file", "sigterm"])
def test_graceful_stop_then_resume(demo_root, tmp_path, how):
    run = tmp_path / "stop"
    proc = _start_training(demo_root, run)
    _wait_for_step(run, 3, proc)
    if how == "stop-file":
        (run / "STOP").touch()
    else:
        proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=120) == 0
    progress = read_progress(run)
    assert progress["status"] == "stopped"
    state = load_checkpoint(run / "last.pt")
    assert state["epoch"] == 0 and 3 <= state["step"] < 40
    assert not (run / "STOP").exists() or how == "stop-file"
    # resume picks up mid-epoch at the saved step, with the same split
    result = cli_json("train", "--resume", run, "--epochs", "1")
    assert result["status"] == "finished" and [m["epoch"] for m in read_metrics(run)] == [1]


@pytest.mark.slow
def test_sweep_grid_on_one_split(demo_root, tmp_path):
    rows = cli_json("sweep", "--data", demo_root, "--out", tmp_path / "grid", "--lr", "1e-3,1e-2", "--dropout", "0.3",
                    "--epochs", "1", "--steps-per-epoch", "2", *FAST)
    assert {r["run"] for r in rows} == {"lr0.001_dropout0.3", "lr0.01_dropout0.3"}
    splits = {(tmp_path / "grid" / r["run"] / "split.csv").read_text() for r in rows}
    assert splits == {(tmp_path / "grid" / "split.csv").read_text()}      # one shared split
    table = (tmp_path / "grid" / "results.csv").read_text().splitlines()
    assert table[0].startswith("run,lr,dropout,weight_decay,status,epochs,best_val_acc")
    accs = [float(line.split(",")[6]) for line in table[1:]]
    assert accs == sorted(accs, reverse=True) and len(accs) == 2
    md = (tmp_path / "grid" / "results.md").read_text()
    assert md.count("\n") == 4 and "| 1e-05 |" in md  # weight decay as written, not 0.0000


def test_config_refuses_values_no_run_can_train_with():
    """A blank box sent as 0 (a click before the page filled its boxes) or a typo is refused, naming the field."""
    from carapp.config import make_config
    with pytest.raises(ValueError, match="batch_size must be at least 1 .got 0.*epochs|epochs must be at least 1"):
        make_config("demo", batch_size=0, epochs=0)
    for field, value in (("image_size", 8), ("dropout", 1.0), ("lr", -1e-3), ("backbone", "vgg16")):
        with pytest.raises(ValueError, match=field):
            make_config("demo", **{field: value})
    with pytest.raises(ValueError, match="backdrops .*only with --negatives"):
        make_config("demo", negatives="", backdrops=0.3)  # the backdrops are the negatives' photos
    assert make_config("demo").backdrops == 0.15 and make_config("demo", negatives="").backdrops == 0  # both off


def test_backdrops_move_the_car_onto_a_photo_without_one_the_same_way_on_every_draw(tmp_path):
    """--backdrops: the labelled box stays where it was, everything around it is the backdrop; whether a sample moves
    and onto which backdrop is its seed's business (a resumed run sees the very same photos)."""
    from carapp.dataset.loader import CarImages, build_transform
    from carapp.dataset.negatives import Backdrops
    (tmp_path / "neg").mkdir()
    Image.new("RGB", (50, 40), (0, 200, 0)).save(tmp_path / "neg" / "green.png")
    Image.new("RGB", (80, 60), (200, 0, 0)).save(tmp_path / "photo.png")
    box = [21, 11, 60, 40]  # 1-based, inclusive: pixels 20..59 x 10..39
    always = Backdrops(str(tmp_path / "neg"), 1.0)
    moved = always.place(Image.open(tmp_path / "photo.png").convert("RGB"), box, always.pick(7))
    assert moved.size == (80, 60) and moved.getpixel((20, 10)) == moved.getpixel((59, 39)) == (200, 0, 0)
    assert moved.getpixel((19, 10)) == moved.getpixel((60, 39)) == moved.getpixel((0, 0)) == (0, 200, 0)
    third = Backdrops(str(tmp_path / "neg"), 0.3)
    picks = [third.pick(seed) for seed in range(1000)]
    assert picks == [third.pick(seed) for seed in range(1000)] and 0.25 < np.mean([p is not None for p in picks]) < 0.35
    images = CarImages(str(tmp_path), ["photo.png"], [0], [box], build_transform(32, False), image_size=32,
                       backdrops=always)
    seeded, plain = images[(0, 5)][1][0], images[0][1][0]  # evaluation (no seed) never moves a car
    assert (seeded[1] > 150).any() and not (plain[1] > 150).any()
    cropped = CarImages(str(tmp_path), ["photo.png"], [0], [box], build_transform(32, False), crop_bbox=True,
                        image_size=32, backdrops=always)
    assert not (cropped[(0, 5)][1][0][1] > 150).any()  # a run trained on the box alone has no background to move


def _exact_config(demo_root):
    from carapp.config import make_config
    return make_config("paper", data=str(demo_root), backbone="resnet18", image_size=32, batch_size=8, epochs=3,
                       steps_per_epoch=3, workers=2, patience=10)  # loader workers on: their seeds must not matter


@pytest.fixture(scope="module")
def uninterrupted_run(demo_root, tmp_path_factory):
    from carapp.training.train import train
    run = tmp_path_factory.mktemp("exact") / "straight"
    before = logging.getLogger("carapp").level
    train(_exact_config(demo_root), run)
    assert logging.getLogger("carapp").level == before  # a caller's logging is left as it was
    return run


@pytest.fixture(scope="module")
def uninterrupted(uninterrupted_run):
    return read_metrics(uninterrupted_run)


@pytest.mark.slow
@pytest.mark.parametrize("stop_at", [6, 4], ids=["mid-epoch", "epoch-boundary"])
def test_stop_then_resume_reproduces_the_uninterrupted_run(demo_root, tmp_path, monkeypatch, uninterrupted,
                                                           stop_at):
    """The README's "continue exactly", checked by numbers: a run stopped mid-epoch (in epoch 2, after its step 2)
    or at an epoch boundary (after epoch 1), then resumed in a new trainer, logs the same losses and accuracies as the
    run that was never stopped, to every printed digit."""
    from carapp import rundir
    from carapp.training.train import train
    calls = []  # the trainer asks "stop?" once per step and once after each epoch: 1-3 epoch 1, 4 its end, ...
    monkeypatch.setattr(rundir, "stop_requested", lambda run: calls.append(1) or len(calls) == stop_at)
    run = tmp_path / "stopped"
    assert train(_exact_config(demo_root), run)["status"] == "stopped"
    said = {6: "stopped in epoch 2 at step 2", 4: "stopped after epoch 1;"}[stop_at]  # not "epoch 2 step 0"
    assert said in (run / "train.log").read_text()
    monkeypatch.undo()
    assert train(_exact_config(demo_root), run, resume=True)["status"] == "finished"
    keys = ("epoch", "train_loss", "train_acc", "val_loss", "val_acc", "lr")
    assert [{k: m[k] for k in keys} for m in read_metrics(run)] == [{k: m[k] for k in keys} for m in uninterrupted]


@pytest.mark.slow
def test_cosine_schedule_warms_up_then_decays_and_label_smoothing_is_recorded(demo_root, tmp_path):
    """--schedule cosine --warmup-epochs 2 over 4 epochs of 2 steps: the lr logged after each epoch is
    0.75, 1, 0.5, 0 times the base (linear warmup over 4 steps, then half a cosine over the other 4)."""
    out = cli_json("train", "--data", demo_root, "--run-dir", tmp_path / "cos", "--epochs", "4", "--steps-per-epoch",
                   "2", "--schedule", "cosine", "--warmup-epochs", "2", "--label-smoothing", "0.1", "--lr", "0.002",
                   "--patience", "10", *FAST)
    assert out["status"] == "finished"
    assert [m["lr"] for m in read_metrics(tmp_path / "cos")] == pytest.approx([0.0015, 0.002, 0.001, 0.0], abs=1e-12)
    config = json.loads((tmp_path / "cos" / "config.json").read_text())
    assert (config["schedule"], config["warmup_epochs"], config["label_smoothing"]) == ("cosine", 2.0, 0.1)


def test_a_stop_pressed_for_one_trainer_never_stops_the_next(tmp_path):
    """The app's Stop names the trainer it was pressed for; a resumed trainer is another process and goes on (it
    took the old STOP as its own and stopped after one step). `touch STOP` still stops whichever trainer runs."""
    from carapp import rundir
    from carapp.training.train import take_over
    rundir.request_stop(tmp_path, pid=os.getpid() + 1)
    assert rundir.stop_requested(tmp_path, os.getpid() + 1) and not rundir.stop_requested(tmp_path)
    lock, handler = take_over(tmp_path)  # a new trainer (this process) starts on the run
    lock.unlink()
    logging.getLogger("carapp").removeHandler(handler)
    handler.close()
    assert not (tmp_path / "STOP").exists()
    rundir.request_stop(tmp_path, pid=os.getpid())  # pressed for this trainer while it was starting: kept
    lock, handler = take_over(tmp_path)
    lock.unlink()
    logging.getLogger("carapp").removeHandler(handler)
    handler.close()
    assert rundir.stop_requested(tmp_path)
    (tmp_path / "STOP").write_text("")  # touch STOP
    assert rundir.stop_requested(tmp_path) and rundir.stop_requested(tmp_path, 12345)


@pytest.mark.slow
def test_outlier_exposure_resumes_exactly_and_refuses_a_wrong_folder(demo_root, tmp_path, monkeypatch,
                                                                     uninterrupted_run):
    """--negatives: the photos without a car a step sees come from (seed, epoch, step) alone, so a run stopped
    mid-epoch and resumed logs the same figures as one never stopped; the term moves the loss (it is really added)."""
    from carapp import rundir
    from carapp.dataset.demo import make_no_car_images
    from carapp.training.train import train
    make_no_car_images(tmp_path / "neg", 12, seed=3)
    import dataclasses

    def config():  # half the cars on the negatives too: their draws must resume as exactly
        return dataclasses.replace(_exact_config(demo_root), negatives=str(tmp_path / "neg"), backdrops=0.5)
    straight = tmp_path / "straight"
    train(config(), straight)
    log_text = (straight / "train.log").read_text()
    assert "outlier exposure: 12 photos without a car" in log_text and "backdrops: 50% of the training cars" in log_text
    calls = []
    monkeypatch.setattr(rundir, "stop_requested", lambda run: calls.append(1) or len(calls) == 6)
    stopped = tmp_path / "stopped"
    assert train(config(), stopped)["status"] == "stopped"
    monkeypatch.undo()
    assert train(config(), stopped, resume=True)["status"] == "finished"
    keys = ("epoch", "train_loss", "train_acc", "val_loss", "val_acc")
    assert [{k: m[k] for k in keys} for m in read_metrics(stopped)] == [{k: m[k] for k in keys}
                                                                        for m in read_metrics(straight)]
    plain = uninterrupted_run  # the same options without negatives
    assert read_metrics(plain)[0]["train_loss"] != read_metrics(straight)[0]["train_loss"]
    # the limit a found car is judged by: validation cars moved onto the negatives (a run without them has none)
    limits = [json.loads((run / "calibration.json").read_text())["thresholds"] for run in (straight, plain)]
    assert limits[0]["ood_car"] > 0 and "ood_car" not in limits[1]
    for wrong, said in ((tmp_path / "absent", "not a folder"), (tmp_path / "empty", "no photos")):
        (tmp_path / "empty").mkdir(exist_ok=True)
        message = cli_error("train", "--data", demo_root, "--run-dir", tmp_path / f"bad-{wrong.name}",
                            "--negatives", wrong, *FAST)
        assert said in message and "Traceback" not in message


@pytest.mark.slow
def test_generated_negatives_are_made_once_and_survive_an_unwritable_cache(tmp_path, monkeypatch, caplog):
    import tempfile

    from carapp.dataset.negatives import GENERATED_COUNT, negatives_folder
    blocked = tmp_path / "cache-is-a-file"
    blocked.write_text("")
    monkeypatch.setenv("CARAPP_CACHE", str(blocked))
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path / "tmp"))
    (tmp_path / "tmp").mkdir()
    folder = negatives_folder("generated")
    assert folder.is_relative_to(tmp_path / "tmp") and "using the temp folder" in caplog.text
    photos = sorted(folder.glob("*.jpg"))
    assert len(photos) == GENERATED_COUNT and {p.name.split("_")[0] for p in photos} == {"scene", "leaves", "noise",
                                                                                         "shapes"}
    before = photos[0].stat().st_mtime_ns
    assert negatives_folder("generated") == folder and photos[0].stat().st_mtime_ns == before  # made once
