"""The CLI's output convention, over every command: with --json exactly one JSON value on stdout and nothing else;
without it, human text on stdout (never JSON); errors as a message, never a traceback, and no junk left behind."""
from __future__ import annotations

import json
import shutil
import subprocess
import sys

import pytest

from carapp import cli
from conftest import FAST_TRAIN, ROOT

TINY_TRAIN = [*FAST_TRAIN, "--epochs", "1", "--steps-per-epoch", "2"]


@pytest.fixture(scope="module")
def run(tiny_run, tmp_path_factory):
    """A copy of the tiny run: evaluate and calibrate rewrite files in it."""
    copy = tmp_path_factory.mktemp("cli-output") / "run"
    shutil.copytree(tiny_run, copy)
    return copy


def commands(demo_root, run, out):
    photo = next((demo_root / "data" / "image").rglob("*.jpg"))
    return {  # the cache goes beside a copy: other tests must not start reading pre-resized demo images
        "demo-data": ["--out", out / "demo", "--scale", "0.03"],
        "stats": ["--data", demo_root],
        "health": ["--data", demo_root, "--run", run, "--workers", "1"],
        "train": ["--data", demo_root, "--run-dir", out / "train", *TINY_TRAIN],
        "evaluate": ["--run", run, "--workers", "0"],
        "calibrate": ["--run", run, "--workers", "0"],
        "predict": [photo, "--run", run],
        "analyze": [photo.parent, "--run", run, "--out", out / "analysis", "--workers", "0", "--engine", "torch"],
        "export": ["--run", run, "--format", "onnx", "--out", out / "onnx"],  # torch.onnx prints as it works
        "cache": ["--data", shutil.copytree(demo_root, out / "copy"), "--short-side", "40", "--workers", "1"],
        "sweep": ["--data", demo_root, "--out", out / "sweep", "--lr", "1e-3", "--dropout", "0.2", *TINY_TRAIN],
        "lr-find": ["--data", demo_root, *FAST_TRAIN, "--steps", "6"],
        "runs": ["--dir", run.parent],
    }


COMMANDS = ["demo-data", "stats", "health", "train", "evaluate", "calibrate", "predict", "analyze", "export", "cache",
            "sweep", "lr-find", "runs"]


@pytest.mark.slow
@pytest.mark.parametrize("as_json", [True, False], ids=["json", "text"])
@pytest.mark.parametrize("command", COMMANDS)
def test_stdout_holds_json_only_with_json(command, as_json, demo_root, run, tmp_path, capfd):
    args = [command, *map(str, commands(demo_root, run, tmp_path)[command])] + (["--json"] if as_json else [])
    code = cli.main(args)
    out, err = capfd.readouterr()
    assert code == 0, err[-2000:]
    if as_json:
        json.loads(out)  # the whole of stdout is one JSON value
    else:
        assert out.strip(), f"{command} printed nothing for a person"
        if command == "predict":
            assert "\n  why: " in out, out  # and why each answer is what it is
        with pytest.raises(json.JSONDecodeError):
            json.loads(out)


def test_every_option_has_help():
    parser = cli.build_parser()
    sub = next(a for a in parser._actions if a.dest == "command")
    missing = [f"{name} {a.option_strings or a.dest}" for name, p in sub.choices.items() for a in p._actions
               if a.dest != "help" and not a.help]
    assert not missing, missing


def call(capfd, *args) -> tuple[int, object]:
    """python -m carapp ARGS --json, in this process: (exit code, the JSON value on stdout)."""
    code = cli.main([*map(str, args), "--json"])
    return code, json.loads(capfd.readouterr().out)


def test_failed_train_leaves_no_junk_run(tmp_path, capfd):
    empty = tmp_path / "empty"
    empty.mkdir()
    code, out = call(capfd, "train", "--data", empty, "--run-dir", tmp_path / "run", *FAST_TRAIN)
    assert code == 2 and "error" in out and not (tmp_path / "run").exists()
    code, out = call(capfd, "train", "--resume", tmp_path / "missing")
    assert code == 2 and "does not exist" in out["error"] and not (tmp_path / "missing").exists()


def test_push_without_a_token_says_what_to_do(run, monkeypatch, capfd):
    import huggingface_hub
    monkeypatch.delenv("HF_TOKEN", raising=False)
    monkeypatch.setattr(huggingface_hub, "get_token", lambda: None)  # no stored login either
    code, out = call(capfd, "push", "--run", run, "--repo", "carfan/tiny")
    assert code == 2 and "HF_TOKEN" in out["error"]


