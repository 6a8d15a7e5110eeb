"""The app probed as a stranger probes it: raw /gradio_api/queue/join calls with fn_index, no gradio_client."""
from __future__ import annotations

import dataclasses
import json
import os
import signal
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest
from conftest import FAST_TRAIN, ROOT, raw_call, raw_upload, serving, stop_all_jobs
from PIL import Image

from carapp.runs import evaluation_status, list_runs, run_status
from carapp.ui import jobs, predict_tab, uploads

EXAMPLE = ROOT / "assets/examples/aurora_sprint.jpg"
def photo(path: str, method: str = "gradcam") -> list:
    """/predict's inputs as a raw client sends them: the file, model (default), heatmap method, class, flip TTA,
    model and make thresholds (blank: the model's own)."""
    return [{"path": path}, None, method, predict_tab.TOP1, False, None, None]


# /start_training's inputs after the dataset folder: the preset and the form's options as one object
TINY_START = ["demo", dict(backbone="resnet18", weights="none", epochs=50, batch_size=8, lr=1e-3, weight_decay=1e-5,
                           dropout=0.2, gamma=2.0, image_size=32, patience=50, workers=0)]


@pytest.fixture(scope="module")
def public(demo_root, tiny_run, tmp_path_factory):
    runs = tmp_path_factory.mktemp("public-runs")
    with serving(demo_root, tiny_run, runs, public=True) as url:
        yield url, runs, demo_root


@pytest.fixture(scope="module")
def private(demo_root, tiny_run, tmp_path_factory):
    runs = tmp_path_factory.mktemp("private-runs")
    with serving(demo_root, tiny_run, runs, public=False) as url:
        yield url, runs, demo_root


def test_predict_opens_only_files_gradio_accepted(public, demo_root):
    url, *_ = public
    server_image = next((demo_root / "data" / "image").rglob("*.jpg"))
    answers = [raw_call(url, "/predict", photo(p)) for p in
               ("/etc/passwd", "/no/such/file.jpg", str(server_image), "../../etc/hostname")]
    assert answers == [(False, uploads.NOT_AN_UPLOAD)] * 4  # one answer: nothing learned about the server
    ok, data = raw_call(url, "/predict", photo(raw_upload(url, EXAMPLE)))
    assert ok and data[0]["confidences"]
    ok, data = raw_call(url, "/predict", photo(str(EXAMPLE)))  # the Predict examples
    assert ok and data[0]["confidences"]


