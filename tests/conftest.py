"""Shared fixtures: small datasets the tests make themselves, and an isolated index cache."""
from __future__ import annotations

import os

# The suite runs in two pytest-xdist workers (pytest.ini: -n 2), one a core. Each worker, and every process it starts,
# computes on one OpenMP thread: two workers of two threads each would fight over two cores (a 2026-12-03 try of
# xdist without this was slower than one process; with it: docs/BENCHMARKS.md). Set before numpy or torch loads.
if os.environ.get("PYTEST_XDIST_WORKER"):
    os.environ.setdefault("OMP_NUM_THREADS", "1")

import contextlib
import io
import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from carapp.runs import active_run, list_runs


ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(autouse=True)
def _isolated_cache(tmp_path_factory, monkeypatch):
    monkeypatch.setenv("CARAPP_CACHE", str(tmp_path_factory.getbasetemp() / "cache"))


def mat_cells(names: list[str]) -> np.ndarray:
    """A MATLAB cell array (N, 1) as scipy writes it; '' makes an empty cell."""
    cells = np.empty((len(names), 1), dtype=object)
    for i, n in enumerate(names):
        cells[i, 0] = np.array([n]) if n else np.zeros((0, 0))
    return cells


def write_jpeg(path: Path, color, size=(40, 30)) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, color).save(path, "JPEG")


def build_compcars(root: Path, layout: dict[tuple[int, int], dict[str, int]], make_names: list[str],
                   model_names: list[str]) -> Path:
    """layout: (make_id, model_id) -> {year: count}; writes images, labels and misc/ like CompCars."""
    from scipy.io import savemat
    data = root / "data"
    rng = np.random.default_rng(0)
    for (make, model), years in layout.items():
        for year, count in years.items():
            for k in range(count):
                name = f"{make}{model}{year}{k:03d}"
                write_jpeg(data / "image" / str(make) / str(model) / year / f"{name}.jpg",
                           tuple(int(v) for v in rng.integers(0, 255, 3)))
                label = data / "label" / str(make) / str(model) / year / f"{name}.txt"
                label.parent.mkdir(parents=True, exist_ok=True)
                label.write_text(f"{(k % 5) + 1}\n1\n5 4 36 28\n")
    (data / "misc").mkdir(parents=True, exist_ok=True)
    savemat(data / "misc" / "make_model_name.mat",
            {"make_names": mat_cells(make_names), "model_names": mat_cells(model_names)})
    (data / "misc" / "attributes.txt").write_text(
        "model_id maximum_speed displacement door_number seat_number type\n"
        + "".join(f"{m} 200 2.0 4 5 3\n" for (_, m) in layout))
    return root


@pytest.fixture(scope="session")
def demo_root(tmp_path_factory) -> Path:
    """The built-in synthetic demo dataset at a fifth of its size: quick to train on."""
    from carapp.dataset.demo import make_demo_dataset
    root = tmp_path_factory.mktemp("demo")
    make_demo_dataset(root, seed=0, scale=0.25)
    return root


def run_cli(*args, check=True, timeout=600, env=None, **kwargs) -> subprocess.CompletedProcess:
    """python -m carapp ... as a user runs it; returns the completed process (stdout, stderr as text)."""
    env = {**(env or os.environ), "PYTHONUNBUFFERED": "1"}
    proc = subprocess.run([sys.executable, "-m", "carapp", *map(str, args)], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=timeout, **kwargs)
    if check and proc.returncode != 0:
        raise AssertionError(f"carapp {' '.join(map(str, args))} exited {proc.returncode}:\n{proc.stderr[-3000:]}")
    return proc


def cli_json(*args, env=None, **kwargs):
    """`python -m carapp ARGS --json`'s value. Run in this process (a subprocess spends ~6 s importing torch and
    torchvision here, and the suite calls the CLI dozens of times); with `env`, or for what needs a process of its own
    (run_cli's options), as a real subprocess. Its process-level behaviour (stdout holds the JSON alone, exit codes,
    no traceback, signals) is tested through run_cli: tests/test_cli_output.py, the bad-input and kill tests."""
    if env is not None or kwargs:
        return json.loads(run_cli(*args, "--json", env=env, **kwargs).stdout)
    code, value = _cli_in_process(args)
    if code != 0:
        raise AssertionError(f"carapp {' '.join(map(str, args))} exited {code}: {value}")
    return value


