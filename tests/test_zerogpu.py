"""A ZeroGPU Space, as far as it can be tried off one: its variable set, every GPU path through `spaces.GPU` — the
real package (a no-op off ZeroGPU), or fake_zerogpu, which runs each call in a forked daemon process with its
arguments and result pickled, as ZeroGPU's worker does, so that nothing a call leaves in memory comes back."""
from __future__ import annotations

import csv
import dataclasses
import importlib
import shutil
import subprocess
import sys
import time
import zipfile
from pathlib import Path

import fake_zerogpu
import pytest
from conftest import free_port, write_jpeg

from carapp import predict
from carapp.analysis.analyze import analyze
from carapp.runs import job_status
from carapp.ui import first_model, hardware, jobs, predict_tab, train_tab
from carapp.ui.settings import resolve_settings

ROOT = Path(__file__).resolve().parents[1]
EXAMPLE = ROOT / "assets/examples/aurora_sprint.jpg"


@pytest.fixture
def zerogpu(monkeypatch):
    """The Space's variable set and `spaces` replaced by the fork-per-call fake; hardware's GPU functions decorated
    again with it."""
    monkeypatch.setenv("SPACES_ZERO_GPU", "true")
    monkeypatch.setitem(sys.modules, "spaces", fake_zerogpu)
    fake_zerogpu.calls.clear()
    importlib.reload(hardware)
    yield fake_zerogpu.calls
    monkeypatch.undo()
    importlib.reload(hardware)


def _photos(folder: Path, n: int) -> Path:
    for i in range(n):
        write_jpeg(folder / ("a" if i % 2 else "b") / f"p{i:02d}.jpg", (20 * i % 255, 90, 160), size=(64, 48))
    return folder


def test_the_real_package_is_a_no_op_off_zerogpu():
    """With `spaces` installed and no ZeroGPU variable, the decorated functions are the functions themselves: a
    dedicated GPU or a CPU runs everything as before."""
    spaces = pytest.importorskip("spaces")
    assert not hardware.on_zerogpu() and hardware.host_device() == "auto"
    plain = lambda x: x + 1  # noqa: E731
    assert spaces.GPU(duration=5)(plain) is plain and hardware.gpu(5)(plain) is plain


def test_predictions_and_heatmaps_run_in_gpu_calls(zerogpu, tiny_run, tmp_path):
    settings = resolve_settings(str(tmp_path), str(tiny_run), str(tmp_path / "runs"))
    assert settings.zerogpu and hardware.host_device() == "cpu"
    top, cam, answer, makes = predict_tab.predict({"path": str(EXAMPLE)}, settings=settings)
    assert zerogpu == [("answer_photos", hardware.PREDICT_SECONDS)]
    expected = predict.Predictor.load(tiny_run, "cpu").predict(str(EXAMPLE), top_k=5)
    assert list(top) == [name for name, _ in expected.top] and cam.size == expected.cam.size
    assert "###" in answer and makes
    # the app's own process loaded the model on the CPU only, for its calibration: the answer's copy stayed
    # in the worker
    assert {key[-1] for key in predict._CACHE if key[0] == str((tiny_run / "best.pt").resolve())} == {"cpu"}
    # a slow heatmap asks for more time; a broken upload is told before any GPU call
    assert hardware._answer_seconds("run", [], {"cam": True, "method": "scorecam"}) == hardware.SLOW_CAM_SECONDS
    broken = tmp_path / "broken.jpg"
    broken.write_bytes(b"\xff\xd8 not a jpeg")
    with pytest.raises(Exception, match="Upload a photo"):
        predict_tab.predict({"path": str(broken)}, settings=settings)
    assert len(zerogpu) == 1