def test_push_with_no_network_is_one_clear_message(run, monkeypatch):
    import huggingface_hub

    class OfflineApi:
        def __init__(self, token=None):
            pass

        def create_repo(self, *args, **kwargs):
            raise ConnectionError("Failed to resolve 'huggingface.co'")
    monkeypatch.setattr(huggingface_hub, "HfApi", OfflineApi)
    monkeypatch.setenv("HF_TOKEN", "hf_test_token")
    from carapp.export import push
    with pytest.raises(OSError, match="upload to the Hugging Face Hub failed.*check the network"):
        push(run, "carfan/tiny")


def test_demo_data_never_overwrites(tmp_path, capfd):
    mine = tmp_path / "mine"
    (mine / "data").mkdir(parents=True)
    (mine / "data" / "photo.jpg").write_bytes(b"my own")
    code, out = call(capfd, "demo-data", "--out", mine)
    assert code == 2 and "not empty" in out["error"]
    assert (mine / "data" / "photo.jpg").read_bytes() == b"my own" and not (mine / "data" / "image").exists()
    demo = tmp_path / "demo"
    assert call(capfd, "demo-data", "--out", demo, "--scale", "0.02")[0] == 0
    code, out = call(capfd, "demo-data", "--out", demo, "--scale", "0.02")
    assert code == 2 and "--force" in out["error"]
    assert call(capfd, "demo-data", "--out", demo, "--scale", "0.02", "--force")[0] == 0


def test_missing_image_is_not_found(run, tmp_path, capfd):
    code, out = call(capfd, "predict", tmp_path / "nope.jpg", "--run", run)
    assert code == 1 and out[0]["error"].endswith("file not found")


@pytest.mark.parametrize("args", [["predict", "nothere.jpg", "--run", "nothere"], ["stats", "--data", "/nonexistent"],
                                  ["train", "--resume", "/nonexistent-run"], ["evaluate", "--run", "/nope", "--json"]])
def test_a_missing_path_is_refused_before_torch_is_imported(args):
    """`predict nothere.jpg --run nothere` took 11.8 s to say the run is not there: PyTorch was imported first."""
    script = ("import sys\nfrom carapp import cli\ncode = cli.main(sys.argv[1:])\n"
              "print('torch imported' if 'torch' in sys.modules else 'no torch', code, file=sys.stderr)\n")
    proc = subprocess.run([sys.executable, "-c", script, *args], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert "error: " in proc.stderr and proc.stderr.strip().endswith("no torch 2"), proc.stderr


def test_runs_lists_the_runs_as_the_app_does(tiny_run, tmp_path, capfd):
    """`carapp runs`: the runs folder as the app's Train tab lists it: newest first, with the live status (a run whose
    trainer died mid-epoch is 'interrupted', not 'running')."""
    from carapp import rundir
    from carapp.runs import list_runs
    shutil.copytree(tiny_run, tmp_path / "done")
    dead = tmp_path / "dead"
    dead.mkdir()
    rundir.write_json(dead / "progress.json", {"status": "running", "pid": 2 ** 22 + 17, "epoch": 1, "epochs": 5})
    code, rows = call(capfd, "runs", "--dir", tmp_path)
    assert code == 0 and [r["name"] for r in rows] == ["dead", "done"]
    assert [r["status"] for r in rows] == ["interrupted", "finished"] == [r.status for r in list_runs(tmp_path)]
    assert rows[1]["epochs_done"] == 1 and rows[1]["best_val_acc"] is not None
    code, error = call(capfd, "runs", "--dir", tmp_path / "absent")
    assert code == 2 and "runs folder not found" in error["error"]


def test_a_runs_listing_reads_a_run_again_only_when_it_changed(tiny_run, tmp_path, monkeypatch):
    import os

    from carapp import rundir, runs
    shutil.copytree(tiny_run, tmp_path / "a")
    reads = []
    real = rundir.read_metrics
    monkeypatch.setattr(rundir, "read_metrics", lambda run: reads.append(run.name) or real(run))
    first = runs.list_runs(tmp_path)
    runs.list_runs(tmp_path)
    runs.find_run(tmp_path, "a")
    assert reads == ["a"] and first[0].status == "finished"  # three listings, one read
    progress = tmp_path / "a" / "progress.json"
    os.utime(progress, ns=(progress.stat().st_atime_ns, progress.stat().st_mtime_ns + 10 ** 9))
    runs.list_runs(tmp_path)
    assert reads == ["a", "a"]  # its progress changed: read again