def cli_error(*args) -> str:
    """The message of a command that must be refused cleanly (exit code 2), run in this process like cli_json."""
    code, value = _cli_in_process(args)
    assert code == 2 and isinstance(value, dict) and "error" in value, (code, value)
    return value["error"]


def _cli_in_process(args) -> tuple[int, object]:
    from carapp import cli
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        code = cli.main([*map(str, args), "--json"])
    return code, json.loads(out.getvalue())


FAST_TRAIN = ["--backbone", "resnet18", "--image-size", "32", "--batch-size", "16", "--workers", "0"]


@pytest.fixture(scope="session")
def tiny_run(demo_root, tmp_path_factory) -> Path:
    """A one-epoch ResNet-18 run on the small demo set: a model for the app to serve."""
    run = tmp_path_factory.mktemp("seed-runs") / "tiny"
    cli_json("train", "--data", demo_root, "--run-dir", run, "--epochs", "1", *FAST_TRAIN)
    return run


TINY_DETECTOR = dict(epochs=2, steps_per_epoch=3, batch_size=2)


@pytest.fixture(scope="session")
def detector_run(demo_root, tmp_path_factory) -> Path:
    """A detector trained for six steps on the small demo set: a real checkpoint, not a good detector."""
    from carapp.detection.train import detector_config, train_detector
    run = tmp_path_factory.mktemp("det") / "run"
    assert train_detector(detector_config(data=str(demo_root), **TINY_DETECTOR), run)["status"] == "finished"
    return run


@pytest.fixture(scope="session")
def eager_detector(detector_run, tmp_path_factory) -> Path:
    """detector_run's checkpoint with its operating score lowered: it finds many boxes, so photos have several."""
    import torch
    ckpt = torch.load(detector_run / "best.pt", weights_only=True)
    ckpt["metrics"]["min_score"] = 0.05
    path = tmp_path_factory.mktemp("eager") / "best.pt"
    torch.save(ckpt, path)
    return path


def free_port() -> int:
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def serving(data: Path, tiny_run: Path, runs_dir: Path, public: bool = False, **overrides):
    """The app serving the tiny run from its own runs folder; yields the URL, then stops jobs and the server.
    `overrides` set AppSettings fields (allow_training, queue_size, ...)."""
    shutil.copytree(tiny_run, runs_dir / "tiny")
    demo, url = start_app(data, runs_dir, public, **overrides)
    try:
        yield url
    finally:
        stop_all_jobs(runs_dir)
        demo.close()


def start_app(data: Path, runs_dir: Path, public: bool = False, **overrides):
    """The app as `python app.py` builds it, served on a free port; returns (demo, url)."""
    import dataclasses
    os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
    from carapp.ui.app import build_app, launch
    from carapp.ui.settings import resolve_settings

    # clean_cache off: many apps share one process and Gradio's content-addressed upload folder here, and an app
    # that shuts down deletes its files there — the same paths the next app's uploads of the same photo get
    settings = dataclasses.replace(resolve_settings(str(data), None, str(runs_dir), share=False), public=public,
                                   **{"clean_cache": False, **overrides})
    demo = build_app(settings)
    _, url, _ = launch(demo, settings, prevent_thread_lock=True, quiet=True, server_name="127.0.0.1",
                       server_port=free_port())
    return demo, url


def stop_all_jobs(runs_dir: Path, timeout: float = 60) -> None:
    """Teardown: no training subprocess outlives a test."""
    import time

    from carapp.ui import jobs
    for run in list_runs(runs_dir):
        if run.status == "running":
            jobs.stop_training(run.path)
    deadline = time.time() + timeout
    while active_run(runs_dir) and time.time() < deadline:
        time.sleep(0.5)
    for run in list_runs(runs_dir):
        if run.status == "running":
            os.kill(json.loads((run.path / "progress.json").read_text())["pid"], 9)
    while (job := jobs.app_job(runs_dir)) and time.time() < deadline:  # an evaluation job ends by itself
        time.sleep(0.5)
    if job and not job.get("in_app"):  # an in-app job's process is this one
        os.kill(job["pid"], 9)


