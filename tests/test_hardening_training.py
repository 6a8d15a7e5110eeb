"""Bad datasets, crashes at any moment, strangers' checkpoints: clear messages, nothing lost."""
from __future__ import annotations

import errno
import json
import os
import pickle
import random
import signal
import subprocess
import sys
import time

import pytest
import torch
from conftest import FAST_TRAIN, ROOT, build_compcars, cli_error, cli_json, write_jpeg

from carapp import rundir
from carapp.checkpoint import CheckpointError, load_checkpoint, save_checkpoint
from carapp.config import make_config
from carapp.dataset.index import DatasetError, index_dataset
from carapp.dataset.split import stratified_split
from carapp.predict import Predictor
from carapp.training.train import TrainingError, train

TINY = dict(backbone="resnet18", image_size=32, batch_size=8, workers=0, steps_per_epoch=2)


# ------------------------------------------------------------------------------------------------------ datasets

def test_missing_or_malformed_name_file_falls_back_to_ids(tmp_path, caplog):
    root = build_compcars(tmp_path / "cc", {(1, 1): {"2010": 3}, (2, 5): {"unknown": 3}}, ["A", "B"], ["x"] * 5)
    mat = root / "data/misc/make_model_name.mat"
    mat.write_bytes(b"MATLAB 5.0 MAT-file, damaged beyond repair")
    index = index_dataset(root)
    assert {c["name"] for c in index.classes.values()} == {"Make 1 model 1", "Make 2 model 5"}
    assert any("cannot read" in r.message for r in caplog.records)
    mat.unlink()
    os.utime(root / "data/image/1/1/2010", ns=(time.time_ns() + 10**9,) * 2)
    assert {c["name"] for c in index_dataset(root, use_cache=False).classes.values()} == \
        {"Make 1 model 1", "Make 2 model 5"}


def test_empty_dataset_and_tiny_classes(tmp_path, caplog):
    (tmp_path / "empty" / "Some Car").mkdir(parents=True)
    with pytest.raises(DatasetError, match="not a dataset"):
        index_dataset(tmp_path / "empty")
    split = stratified_split([0] * 10 + [1, 1], seed=0)
    assert split[-2:] == ["train", "train"]
    assert any("fewer than 3 images" in r.message for r in caplog.records)


@pytest.mark.slow
def test_corrupt_vanished_and_non_ascii_files_in_training(tmp_path):
    data = tmp_path / "cars"
    for cls, colour in (("Škoda Octavia", (200, 30, 30)), ("Citroën 2CV", (30, 30, 200))):
        for k in range(8):
            write_jpeg(data / cls / f"фото_{k}.jpg", colour)
    (data / "Škoda Octavia" / "фото_0.jpg").write_bytes(b"\xff\xd8\xff garbage")
    run = tmp_path / "run"
    first = cli_json("train", "--data", data, "--run-dir", run, "--epochs", "1", "--min-images", "0",
                     "--sampler", "none", "--steps-per-epoch", "4", *FAST_TRAIN)
    assert first["status"] == "finished"
    labels = [c["name"] for c in json.loads((run / "labels.json").read_text())]
    assert labels == ["Citroën 2CV", "Škoda Octavia"]
    # a file vanishes between runs: the frozen split still lists it, training skips and reports it
    rows = (run / "split.csv").read_text().splitlines()[1:]
    gone = next(r.split(",")[0] for r in rows if r.endswith(",train") and "фото_0" not in r)
    (data / gone).unlink()
    cli_json("train", "--resume", run, "--epochs", "3")
    bad = (run / "bad_images.txt").read_text().splitlines()
    assert gone in bad
    assert "Škoda Octavia/фото_0.jpg" in bad or not any(r.startswith("Škoda Octavia/фото_0.jpg,") and
                                                       r.endswith(",train") for r in rows)


# ------------------------------------------------------------------------------------------------------ training

def _cfg(demo_root, **kw):
    return make_config("paper", data=str(demo_root), **{**TINY, **kw})


def test_nan_loss_stops_with_a_message_and_keeps_the_last_good_checkpoint(demo_root, tmp_path, monkeypatch):
    from carapp.losses import FocalLoss
    calls = {"n": 0}
    real = FocalLoss.forward

    def poisoned(self, logits, targets):
        calls["n"] += 1
        loss = real(self, logits, targets)
        return loss * float("nan") if calls["n"] > 3 else loss  # epoch 1 is fine, epoch 2 blows up
    monkeypatch.setattr(FocalLoss, "forward", poisoned)
    run = tmp_path / "nan"
    with pytest.raises(TrainingError, match="loss became nan.*smaller --lr"):
        train(_cfg(demo_root, epochs=3), run)
    assert load_checkpoint(run / "last.pt")["epoch"] == 1
    assert rundir.read_progress(run)["status"] == "failed"
    assert [m["epoch"] for m in rundir.read_metrics(run)] == [1]


def test_out_of_memory_suggests_a_smaller_batch(demo_root, tmp_path, monkeypatch):
    from carapp.losses import FocalLoss
    def oom(self, *a, **k):
        raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
    monkeypatch.setattr(FocalLoss, "forward", oom)
    with pytest.raises(TrainingError, match="out of memory at batch size 8.*--batch-size 4"):
        train(_cfg(demo_root, epochs=1), tmp_path / "oom")


