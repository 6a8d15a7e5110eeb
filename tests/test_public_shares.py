"""What one visitor of a public app can take from the others, probed as a stranger would: the one job slot (a hung
or dead job), the request queue (a flood from other addresses), the disk (uploads, analyses kept), and the names
that go into the visitor's own CSV files."""
from __future__ import annotations

import csv
import dataclasses
import json
import os
import shutil
import signal
import subprocess
import sys
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from conftest import fn_index, http_request, raw_call, raw_upload, serving
from test_analyze import _corrupt_zip
from test_public_app import EXAMPLE, photo

from carapp.runs import job_status
from carapp import rundir
from carapp.ui import analyze_tab, jobs
from carapp.ui.settings import resolve_settings

FILE = {"_type": "gradio.FileData"}


def _uploaded(url: str, path: Path) -> dict:
    return {"path": raw_upload(url, path), "meta": FILE}


def _wait_finished(out: Path, timeout: float = 180) -> dict:
    deadline = time.time() + timeout
    while (p := job_status(out / "progress.json")).get("status") not in ("finished", "failed", "interrupted"):
        assert time.time() < deadline, p
        time.sleep(0.5)
    return p


def _job_file(runs: Path, proc: subprocess.Popen, folder: Path, **fields) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "progress.json").write_text(json.dumps({"status": "running", "pid": proc.pid}))
    (runs / jobs.JOB_FILE).write_text(json.dumps({
        "pid": proc.pid, "started": rundir.process_started(proc.pid), "since": time.time(), "run": folder.name,
        "kind": "analyze", "folder": str(folder), "progress": "progress.json", **fields}))


def _sleeper(script: str = "import time; time.sleep(600)") -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-c", script], start_new_session=True)


def _live_in_group(pgid: int, wait: float = 5) -> list[int]:
    """The processes of a process group that are still running (a killed one may stay a zombie a moment)."""
    deadline = time.time() + wait
    while True:
        live = []
        for stat in Path("/proc").glob("[0-9]*/stat"):
            try:
                fields = stat.read_text().rsplit(") ", 1)[1].split()
            except (OSError, IndexError):
                continue
            if int(fields[2]) == pgid and fields[0] != "Z":
                live.append(int(stat.parent.name))
        if not live or time.time() > deadline:
            return live
        time.sleep(0.2)


def test_a_hung_job_frees_the_slot_and_says_so(tmp_path, monkeypatch):
    """A job that changes nothing in its folder for the stall time is ended with its whole process group."""
    runs = tmp_path / "runs"
    runs.mkdir()
    hung = _sleeper("import subprocess, sys, time\n"  # a main process and a worker in its group, both asleep
                    "subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(600)'])\ntime.sleep(600)")
    folder = runs / "analyses" / "analysis-hung"
    _job_file(runs, hung, folder)
    time.sleep(0.5)
    assert jobs.app_job(runs)["pid"] == hung.pid  # moving recently: it holds the slot
    monkeypatch.setattr(jobs, "STALL_SECONDS", 60)
    past = time.time() - 120
    for f in [folder, *folder.iterdir()]:
        os.utime(f, (past, past))
    (runs / jobs.JOB_FILE).write_text(json.dumps({**json.loads((runs / jobs.JOB_FILE).read_text()), "since": past}))
    assert jobs.app_job(runs) is None
    assert hung.wait(timeout=10) == -signal.SIGKILL
    assert not _live_in_group(hung.pid)  # its worker too
    assert "made no progress for 2 minutes" in (folder / "console.log").read_text()
    assert job_status(folder / "progress.json")["status"] == "failed"
    assert not (runs / jobs.JOB_FILE).exists()


def test_a_dead_jobs_slot_is_free_and_a_pid_of_another_process_is_left_alone(tmp_path):
    runs = tmp_path / "runs"
    runs.mkdir()
    leader = _sleeper("import subprocess, sys\n"  # dies at once, leaving a loader-like child in its group
                      "subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(600)'])")
    leader.wait(timeout=30)
    _job_file(runs, leader, runs / "analyses" / "analysis-dead", started=12345)
    assert jobs.app_job(runs) is None
    assert not _live_in_group(leader.pid)
    assert "its process is gone" in (runs / "analyses" / "analysis-dead" / "console.log").read_text()
    other = _sleeper()  # a live process whose PID the job file names, started later than the job was: not the job
    try:
        _job_file(runs, other, runs / "analyses" / "analysis-reused", started=rundir.process_started(other.pid) - 1)
        assert jobs.app_job(runs) is None and other.poll() is None
    finally:
        other.kill()


@pytest.mark.slow
def test_a_corrupt_zip_neither_hangs_nor_holds_the_job_slot(demo_root, tiny_run, tmp_path):
    """The 5-KB zip of the round-3 probe, sent as a stranger sends it; then the next analysis starts."""
    bad = _corrupt_zip(tmp_path / "bad.zip", EXAMPLE)
    with serving(demo_root, tiny_run, tmp_path / "runs", public=True) as url:
        ok, answer = raw_call(url, "/analyze", [[_uploaded(url, bad)], None, None, "folder"])
        assert ok, answer
        out = next((tmp_path / "runs" / "analyses").glob("analysis-*"))
        assert _wait_finished(out)["status"] == "finished"
        rows = list(csv.DictReader(open(out / "predictions.csv")))
        assert sorted(r["status"] == "unreadable" for r in rows) == [False, True]
        deadline = time.time() + 30  # the job ends: no worker keeps its process waiting
        while jobs.app_job(tmp_path / "runs"):
            assert time.time() < deadline, "the analysis's process did not end"
            time.sleep(0.3)
        ok, answer = raw_call(url, "/analyze", [[_uploaded(url, EXAMPLE)], None, None, "folder"])
        assert ok, answer