def _owner_trains(data, runs) -> tuple[subprocess.Popen, object]:
    """The owner's CLI run in the app's runs folder, running until told to stop."""
    run = runs / "owner-cli"
    proc = subprocess.Popen([sys.executable, "-m", "carapp", "train", "--data", str(data), "--run-dir", str(run),
                             "--epochs", "50", "--patience", "50", *FAST_TRAIN], cwd=ROOT,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    deadline = time.time() + 120
    while run_status(run) != "running" or not (run / "config.json").exists():
        assert time.time() < deadline and proc.poll() is None
        time.sleep(0.3)
    return proc, run


@pytest.mark.slow
def test_visitor_cannot_stop_the_owners_training(public):
    url, runs, data = public
    proc, run = _owner_trains(data, runs)
    try:
        ok, error = raw_call(url, "/stop_training", [])
        assert not ok and "turned off" in error
        time.sleep(1)
        assert not (run / "STOP").exists() and run_status(run) == "running"
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(60)


@pytest.mark.slow
def test_visitor_cannot_stop_the_owners_training_even_with_training_allowed(demo_root, tiny_run, tmp_path):
    with serving(demo_root, tiny_run, tmp_path, public=True, allow_training=True) as url:
        proc, run = _owner_trains(demo_root, tmp_path)
        try:
            ok, error = raw_call(url, "/stop_training", [])
            assert not ok and "not started from this app" in error
            assert not (run / "STOP").exists()
        finally:
            os.killpg(proc.pid, signal.SIGTERM)
            proc.wait(60)


def test_public_evaluate_is_read_only(public):
    url, runs, _ = public
    report = runs / "tiny" / "test_metrics.json"
    before = report.stat().st_mtime_ns
    ok, data = raw_call(url, "/evaluate", ["tiny", True])  # "Re-evaluate now", sent by hand
    assert ok and "top-1" in data[0]
    assert report.stat().st_mtime_ns == before and jobs.app_job(runs) is None
    (runs / "tiny" / "test_metrics.json").rename(runs / "tiny" / "hidden.json")
    try:
        ok, error = raw_call(url, "/evaluate", ["tiny", False])
        assert not ok and "does not run evaluations" in error
    finally:
        (runs / "tiny" / "hidden.json").rename(report)


def test_public_health_reads_only_the_owners_cached_check_and_marks_are_refused(public, monkeypatch, tmp_path):
    from carapp.dataset.health import check_health
    url, runs, demo_root = public
    monkeypatch.setenv("CARAPP_CACHE", str(tmp_path / "cache"))  # nothing checked yet
    ok, data = raw_call(url, "/health", ["/etc", "(no run)"])   # a server path sent by hand is ignored
    assert ok and "have not been checked yet" in data[0] and "/etc" not in data[0]
    owners = check_health(str(demo_root))                         # the owner's CLI run fills the cache
    ok, data = raw_call(url, "/health", ["/etc", "tiny"])
    assert ok and f"**{owners['num_images']:,}** photos checked" in data[0] and "leaks" in data[0]
    ok, error = raw_call(url, "/mark_photo", [owners["tiny"][0] if owners["tiny"] else "data/x.jpg", "exclude"])
    assert not ok and "for the app's owner" in error and not (runs / "exclusions.csv").exists()


@pytest.mark.slow
def test_private_reevaluation_is_one_background_job_and_readers_never_see_half_a_report(private):
    url, runs, _ = private
    from carapp.evaluation.evaluate import read_report
    before = (runs / "tiny" / "test_metrics.json").stat().st_mtime_ns
    errors: list[str] = []
    stop = threading.Event()

    def read_all_the_time():
        while not stop.is_set():
            try:
                assert read_report(runs / "tiny")["metrics"]["top1"] >= 0
            except Exception as exc:  # any failure of a reader is the bug this test is about
                errors.append(repr(exc))
    reader = threading.Thread(target=read_all_the_time)
    reader.start()
    try:
        with ThreadPoolExecutor(16) as pool:
            answers = list(pool.map(lambda _: raw_call(url, "/evaluate", ["tiny", True]), range(16)))
        started = [a for ok, a in answers if ok and "background" in a[0]]
        busy = [a for ok, a in answers if not ok and "one job at a time" in a]
        assert len(started) == 1 and len(busy) == 15, answers
        deadline = time.time() + 120
        while evaluation_status(runs / "tiny").get("status") != "finished":
            assert time.time() < deadline and evaluation_status(runs / "tiny").get("status") == "running"
            time.sleep(0.3)
    finally:
        stop.set()
        reader.join()
    assert errors == []
    assert (runs / "tiny" / "test_metrics.json").stat().st_mtime_ns > before
    assert not list((runs / "tiny").glob(".*.tmp"))


@pytest.mark.slow
def test_slow_heatmaps_are_off_in_public_and_a_flood_does_not_block_others(public):
    url, *_ = public
    upload = raw_upload(url, EXAMPLE)
    t0 = time.time()
    with ThreadPoolExecutor(40) as pool:
        answers = list(pool.map(lambda _: raw_call(url, "/predict", photo(upload, "scorecam")), range(40)))
    assert all(not ok and ("turned off" in str(e) or "Queue is full" in str(e) or "at most 8 at a time" in str(e))
               for ok, e in answers), answers
    ok, data = raw_call(url, "/predict", photo(upload))
    assert ok and time.time() - t0 < 60


def test_queue_is_bounded_and_slow_heatmaps_run_one_at_a_time(private):
    url, *_ = private
    from carapp.ui.app import build_app
    from carapp.ui.settings import resolve_settings
    demo = build_app(dataclasses.replace(resolve_settings(), queue_size=7))
    assert demo._queue.max_size == 7
    # every prediction (the API's /predict, a click, an upload) draws from one pool of 2: a limit is per event in
    # Gradio, so a separate /predict pool let 4 predictions run at once
    classify = [f for f in demo.fns.values() if f.concurrency_id == "classify"]
    assert {f.api_name for f in classify} >= {"predict", "predict_cars"} and len(classify) == 4
    assert {f.concurrency_limit for f in classify} == {2}
    assert predict_tab._SLOW_CAM.acquire(blocking=False)  # as if a ScoreCAM were running
    try:
        ok, error = raw_call(url, "/predict", photo(raw_upload(url, EXAMPLE), "scorecam"))
        assert not ok and error == predict_tab.SLOW_CAM_BUSY
    finally:
        predict_tab._SLOW_CAM.release()


def test_thresholds_outside_zero_one_are_refused(private):
    url, *_ = private
    upload = raw_upload(url, EXAMPLE)
    for bad in (5, -0.1, 0, 1, "0.5"):
        ok, error = raw_call(url, "/predict", [{"path": upload}, None, "gradcam", predict_tab.TOP1, False, bad, None])
        assert not ok and "between 0 and 1" in error, (bad, error)
    ok, data = raw_call(url, "/predict", [{"path": upload}, None, "none", predict_tab.TOP1, False, 0.999, 0.999])
    assert ok and data[2].startswith(("### Not sure", "### This does not look like a car")), data[2]


def test_a_slider_left_where_the_model_put_it_keeps_the_exact_threshold():
    """A model whose calibration found no threshold for 95% (1.0: never name one) shows its slider at 0.99; the
    page sends 0.99 back with every photo, which must neither be refused nor become a looser threshold."""
    own = {"model": 1.0, "make": 0.874, "ood": 3.2}
    assert predict_tab.slider_value(own["model"]) == 0.99 and predict_tab.slider_value(own["make"]) == 0.87
    assert predict_tab.moved_thresholds({"model": 0.99, "make": 0.87}, own) == {}
    assert predict_tab.moved_thresholds({"model": 0.5, "make": 0.87}, own) == {"model": 0.5}
    page = ("photo", "run", "gradcam", "top-1", False, 0.5, 0.5, True)  # the sliders at their 0.5
    assert predict_tab.page_thresholds(*page, False)[5:7] == (None, None)  # untouched: the model's own
    assert predict_tab.page_thresholds(*page, True) == page                # moved by a person: theirs


def _trainer_pids(runs) -> set[int]:
    out = subprocess.run(["pgrep", "-f", f"carapp train --run-dir {runs}"], capture_output=True, text=True).stdout
    return {int(p) for p in out.split()}


@pytest.mark.slow
def test_three_start_clicks_start_one_trainer(demo_root, tiny_run, tmp_path):
    with serving(demo_root, tiny_run, tmp_path) as url:
        def click(delay):
            time.sleep(delay)
            return raw_call(url, "/start_training", [str(demo_root), *TINY_START])
        with ThreadPoolExecutor(3) as pool:
            answers = list(pool.map(click, (0, 0.7, 1.4)))
        assert sum(ok for ok, _ in answers) == 1, answers
        assert all("one job at a time" in a for ok, a in answers if not ok)
        assert len(_trainer_pids(tmp_path)) == 1
        assert len([r for r in list_runs(tmp_path) if r.name != "tiny"]) == 1


@pytest.mark.slow
def test_blank_numbers_mean_the_presets_values(demo_root, tiny_run, tmp_path):
    with serving(demo_root, tiny_run, tmp_path) as url:
        blank = ["demo", dict(backbone="resnet18", weights="", epochs=None, batch_size=None, image_size=32, workers=0,
                              optimizer=None, ema=None)]
        ok, data = raw_call(url, "/start_training", [str(demo_root), *blank])
        assert ok and data[0].startswith("Started"), data
        run = next(r.path for r in list_runs(tmp_path) if r.name != "tiny")
        deadline = time.time() + 60
        while not (run / "config.json").is_file():  # the trainer announces itself before it writes its config
            assert time.time() < deadline
            time.sleep(0.2)
        cfg = json.loads((run / "config.json").read_text())
        assert (cfg["epochs"], cfg["batch_size"], cfg["lr"], cfg["weights"]) == (12, 32, 1e-3, "none")
        assert (cfg["optimizer"], cfg["ema"], cfg["resize"], cfg["decay_norm_bias"]) == ("adam", 0.0, "crop", True)
        stop_all_jobs(tmp_path)


@pytest.mark.slow
def test_public_weights_box_takes_no_paths_and_tells_nothing(demo_root, tiny_run, tmp_path):
    with serving(demo_root, tiny_run, tmp_path, public=True, allow_training=True) as url:
        answers = [raw_call(url, "/start_training", ["", "demo", {**TINY_START[1], "weights": w}])
                   for w in ("/root", "/etc/passwd", "/no/such.pth")]
        assert len({a for _, a in answers}) == 1 and not answers[0][0]
        assert "weights are one of" in answers[0][1]


def test_no_server_paths_in_public_config_or_status(public):
    url, runs, data = public
    import urllib.request
    with urllib.request.urlopen(f"{url}config", timeout=30) as r:
        config = r.read().decode()
    ok, status = raw_call(url, "/training_status", ["tiny"])
    assert ok
    for secret in (str(runs), str(data), str(ROOT)):
        assert secret not in config and secret not in json.dumps(status), secret


@pytest.mark.slow
def test_resume_of_a_run_killed_in_its_first_epoch_starts_it_again(demo_root, tiny_run, tmp_path):
    with serving(demo_root, tiny_run, tmp_path) as url:
        run = tmp_path / "killed"
        run.mkdir()
        for name in ("config.json", "labels.json", "split.csv"):
            (run / name).write_bytes((tiny_run / name).read_bytes())
        (run / "progress.json").write_text(json.dumps({"status": "running", "pid": 999_999_999}))
        assert run_status(run) == "interrupted"
        ok, data = raw_call(url, "/resume_training", ["killed", 1])
        assert ok and data[0].startswith("Resuming"), data
        deadline = time.time() + 180
        while run_status(run) == "running":
            assert time.time() < deadline
            time.sleep(0.5)
        assert run_status(run) == "finished" and (run / "best.pt").is_file()


@pytest.mark.slow
def test_sigterm_to_the_process_group_with_loader_workers_stops_cleanly_and_saves(demo_root, tmp_path):
    run = tmp_path / "run"
    args = ["--backbone", "resnet18", "--image-size", "32", "--batch-size", "8", "--workers", "2"]
    proc = subprocess.Popen([sys.executable, "-m", "carapp", "train", "--data", str(demo_root), "--run-dir", str(run),
                             "--epochs", "20", *args], cwd=ROOT, start_new_session=True,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 120
    while json.loads((run / "progress.json").read_text() if (run / "progress.json").exists() else "{}").get(
            "step", 0) < 3:
        assert time.time() < deadline and proc.poll() is None
        time.sleep(0.2)
    os.killpg(proc.pid, signal.SIGTERM)  # what timeout, systemd, Docker and Spaces send: the whole group
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 0, err[-2000:]
    assert "killed by signal" not in err
    assert json.loads((run / "progress.json").read_text())["status"] == "stopped"
    assert (run / "last.pt").is_file()


@pytest.mark.slow
def test_a_malicious_weights_file_is_refused_clearly(demo_root, tmp_path):
    import pickle
    import zipfile

    from conftest import run_cli

    class Evil:
        def __reduce__(self):
            return (os.system, (f"touch {tmp_path}/pwned",))
    evil = tmp_path / "evil.pth"
    with zipfile.ZipFile(evil, "w") as z:  # a torch.save-style archive whose pickle would run a command
        z.writestr("archive/data.pkl", pickle.dumps({"fc.weight": Evil()}))
        z.writestr("archive/version", "3\n")
    proc = run_cli("train", "--data", demo_root, "--run-dir", tmp_path / "run", "--weights", evil, "--epochs", "1",
                   *FAST_TRAIN, check=False)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert "refused for safety" in proc.stderr and "weights_only=False" not in proc.stderr
    assert not (tmp_path / "pwned").exists()


@pytest.mark.slow
def test_a_huge_rgba_upload_is_reduced_while_decoding(tmp_path):
    big = tmp_path / "big.png"
    Image.new("RGBA", (8900, 8900), (20, 120, 200, 128)).save(big, compress_level=1)
    # VmHWM (peak resident set) is per process image; ru_maxrss would carry this test's own peak over the fork
    code = ("import re, sys; from carapp.dataset.images import open_image, PHOTO_DRAFT_SIZE; "
            "im = open_image(sys.argv[1], draft_size=PHOTO_DRAFT_SIZE); "
            "print(*im.size, int(re.search(r'VmHWM:\\s+(\\d+)', open('/proc/self/status').read())[1]) // 1024)")
    out = subprocess.run([sys.executable, "-c", code, str(big)], cwd=ROOT, capture_output=True, text=True,
                         check=True).stdout.split()
    width, height, peak_mb = map(int, out)
    assert peak_mb < 600, f"decoding an 8,900 x 8,900 RGBA PNG peaked at {peak_mb} MB"  # 317 MB is the decode itself
    assert min(width, height) >= 1024  # never below the size prediction asks for


@pytest.mark.slow
def test_a_fresh_public_app_trains_its_first_model_and_says_so(demo_root, tmp_path):
    """A Space with no model and training off: the app trains the demo preset itself, and a visitor's photo gets
    the progress of that first model instead of a dead end; the visitor cannot stop it."""
    from conftest import start_app

    from carapp.ui import first_model
    runs = tmp_path / "runs"
    demo, url = start_app(demo_root, runs, public=True)
    try:
        deadline = time.time() + 90
        run = runs / first_model.NAME
        while not ((run / "config.json").is_file() and run_status(run) == "running"):
            assert time.time() < deadline, "the first model did not start"
            time.sleep(0.5)
        ok, error = raw_call(url, "/predict", photo(raw_upload(url, EXAMPLE)))
        assert not ok and "A first model is being trained" in error, error
        ok, error = raw_call(url, "/stop_training", [])
        assert not ok and run_status(run) == "running"
        config = json.loads((run / "config.json").read_text())
        assert config["preset"] == "demo" and config["data"] == str(demo_root)
    finally:
        stop_all_jobs(runs)
        demo.close()