def test_a_detector_that_cannot_load_is_a_clear_message_from_the_worker(zerogpu, tiny_run, tmp_path):
    """It breaks inside the call: its message crosses the process boundary, and the app redacts it there."""
    import gradio as gr
    broken = tmp_path / "det" / "best.pt"
    broken.parent.mkdir()
    broken.write_bytes(b"not a checkpoint")
    settings = dataclasses.replace(resolve_settings(str(tmp_path), str(tiny_run), str(tmp_path / "runs")),
                                   public=True, detector=str(broken))
    with pytest.raises(gr.Error, match="Cannot load the car detector") as error:
        predict_tab.predict({"path": str(EXAMPLE)}, settings=settings)
    assert str(tmp_path) not in error.value.message and "<detector>" in error.value.message
    assert [name for name, _ in zerogpu] == ["answer_photos"]


def test_an_analysis_is_a_chain_of_gpu_calls_with_the_same_rows(zerogpu, tiny_run, tmp_path, monkeypatch):
    """Each call takes up to its limit and leaves the rest to the next, which resumes: the rows, the summary and
    the report are those of one analysis in one go, each photo once."""
    photos = _photos(tmp_path / "photos", 23)
    monkeypatch.setattr(hardware, "FIRST_CHUNK", 5)
    monkeypatch.setattr(hardware, "next_chunk", lambda photos, seconds: 7)
    out = tmp_path / "in-calls"
    options = {"time_source": "exif", "period": "month"}
    result = hardware.analyze_in_calls([str(photos)], str(tiny_run), out, "folder", None, options)
    assert [name for name, _ in zerogpu] == ["analysis_call"] * 4  # 5 + 7 + 7 + 4
    assert {seconds for _, seconds in zerogpu} == {hardware.ANALYSIS_CALL_SECONDS}
    assert result["images"] == 23 and job_status(out / "progress.json")["status"] == "finished"
    whole = tmp_path / "whole"
    analyze([str(photos)], str(tiny_run), whole, workers=0, **options)

    def rows(folder):
        with open(folder / "predictions.csv") as f:
            return sorted((r["path"], r["status"], r["model"], r["make"]) for r in csv.DictReader(f))
    assert rows(out) == rows(whole) and len(rows(out)) == 23
    assert (out / "summary.csv").read_text() == (whole / "summary.csv").read_text()


def test_analysis_limit_returns_what_is_left(tiny_run, tmp_path):
    photos = _photos(tmp_path / "photos", 9)
    out = tmp_path / "out"
    first = analyze([str(photos)], str(tiny_run), out, workers=0, limit=4)
    assert first == {"finished": False, "done": 4, "total": 9}
    assert job_status(out / "progress.json")["done"] == 4 and not (out / "summary.csv").exists()
    assert analyze([str(photos)], str(tiny_run), out, workers=0, limit=100)["images"] == 9


def test_next_chunk_fills_a_share_of_the_call():
    assert hardware.next_chunk(100, 10.0, budget=60) == int(10 * 60 * hardware.CHUNK_SHARE)
    assert hardware.next_chunk(1, 1000.0) == 8  # never stalls at nothing


def test_training_and_the_first_model_are_off_with_what_to_do(zerogpu, tmp_path):
    settings = dataclasses.replace(resolve_settings(None, None, str(tmp_path / "runs")), public=True,
                                   allow_training=True)
    assert not settings.training_enabled and not first_model.needed(settings) and not first_model.offered(settings)
    import gradio as gr
    with pytest.raises(gr.Error, match="ZeroGPU.*CARAPP_CHECKPOINT"):
        train_tab.form_config(settings.data, "demo", {}, settings)
    assert "CARAPP_CHECKPOINT=hf://" in predict_tab.no_model_message(settings)
    assert hardware.description().startswith("ZeroGPU")