@pytest.mark.slow
def test_busy_names_no_other_analysis_and_no_file_name_changes_the_upload_list(demo_root, tiny_run, tmp_path):
    with serving(demo_root, tiny_run, tmp_path / "runs", public=True) as url:
        tricky = tmp_path / "a,path,b.jpg"  # first in the list, it made the list parse as a path,group CSV
        shutil.copy(EXAMPLE, tricky)
        plain = tmp_path / "car.jpg"
        shutil.copy(EXAMPLE, plain)
        ok, first = raw_call(url, "/analyze", [[_uploaded(url, tricky), _uploaded(url, plain)], None, None, "folder"])
        assert ok, first
        ok, busy = raw_call(url, "/analyze", [[_uploaded(url, plain)], None, None, "folder"])
        assert not ok and busy == analyze_tab.BUSY  # nothing of which analysis, nor when it started
        out = next((tmp_path / "runs" / "analyses").glob("analysis-*"))
        _wait_finished(out)
        rows = list(csv.DictReader(open(out / "predictions.csv")))
        assert sorted(Path(r["path"]).name for r in rows) == ["a,path,b.jpg", "car.jpg"]
        assert {r["group"] for r in rows} == {"(top level)"}


def test_public_analyses_expire_by_age_then_by_size_and_the_running_one_stays(tmp_path):
    settings = dataclasses.replace(resolve_settings(None, None, str(tmp_path)), public=True,
                                   analyses_max_hours=1, analyses_max_mb=3.5)
    now = time.time()
    folders = {}
    for name, age_h, mb in (("old", 2, 0.1), ("a", 0.5, 1), ("b", 0.4, 1), ("c", 0.3, 1), ("d", 0.2, 1)):
        folder = analyze_tab.analyses_dir(settings) / f"analysis-{name}-{uuid.uuid4().hex[:4]}"
        folder.mkdir(parents=True)
        (folder / "report.html").write_bytes(b"x" * int(mb * 2**20))
        os.utime(folder, (now - age_h * 3600,) * 2)
        folders[name] = folder
    running = _sleeper()
    try:
        _job_file(tmp_path, running, folders["a"])
        os.utime(folders["a"], (now - 0.5 * 3600,) * 2)
        gone = analyze_tab.expire_analyses(settings)
    finally:
        running.kill()
    # 4.1 MB in all: "old" goes by age; then, oldest first, until 3.5 MB are left: b ("a" is running and stays)
    assert sorted(gone) == sorted([folders["old"].name, folders["b"].name])
    assert all(folders[n].is_dir() for n in "acd")


def test_an_upload_larger_than_an_analysis_may_send_is_refused_before_it_is_stored(demo_root, tiny_run, tmp_path):
    from gradio.utils import get_upload_folder
    token = uuid.uuid4().hex  # in this test's file names: the upload folder is shared with tests running beside it

    def stored() -> list[str]:
        return [p.name for p in Path(get_upload_folder()).rglob(f"*{token}*")]

    with serving(demo_root, tiny_run, tmp_path / "runs", public=True, analyze_max_mb=1) as url:
        def send(files: int, chunked: bool = False) -> int:
            boundary = uuid.uuid4().hex
            size = 1_000 if chunked else 800_000  # refused for its missing length: a large one dies mid-send
            body = b"".join(f"--{boundary}\r\nContent-Disposition: form-data; name=\"files\"; "
                            f"filename=\"p{i}-{token}.jpg\"\r\nContent-Type: image/jpeg\r\n\r\n".encode()
                            + os.urandom(size) + b"\r\n" for i in range(files)) + f"--{boundary}--\r\n".encode()
            headers = {"Content-Type": f"multipart/form-data; boundary={boundary}"}
            if chunked:  # an iterable body without a Content-Length: http.client sends it chunked
                body = iter([body])
            status, answer = http_request(url, "gradio_api/upload", body, headers)
            answer.read()
            return status
        assert send(3) == 413 and send(1, chunked=True) == 411
        assert stored() == []  # nothing stored
        assert send(1) == 200 and stored() == [f"p0-{token}.jpg"]  # and one that fits is


@pytest.mark.slow
def test_one_clients_flood_cannot_keep_another_clients_prediction_waiting(demo_root, tiny_run, tmp_path):
    """Two flooding addresses keep far more predictions in flight than the queue holds; a third address's
    predictions are still answered within seconds, and each flooder is told at once that it has too many."""
    with serving(demo_root, tiny_run, tmp_path / "runs", public=True, queue_per_client=4) as url:
        upload = raw_upload(url, EXAMPLE)
        predict = fn_index(url, "/predict")  # once: a flood of joins, not of /config downloads
        stop = time.time() + 25
        said = {"127.0.0.2": [], "127.0.0.3": []}

        def flood(source: str) -> None:
            for _ in range(60):  # bounded in count and in time
                if time.time() > stop:
                    return
                said[source].append(raw_call(url, predict, photo(upload), source=source, timeout=60))
                if not said[source][-1][0]:
                    time.sleep(0.2)

        with ThreadPoolExecutor(24) as pool:
            floods = [pool.submit(flood, s) for s in said for _ in range(12)]
            time.sleep(5)
            waits = []
            for _ in range(5):
                t0 = time.time()
                ok, data = raw_call(url, predict, photo(upload), source="127.0.0.4", timeout=60)
                assert ok, data
                waits.append(time.time() - t0)
            for f in floods:
                f.result()
        refused = [e for answers in said.values() for ok, e in answers if not ok]
        assert refused and all("at most 4 at a time" in e for e in refused), refused[:3]
        assert max(waits) < 15, waits