# Raw Gradio queue calls, as a stranger's script sends them: no gradio_client, no file metadata added for us.
def fn_index(url: str, api_name: str) -> int:
    import urllib.request
    with urllib.request.urlopen(f"{url}config", timeout=30) as r:
        config = json.loads(r.read())
    return next(d["id"] for d in config["dependencies"] if d.get("api_name") == api_name.lstrip("/"))


def fn_index_updating(url: str, elem_id: str, trigger: str) -> int:
    """The event (API-hidden ones too) that `trigger` fires and that updates the component with this elem_id."""
    import urllib.request
    with urllib.request.urlopen(f"{url}config", timeout=30) as r:
        config = json.loads(r.read())
    target = next(c["id"] for c in config["components"] if c.get("props", {}).get("elem_id") == elem_id)
    return next(d["id"] for d in config["dependencies"]
                if target in d["outputs"] and any(t[1] == trigger for t in d["targets"]))


def raw_call(url: str, api_name: str | int, data: list, timeout: float = 120,
             session: str | None = None, source: str | None = None) -> tuple[bool, object]:
    """POST /gradio_api/queue/join with fn_index (an api name, or the index itself), then read the event stream:
    (success, output data or error). A fresh session unless `session` names one; from the loopback address
    `source` (127.0.0.2, ...) when given, as another machine would connect."""
    import uuid
    session = session or uuid.uuid4().hex
    index = api_name if isinstance(api_name, int) else fn_index(url, api_name)
    body = json.dumps({"data": data, "fn_index": index, "session_hash": session,
                       "event_data": None, "trigger_id": None}).encode()
    status, answer = http_request(url, "gradio_api/queue/join", body, {"Content-Type": "application/json"},
                                  source=source)
    if status != 200:  # e.g. 503 when the queue is full, 429 past a client's share
        return False, json.loads(answer.read() or b"{}").get("detail", f"HTTP {status}")
    answer.read()
    status, stream = http_request(url, f"gradio_api/queue/data?session_hash={session}", timeout=timeout,
                                  source=source)
    for line in stream:
        if not line.startswith(b"data:"):
            continue
        msg = json.loads(line[5:])
        if msg.get("msg") == "process_completed":
            out = msg.get("output") or {}
            return bool(msg.get("success")), (out.get("data") if msg.get("success") else out.get("error"))
    return False, "stream ended without an answer"


def http_request(url: str, path: str, body: bytes | None = None, headers: dict | None = None, timeout: float = 30,
                 source: str | None = None):
    """One HTTP request to the app, from the loopback address `source` if given: (status, response)."""
    import http.client
    import urllib.parse
    where = urllib.parse.urlparse(url)
    conn = http.client.HTTPConnection(where.hostname, where.port, timeout=timeout,
                                      source_address=(source, 0) if source else None)
    try:
        conn.request("POST" if body is not None else "GET", where.path.rstrip("/") + "/" + path, body, headers or {})
    except (BrokenPipeError, ConnectionResetError):
        pass  # the server refused and closed before the body was all sent: its answer is there to read
    response = conn.getresponse()
    return response.status, response


def raw_upload(url: str, path: Path) -> str:
    """Upload a file the way the browser does; returns the server path Gradio gives it."""
    import urllib.request
    import uuid
    boundary = uuid.uuid4().hex
    body = (f"--{boundary}\r\nContent-Disposition: form-data; name=\"files\"; filename=\"{path.name}\"\r\n"
            f"Content-Type: application/octet-stream\r\n\r\n").encode() + path.read_bytes() + \
        f"\r\n--{boundary}--\r\n".encode()
    request = urllib.request.Request(f"{url}gradio_api/upload", body,
                                     {"Content-Type": f"multipart/form-data; boundary={boundary}"})
    with urllib.request.urlopen(request, timeout=60) as r:
        return json.loads(r.read())[0]