def test_an_in_app_job_holds_the_slot_and_says_why_it_failed(tmp_path):
    runs = tmp_path / "runs"

    def fails():
        time.sleep(0.5)
        raise ValueError("no images found in nowhere")
    out = jobs.start_in_app(runs, runs / "analyses" / "a1", "analyze", fails)
    with pytest.raises(jobs.JobBusy):
        jobs.start_in_app(runs, runs / "analyses" / "a2", "analyze", lambda: None)
    deadline = time.time() + 10
    while jobs.app_job(runs) and time.time() < deadline:
        time.sleep(0.1)
    progress = job_status(out / "progress.json")
    assert progress["status"] == "failed" and "no images found" in progress["error"]
    assert jobs.app_job(runs) is None  # the slot is free again, and this process was never signalled


@pytest.mark.slow
def test_the_app_answers_on_a_zerogpu_space(tiny_run, tmp_path):
    """`python app.py` with a Space's variables (public, ZeroGPU) and fake_zerogpu as the `spaces` package: a photo
    is answered, an analysis of a zip runs as GPU calls to the end, training is refused with what to do."""
    from gradio_client import handle_file
    runs = tmp_path / "runs"
    shutil.copytree(tiny_run, runs / "tiny")
    port = free_port()
    env = {"SPACE_ID": "someone/carapp", "SPACE_HOST": "someone-carapp.hf.space", "SYSTEM": "spaces",
           "SPACES_ZERO_GPU": "true", "SPACES_ZERO_DEVICE_API_URL": "http://127.0.0.1:9/", "CARAPP_RUNS_DIR":
           str(runs), "CARAPP_CHECKPOINT": str(runs / "tiny"), "GRADIO_SERVER_PORT": str(port),
           "GRADIO_SERVER_NAME": "127.0.0.1", "PATH": "/usr/bin:/bin", "HOME": str(tmp_path),
           "CARAPP_CACHE": str(tmp_path / "cache")}
    launcher = ("import sys; sys.path.insert(0, 'tests'); import fake_zerogpu; sys.modules['spaces'] = fake_zerogpu; "
                "import runpy; runpy.run_path('app.py', run_name='__main__')")
    app = subprocess.Popen([sys.executable, "-c", launcher], cwd=ROOT, env=env, stdout=subprocess.PIPE,
                           stderr=subprocess.STDOUT, start_new_session=True)
    try:
        client = _client(f"http://127.0.0.1:{port}/", app)
        top, _, answer, _ = client.predict(handle_file(str(EXAMPLE)), api_name="/predict")
        assert top["label"] and "###" in answer
        archive = tmp_path / "photos.zip"
        with zipfile.ZipFile(archive, "w") as z:
            for i in range(6):
                write_jpeg(tmp_path / f"p{i}.jpg", (40 * i, 80, 120), size=(64, 48))
                z.write(tmp_path / f"p{i}.jpg", f"city/p{i}.jpg")
        message = client.predict([handle_file(str(archive))], None, None, "folder", api_name="/analyze")  # State is not an output
        assert "Analysing" in message
        out = next((runs / "analyses").glob("analysis-*"))
        deadline = time.time() + 120
        while (p := job_status(out / "progress.json")).get("status") not in ("finished", "failed"):
            assert time.time() < deadline, p
            time.sleep(0.5)
        assert p["status"] == "finished", p
        assert p["pid"] == app.pid  # an in-app job of GPU calls, not a training-style subprocess
        with open(out / "predictions.csv") as f:
            assert len(list(csv.DictReader(f))) == 6
        with pytest.raises(Exception, match="ZeroGPU"):
            client.predict("", "demo", {}, api_name="/start_training")
    finally:
        app.terminate()
        try:
            app.wait(20)
        except subprocess.TimeoutExpired:
            app.kill()


def _client(url: str, app: subprocess.Popen, timeout: float = 90):
    from gradio_client import Client
    deadline = time.time() + timeout
    while True:
        try:
            return Client(url, verbose=False)
        except Exception:  # noqa: BLE001 - not up yet
            if app.poll() is not None or time.time() > deadline:
                raise AssertionError(app.stdout.read().decode(errors="replace")[-3000:]) from None
            time.sleep(1)