def test_disk_full_while_saving_keeps_the_previous_checkpoint(tmp_path, monkeypatch):
    path = tmp_path / "last.pt"
    save_checkpoint({"model": {"w": torch.ones(3)}, "epoch": 1}, path)

    def full_disk(obj, f, *a, **k):
        f.write(b"partial")
        raise OSError(errno.ENOSPC, "No space left on device")
    monkeypatch.setattr(torch, "save", full_disk)
    with pytest.raises(OSError, match="No space left"):
        save_checkpoint({"model": {"w": torch.zeros(3)}, "epoch": 2}, path)
    monkeypatch.undo()
    assert load_checkpoint(path)["epoch"] == 1
    assert [p.name for p in tmp_path.iterdir()] == ["last.pt"]  # no half-written temp file left behind


def test_stop_during_validation(demo_root, tmp_path, monkeypatch):
    import carapp.training.train as train_module
    real = train_module.validate
    run = tmp_path / "stopval"

    def validate_then_stop(trainer, net=None):
        (run / "STOP").touch()  # arrives while validation runs
        return real(trainer, net)
    monkeypatch.setattr(train_module, "validate", validate_then_stop)
    result = train(_cfg(demo_root, epochs=5), run)
    assert result["status"] == "stopped" and result["epochs"] == 1
    assert load_checkpoint(run / "last.pt")["epoch"] == 1 and len(rundir.read_metrics(run)) == 1


@pytest.mark.slow
def test_second_trainer_is_refused_and_stale_lock_is_taken_over(demo_root, tmp_path):
    run = tmp_path / "locked"
    run.mkdir()
    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        (run / "train.lock").write_text(str(sleeper.pid))
        with pytest.raises(rundir.RunLocked, match=f"process {sleeper.pid}"):
            train(_cfg(demo_root, epochs=1), run)
        assert not (run / "config.json").exists()  # refused before writing anything
    finally:
        sleeper.kill()
        sleeper.wait()
    result = train(_cfg(demo_root, epochs=1), run)  # the lock's process is gone: stale
    assert result["status"] == "finished" and not (run / "train.lock").exists()


@pytest.mark.slow
def test_kill_9_at_random_moments_then_resume(demo_root, tmp_path):
    """Real subprocesses killed at random moments (also mid-checkpoint): resume always finishes the same epochs."""
    rng = random.Random(2026)
    args = ["train", "--data", demo_root, "--epochs", "8", "--steps-per-epoch", "2", "--patience", "99", *FAST_TRAIN]
    killed_alive = 0
    for pair in ((0, 1), (2, 3)):  # two trainers at a time, each killed at its own moment: the waits overlap
        procs = {trial: subprocess.Popen([sys.executable, "-m", "carapp", *map(str, args), "--run-dir",
                                          tmp_path / f"trial{trial}"], cwd=ROOT, stdout=subprocess.DEVNULL,
                                         stderr=subprocess.DEVNULL) for trial in pair}
        started = time.monotonic()
        # start-up takes ~4 s; each epoch ~1 s, with two checkpoint writes
        for trial, moment in sorted(((t, rng.uniform(3.0, 10.0)) for t in pair), key=lambda tm: tm[1]):
            time.sleep(max(0.0, started + moment - time.monotonic()))
            killed_alive += procs[trial].poll() is None
            procs[trial].send_signal(signal.SIGKILL)
            procs[trial].wait()
        for trial in pair:  # resumed one after the other, in this process
            run = tmp_path / f"trial{trial}"
            if (run / "config.json").exists():
                result = cli_json("train", "--resume", run)
            else:  # killed during start-up, before the split was frozen: nothing to resume, so start again
                said = cli_error("train", "--resume", run)  # killed before or after its mkdir
                assert "to resume from" in said or "does not exist: nothing to resume" in said, said
                result = cli_json(*args, "--run-dir", run)
            assert result["status"] == "finished", trial
            assert [m["epoch"] for m in rundir.read_metrics(run)] == list(range(1, 9)), trial
            assert load_checkpoint(run / "last.pt")["epoch"] == 8
            assert not list(run.glob(".*.tmp")) and not (run / "train.lock").exists()
    assert killed_alive >= 3  # the kills hit running trainers, not finished ones


# -------------------------------------------------------------------------------------------- strangers' files

def test_pickle_payload_is_refused_and_never_runs(tmp_path):
    marker = tmp_path / "pwned.txt"

    class Payload:
        def __reduce__(self):
            return (open, (str(marker), "w"))
    evil = tmp_path / "evil.pt"  # a real torch.save archive whose pickle calls open() when loaded unsafely
    torch.save({"model": {}, "config": {}, "labels": [], "x": Payload()}, evil)
    raw = tmp_path / "raw.pkl"    # and a bare pickle with the same payload
    with open(raw, "wb") as f:
        pickle.dump({"model": {}, "x": Payload()}, f)
    assert not marker.exists()
    with pytest.raises(CheckpointError, match="refused for safety"):
        load_checkpoint(evil)
    with pytest.raises(CheckpointError, match="not a PyTorch checkpoint"):
        load_checkpoint(raw)
    for path in (evil, raw):
        with pytest.raises(CheckpointError):
            Predictor.load(path)
    assert not marker.exists()


def test_checkpoint_whose_classes_do_not_match_its_labels(tiny_run, tmp_path):
    state = load_checkpoint(tiny_run / "best.pt")
    state["labels"] = state["labels"][:-1]
    torch.save(state, tmp_path / "odd.pt")
    with pytest.raises(ValueError, match="do not match its labels"):
        Predictor.load(tmp_path / "odd.pt")
    (tmp_path / "junk.pt").write_bytes(b"not a checkpoint at all")
    with pytest.raises(CheckpointError, match="not a PyTorch checkpoint"):
        Predictor.load(tmp_path / "junk.pt")
