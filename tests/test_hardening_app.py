"""The app under load and in public: concurrent clients during training, no leaks, no stray file access, auth."""
from __future__ import annotations

import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor

import pytest
from gradio_client import Client, handle_file
from PIL import Image

from carapp.runs import active_run, list_runs, run_status
from carapp import rundir
from carapp.ui import jobs
from carapp.config import make_config
from carapp.predict import Predictor
from conftest import ROOT, serving, stop_all_jobs

EXAMPLE = str(ROOT / "assets/examples/aurora_sprint.jpg")


@pytest.fixture(scope="module")
def app(demo_root, tiny_run, tmp_path_factory):
    runs = tmp_path_factory.mktemp("load-runs")
    with serving(demo_root, tiny_run, runs) as url:
        yield url, runs, demo_root


@pytest.mark.slow
def test_twenty_concurrent_predictions_while_training(app):
    url, runs, data = app
    cfg = make_config("paper", data=str(data), backbone="resnet18", image_size=32, batch_size=8, workers=0,
                      epochs=200, patience=200)
    run = jobs.start_training(cfg, runs)
    try:
        def one(_):
            label, heat, *_ = Client(url, verbose=False, analytics_enabled=False).predict(
                handle_file(EXAMPLE), api_name="/predict")
            return len(label["confidences"]), Image.open(heat).size[0]
        with ThreadPoolExecutor(20) as pool:
            answers = list(pool.map(one, range(20)))
        assert answers == [(5, answers[0][1])] * 20 and answers[0][1] >= 256
        assert run_status(run) == "running"  # training went on meanwhile
    finally:
        stop_all_jobs(runs)


def _rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * 4096 / 2**20


@pytest.mark.slow
def test_memory_flat_over_500_predictions_with_cam(tiny_run):
    predictor = Predictor.load(tiny_run)
    photo = Image.open(EXAMPLE)
    for _ in range(50):
        predictor.predict(photo, cam=True)
    for _ in range(5):
        predictor.predict(photo, cam=True, method="gradcam++")  # the package path hooks and unhooks
    before = _rss_mb()
    for i in range(500):
        predictor.predict(photo, cam=True, method="gradcam++" if i % 50 == 0 else "gradcam")
    growth = _rss_mb() - before
    assert growth < 30, f"resident memory grew {growth:.1f} MB over 500 predictions"
    assert not any(m._forward_hooks or m._backward_hooks or m._forward_pre_hooks for m in predictor.model.modules())


def _status(url: str) -> int:
    try:
        with urllib.request.urlopen(url, timeout=10) as r:
            return r.status
    except urllib.error.HTTPError as e:
        return e.code


def test_only_the_apps_own_files_are_served(app):
    url = app[0]
    assert _status(f"{url}gradio_api/file={EXAMPLE}") == 200            # the Predict examples
    for path in ("/etc/passwd", str(ROOT / "README.md"), str(app[1] / "tiny" / "best.pt")):
        assert _status(f"{url}gradio_api/file={path}") in (403, 404), path


@pytest.mark.slow
def test_basic_auth_from_the_environment(demo_root, tiny_run, tmp_path, monkeypatch):
    monkeypatch.setenv("CARAPP_AUTH", "owner:s3cret")
    with serving(demo_root, tiny_run, tmp_path, public=True) as url:
        with pytest.raises(Exception):
            Client(url, verbose=False, analytics_enabled=False)
        client = Client(url, auth=("owner", "s3cret"), verbose=False, analytics_enabled=False)
        label, *_ = client.predict(handle_file(EXAMPLE), api_name="/predict")
        assert label["confidences"]


def test_run_list_survives_files_vanishing_mid_listing(tmp_path):
    """A trainer's checkpoint temp file can be listed and gone before it is stat'ed (CI saw it): a dangling link
    is the same moment, held still. The list must show the run, dated by the files that are there."""
    run = tmp_path / "run"
    run.mkdir()
    rundir.write_json(run / "config.json", {"epochs": 3})
    (run / ".last.pt.abc.tmp").symlink_to(run / "gone")
    (info,) = list_runs(tmp_path)
    assert info.name == "run" and info.updated == (run / "config.json").stat().st_mtime
    assert active_run(tmp_path) is None
