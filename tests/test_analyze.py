"""Analysing a photo collection: outputs, groups, intervals, resume after kill -9, and every kind of bad input."""
from __future__ import annotations

import csv
import io
import json
import os
import shutil
import signal
import subprocess
import sys
import time
import zipfile
from pathlib import Path

import pytest
from conftest import ROOT, cli_error, cli_json, run_cli
from scipy.stats import binomtest

from carapp.runs import job_status


@pytest.fixture(scope="module")
def collection(demo_root, tiny_run, tmp_path_factory):
    """The demo set's test split as a collection of two 'cities', plus a note and a broken photo."""
    root = tmp_path_factory.mktemp("collection") / "photos"
    truth = {}
    rows = [r for r in csv.DictReader(open(tiny_run / "split.csv")) if r["split"] == "test"]
    for i, r in enumerate(rows):
        city = root / ("north" if i % 2 else "south")
        city.mkdir(parents=True, exist_ok=True)
        shutil.copy(demo_root / r["path"], city / f"{i:03d}.jpg")
        truth[str(city / f"{i:03d}.jpg")] = int(r["label"])
    (root / "north" / "notes.txt").write_text("not a photo")
    (root / "south" / "broken.jpg").write_text("not a jpeg either")
    return root, truth


def _rows(path):
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def test_outputs_groups_and_intervals(collection, tiny_run, tmp_path):
    root, truth = collection
    out = tmp_path / "out"
    summary = cli_json("analyze", root, "--run", tiny_run, "--out", out, "--workers", "0")
    assert summary["images"] == len(truth) + 1 and summary["skipped_not_images"] == 1
    assert summary["groups"] == ["north", "south"] and summary["status_counts"]["unreadable"] == 1
    rows = _rows(out / "predictions.csv")
    assert sorted(r["path"] for r in rows) == sorted([*truth, str(root / "south" / "broken.jpg")])
    for r in rows:
        assert r["group"] == os.path.basename(os.path.dirname(r["path"]))
        assert r["status"] in ("model", "make", "unsure", "no-car", "unreadable")
    prefix = {"make": "Make only: ", "unsure": "Not sure: ", "no-car": "Not a car: ", "model": ""}
    for r in rows:  # every answer that names no model says why, in words and numbers
        if r["status"] != "unreadable":
            assert r["reason"].startswith(prefix[r["status"]]) and (r["status"] == "model") == (not r["reason"])
    broken = next(r for r in rows if r["path"].endswith("broken.jpg"))
    assert broken["status"] == "unreadable" and "not an image file" in broken["reason"]
    summary_rows = _rows(out / "summary.csv")
    assert list(summary_rows[0]) == ["group", "level", "name", "count", "share", "ci_low", "ci_high"]
    for s in summary_rows:
        mine = [r for r in rows if s["group"] == "(all)" or r["group"] == s["group"]]
        readable = [r for r in mine if r["status"] != "unreadable"]
        if s["level"] == "make":
            count = sum(r["make"] == s["name"] and r["status"] in ("model", "make") for r in readable)
        elif s["level"] == "model":
            count = sum(r["model"] == s["name"] and r["status"] == "model" for r in readable)
        else:
            count = sum(r["status"] == s["name"] for r in (mine if s["name"] == "unreadable" else readable))
        n = len(mine) if s["name"] == "unreadable" else len(readable)
        assert int(s["count"]) == count and float(s["share"]) == pytest.approx(count / n, abs=1e-6), s
        ci = binomtest(count, n).proportion_ci(0.95, method="wilson")
        assert float(s["ci_low"]) == pytest.approx(ci.low, abs=1e-6) and float(s["ci_high"]) == pytest.approx(
            ci.high, abs=1e-6)
    page = (out / "report.html").read_text()
    assert "Make share per group" in page and "north" in page and "plotly" in page.lower()
    assert "<script src=" not in page  # self-contained: plotly.js inside the page, nothing fetched


def test_zip_and_list_sources_and_group_csv(collection, tiny_run, tmp_path):
    root, truth = collection
    archive = tmp_path / "photos.zip"
    with zipfile.ZipFile(archive, "w") as z:
        for path in list(truth)[:6]:
            z.write(path, f"{os.path.basename(os.path.dirname(path))}/{os.path.basename(path)}")
    listing = tmp_path / "list.csv"
    listing.write_text("path,group\n" + "".join(f"{p},campaign-{i % 3}\n" for i, p in enumerate(list(truth)[:9])))
    summary = cli_json("analyze", archive, listing, "--run", tiny_run, "--out", tmp_path / "out", "--workers", "0")
    assert summary["images"] == 15 and set(summary["groups"]) == {"north", "south", "campaign-0", "campaign-1",
                                                                   "campaign-2"}
    assert all("!" in r["path"] for r in _rows(tmp_path / "out" / "predictions.csv") if "photos.zip" in r["path"])
    groups = tmp_path / "groups.csv"
    groups.write_text("path,group\n" + "".join(f"{p},{'even' if i % 2 == 0 else 'odd'}\n"
                                               for i, p in enumerate(truth)))
    summary = cli_json("analyze", root, "--run", tiny_run, "--out", tmp_path / "out2", "--group-by", groups,
                       "--workers", "0")
    assert set(summary["groups"]) >= {"even", "odd"}


@pytest.mark.slow
def test_bad_input_is_refused_with_a_message(tiny_run, tmp_path, collection):
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "readme.txt").write_text("no photos here")
    proc = run_cli("analyze", empty, "--run", tiny_run, "--out", tmp_path / "o1", check=False)
    assert proc.returncode == 2 and "no images found" in proc.stderr and "Traceback" not in proc.stderr
    for name, member in (("up.zip", "../../evil.jpg"), ("abs.zip", "/etc/evil.jpg")):
        with zipfile.ZipFile(tmp_path / name, "w") as z:
            z.writestr(member, b"x")
        said = cli_error("analyze", tmp_path / name, "--run", tiny_run, "--out", tmp_path / "o2")
        assert "points outside the archive" in said, said
    with zipfile.ZipFile(tmp_path / "bomb.zip", "w", zipfile.ZIP_DEFLATED) as z:
        z.writestr("big.jpg", b"\0" * (80 * 2**20))
    assert "zip bomb" in cli_error("analyze", tmp_path / "bomb.zip", "--run", tiny_run, "--out", tmp_path / "o3")
    assert not (tmp_path / "evil.jpg").exists() and not any((tmp_path / "o2").glob("*.jpg"))
    root, _ = collection
    other = shutil.copytree(tiny_run, tmp_path / "other-run")
    (other / "labels.json").write_text(json.dumps([{**c, "name": c["name"] + " II"} for c in
                                                   json.loads((tiny_run / "labels.json").read_text())]))
    cli_json("analyze", root / "north", "--run", tiny_run, "--out", tmp_path / "o4", "--workers", "0")
    assert "another model" in cli_error("analyze", root / "north", "--run", other, "--out", tmp_path / "o4")
    cli_json("analyze", root / "north", "--run", other, "--out", tmp_path / "o4", "--force", "--workers", "0")


@pytest.mark.slow
def test_kill_9_at_any_moment_then_rerun_gives_every_image_exactly_once(collection, tiny_run, tmp_path):
    root, truth = collection
    out = tmp_path / "out"
    args = [sys.executable, "-m", "carapp", "analyze", str(root), "--run", str(tiny_run), "--out", str(out),
            "--batch-size", "2", "--workers", "1", "--engine", "torch"]
    for delay in (2.5, 3.5, 4.5):
        proc = subprocess.Popen(args, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                start_new_session=True)
        time.sleep(delay)
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    cli_json(*args[3:])  # the rerun, in this process
    paths = [r["path"] for r in _rows(out / "predictions.csv")]
    assert len(paths) == len(set(paths)) == len(truth) + 1
    assert json.loads((out / "progress.json").read_text())["status"] == "finished"
    again = cli_json(*args[3:])  # a rerun of a finished analysis does nothing new
    assert again["images"] == len(truth) + 1


@pytest.mark.slow
def test_the_analyze_tab_as_a_stranger_calls_it(collection, demo_root, tiny_run, tmp_path):
    """Public app: uploads only, capped by the photos they hold (a zip by its members, an upload named twice once);
    made-up paths and server folders refused; one analysis runs as a job; only the session that started it sees it,
    and its downloads name uploads by file name, never by server path."""
    import urllib.request
    from concurrent.futures import ThreadPoolExecutor

    from conftest import fn_index_updating, raw_call, raw_upload, serving

    root, truth = collection
    with zipfile.ZipFile(tmp_path / "three.zip", "w") as z:
        for p in list(truth)[:3]:
            z.write(p, f"city/{Path(p).name}")
    with serving(demo_root, tiny_run, tmp_path, public=True, analyze_max_files=2) as url:
        uploaded = [{"path": raw_upload(url, Path(p)), "meta": {"_type": "gradio.FileData"}} for p in list(truth)[:3]]
        ok, error = raw_call(url, "/analyze", [uploaded, None, None, "folder"])
        assert not ok and "at most 2 photos" in error
        zipped = {"path": raw_upload(url, tmp_path / "three.zip"), "meta": {"_type": "gradio.FileData"}}
        ok, error = raw_call(url, "/analyze", [[zipped], None, None, "folder"])
        assert not ok and "(3 photos" in error  # one upload, three photos inside
        (tmp_path / "fake.zip").write_bytes(b"not a zip at all")
        fake = {"path": raw_upload(url, tmp_path / "fake.zip"), "meta": {"_type": "gradio.FileData"}}
        ok, error = raw_call(url, "/analyze", [[fake], None, None, "folder"])
        assert not ok and error.startswith("fake.zip: not a folder") and "/tmp" not in error, error
        ok, error = raw_call(url, "/analyze", [uploaded[:1], str(root), None, "folder"])
        assert not ok and "uploads only" in error
        ok, error = raw_call(url, "/analyze", [[{"path": "/etc/passwd"}], None, None, "folder"])
        assert not ok
        twice = [uploaded[0], uploaded[0], uploaded[1]]  # two photos, one named twice: within the cap
        with ThreadPoolExecutor(2) as pool:  # two clicks racing: one analysis starts, the other is told to wait
            answers = list(pool.map(lambda s: (s, *raw_call(url, "/analyze", [twice, None, None, "folder"],
                                                            session=s)), ["first", "second"]))
        assert sorted(ok for _, ok, _ in answers) == [False, True], answers
        from carapp.ui.analyze_tab import BUSY
        assert next(a for _, ok, a in answers if not ok) == BUSY  # nothing of which analysis is running
        owner = next(s for s, ok, _ in answers if ok)
        assert len(list((tmp_path / "analyses").glob("analysis-*"))) == 1  # the refused one left nothing behind
        out = next((tmp_path / "analyses").glob("analysis-*"))
        deadline = time.time() + 120
        while job_status(out / "progress.json").get("status") != "finished":
            assert time.time() < deadline, job_status(out / "progress.json")
            time.sleep(0.5)
        assert len(_rows(out / "predictions.csv")) == 2 and (out / "report.html").is_file()
        tick = fn_index_updating(url, "analyze-progress", "tick")
        ok, seen = raw_call(url, tick, [None, None, "month"])  # a stranger's new session: nothing of the other visitor's
        assert ok and seen[0] == "No analysis yet." and "predictions" not in json.dumps(seen), seen
        ok, seen = raw_call(url, tick, [None, None, "month"], session=owner)
        assert ok and out.name in seen[0] and "finished" in seen[0]
        csv_file = next(f for f in seen[-3] if f["path"].endswith("predictions.csv"))  # the downloads, before the trend
        with urllib.request.urlopen(f"{url}gradio_api/file={csv_file['path']}", timeout=30) as r:
            text = r.read().decode()
        assert sorted(r["path"] for r in csv.DictReader(io.StringIO(text))) == sorted(
            Path(p).name for p in list(truth)[:2])
        assert "/tmp" not in text and str(tmp_path) not in text


@pytest.mark.slow
def test_two_processes_share_the_collection_and_rank_0_merges(collection, tiny_run, tmp_path):
    root, truth = collection
    out = tmp_path / "out"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                           "-m", "carapp", "analyze", str(root), "--model", str(tiny_run), "--out", str(out),
                           "--workers", "0", "--json"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert json.loads(proc.stdout)["images"] == len(truth) + 1  # one JSON document: rank 0 speaks
    parts = [_rows(p) for p in sorted(out.glob(".predictions.rank*.csv"))]
    assert len(parts) == 2 and all(parts) and not {r["path"] for r in parts[0]} & {r["path"] for r in parts[1]}
    paths = [r["path"] for r in _rows(out / "predictions.csv")]
    assert len(paths) == len(set(paths)) == len(truth) + 1 and (out / "summary.csv").is_file()


@pytest.mark.slow
def test_onnx_runtime_answers_like_pytorch_and_int8_runs(collection, tiny_run, tmp_path):
    root, truth = collection
    results = {}
    for engine in ("torch", "onnx", "int8"):
        cli_json("analyze", root, "--run", tiny_run, "--out", tmp_path / engine, "--engine", engine, "--workers", "0")
        results[engine] = {r["path"]: r for r in _rows(tmp_path / engine / "predictions.csv")}
    assert set(results["onnx"]) == set(results["torch"]) == set(results["int8"])
    for path, row in results["torch"].items():
        onnx = results["onnx"][path]
        assert (onnx["status"], onnx["model"]) == (row["status"], row["model"])
        if row["model_prob"]:
            assert float(onnx["model_prob"]) == pytest.approx(float(row["model_prob"]), abs=1e-4)
    assert all(r["status"] in ("model", "make", "unsure", "no-car", "unreadable") for r in results["int8"].values())
    assert list((tmp_path / "int8").glob(".model-*-int8.onnx"))  # exported and quantised once, kept for a rerun


def test_downloads_are_copied_once_and_follow_a_rerun(tmp_path):
    """Each timer tick of a finished analysis used to copy its outputs (≈5 MB with report.html) into a new temp
    folder: a stranger could fill the disk. Now one copy per analysis, refreshed when a rerun rewrites the outputs; a public
    copy of predictions.csv names uploads by file name."""
    from carapp.ui.analyze_tab import _downloads
    out = tmp_path / f"analysis-{time.time_ns()}"
    out.mkdir()
    (out / "predictions.csv").write_text("path,status\n/tmp/gradio/ab12/car.jpg,model\n"
                                         "/tmp/gradio/cd/c.zip!nyc/x.png,no-car\n")
    (out / "summary.csv").write_text("group,level,name\n")
    first = _downloads(out, public=True)
    assert first == _downloads(out, public=True) and len(first) == 2
    assert Path(first[0]).read_text() == "path,status\ncar.jpg,model\nc.zip!nyc/x.png,no-car\n"
    assert "/tmp/gradio/ab12/car.jpg" in Path(_downloads(out, public=False)[0]).read_text()  # the owner's own paths
    time.sleep(0.01)
    (out / "predictions.csv").write_text("path,status\n/tmp/gradio/ef/van.jpg,make\n")
    assert Path(_downloads(out, public=True)[0]).read_text() == "path,status\nvan.jpg,make\n"


def _corrupt_zip(path: Path, photo: Path) -> Path:
    """A zip of two stored copies of a photo whose first member's CRC-32 is wrong (local header and directory
    alike): it passes every header check and fails only while that member is read."""
    with zipfile.ZipFile(path, "w", zipfile.ZIP_STORED) as z:
        z.write(photo, "city/bad.jpg")
        z.write(photo, "city/good.jpg")
    raw = bytearray(path.read_bytes())
    raw[14] ^= 0xFF                                   # the first local header's CRC-32
    raw[raw.find(b"PK\x01\x02") + 16] ^= 0xFF         # the first directory entry's CRC-32
    path.write_bytes(bytes(raw))
    return path


@pytest.mark.slow
def test_a_corrupt_zip_member_is_one_unreadable_photo_and_the_job_ends(collection, tiny_run, tmp_path):
    """A wrong CRC-32 raised BadZipFile in the loader worker: the analysis died, and then waited at exit for a
    worker that ignores SIGTERM, forever (holding the app's one job slot)."""
    root, truth = collection
    bad = _corrupt_zip(tmp_path / "bad.zip", Path(next(iter(truth))))
    proc = run_cli("analyze", bad, "--run", tiny_run, "--out", tmp_path / "out", "--workers", "1",
                   "--engine", "torch", "--json", timeout=120)
    rows = {r["path"].rsplit("!", 1)[1]: r for r in _rows(tmp_path / "out" / "predictions.csv")}
    assert rows["city/bad.jpg"]["status"] == "unreadable" and "CRC" in rows["city/bad.jpg"]["reason"]
    assert rows["city/good.jpg"]["status"] != "unreadable"
    assert json.loads(proc.stdout)["status_counts"]["unreadable"] == 1


@pytest.mark.slow
def test_a_process_that_dies_with_loader_workers_still_ends(tmp_path):
    """However a process ends (here an uncaught error mid-loop, its traceback kept), its loader workers go with it."""
    script = ("import torch.utils.data as d\n"
              "import carapp.dataset.loader as l\n"
              "class D(d.Dataset):\n"
              "    def __len__(self): return 100\n"
              "    def __getitem__(self, i): return i\n"
              "for b in d.DataLoader(D(), batch_size=2, num_workers=1, worker_init_fn=l.ignore_stop_signals):\n"
              "    raise RuntimeError('boom')\n")
    proc = subprocess.run([sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 1 and "boom" in proc.stderr


def test_a_zip_with_a_broken_directory_is_refused_by_name(tiny_run, tmp_path):
    with zipfile.ZipFile(tmp_path / "cd.zip", "w") as z:
        z.writestr("a.jpg", b"x" * 100)
    raw = bytearray((tmp_path / "cd.zip").read_bytes())
    raw[raw.find(b"PK\x01\x02") + 3] = 9  # passes is_zipfile (its end record is fine); the directory is not
    (tmp_path / "cd.zip").write_bytes(bytes(raw))
    said = cli_error("analyze", tmp_path / "cd.zip", "--run", tiny_run, "--out", tmp_path / "out")
    assert said.startswith("cd.zip: not a readable zip"), said
    assert not (tmp_path / "out").exists()


FORMULAS = ["=HYPERLINK(\"x\")", "=cmd|'-C calc'!A0", "@SUM(1)", "+1+2", "-3"]  # folder names: no slash


def test_names_a_stranger_chose_cannot_become_spreadsheet_formulas(collection, tiny_run, tmp_path):
    root, truth = collection
    with zipfile.ZipFile(tmp_path / "f.zip", "w") as z:
        for i, (name, photo) in enumerate(zip(FORMULAS, truth)):
            z.write(photo, f"{name}/{name}{i}.jpg")
    out = tmp_path / "out"
    cli_json("analyze", tmp_path / "f.zip", "--run", tiny_run, "--out", out, "--workers", "0")
    for name in ("predictions.csv", "summary.csv"):
        with open(out / name, newline="") as f:
            cells = [c for row in csv.reader(f) for c in row]
        assert not [c for c in cells if c[:1] in ("=", "+", "@", "\t", "\r")], name
        assert {f"'{g}" for g in FORMULAS} <= set(cells), name
    summary = _rows(out / "summary.csv")
    assert all(float(r["share"]) >= 0 for r in summary)  # numbers stay numbers
    again = cli_json("analyze", tmp_path / "f.zip", "--run", tiny_run, "--out", out, "--workers", "0")
    assert again["images"] == len(FORMULAS)  # a rerun reads its own paths back: nothing predicted twice
    assert sorted(again["groups"]) == sorted(FORMULAS)


@pytest.mark.slow
def test_the_onnx_export_is_made_once_per_model_and_shared(collection, tiny_run, tmp_path):
    """Every analysis exported its own 94 MB ONNX copy (~30 s); the exporter's optimiser chatter filled stderr."""
    root, _ = collection
    env = {**os.environ, "CARAPP_CACHE": str(tmp_path / "cache")}
    said = []
    for out in ("a", "b"):
        proc = run_cli("analyze", root / "north", "--run", tiny_run, "--out", tmp_path / out, "--engine", "onnx",
                       "--workers", "0", env=env)
        said.append(proc.stderr)
        assert not list((tmp_path / out).glob("*.onnx")) and not list((tmp_path / out).glob(".*.onnx"))
    assert len(list((tmp_path / "cache" / "engines").glob("model-*.onnx"))) == 1
    assert "exporting the model to ONNX" in said[0] and "exporting" not in said[1]
    assert "unused nodes" not in said[0] and "constant folding" not in said[0], said[0]
    from carapp.engines import pick_engine
    import torch
    assert pick_engine("auto", torch.device("cpu"), work=50, exported=False) == "torch"  # the export would not pay
    assert pick_engine("auto", torch.device("cpu"), work=50, exported=True) == "onnx"
    assert pick_engine("auto", torch.device("cpu"), work=5000, exported=False) == "onnx"


def test_the_make_share_chart_keeps_makes_apart_from_no_answer_and_draws_one_group_once():
    from carapp.analysis.report import make_share_figure
    from carapp.analysis.summary import SUMMARY_COLUMNS
    from carapp.ui.analyze_tab import models_of
    assert list(models_of(None, None).columns) == SUMMARY_COLUMNS  # no make: an empty table with its headers
    row = lambda g, level, name, share: {"group": g, "level": level, "name": name, "count": 1, "share": share,  # noqa
                                         "ci_low": share / 2, "ci_high": min(1, share * 2)}
    one = [row(g, "make", "Aurora", 0.5) for g in ("(top level)", "(all)")] + \
        [row(g, "status", "unsure", 0.5) for g in ("(top level)", "(all)")]
    fig = make_share_figure(one)
    assert {t.name for t in fig.data} == {"(all)"}  # no "(top level)" beside the same photos as "(all)"
    makes, buckets = [t for t in fig.data if t.xaxis == "x"], [t for t in fig.data if t.xaxis == "x2"]
    assert list(makes[0].x) == ["Aurora"] and list(buckets[0].x) == ["unsure", "no-car", "unreadable"]
    two = one + [row("north", "make", "Aurora", 1.0)]
    assert {t.name for t in make_share_figure(two).data} == {"(top level)", "north", "(all)"}
    unsure = [r for r in two if r["level"] != "make"] + [row("north", "status", "unsure", 1.0)]  # no make at all
    assert {t.xaxis for t in make_share_figure(unsure).data} == {"x"}
    assert {t.name for t in make_share_figure(unsure).data if t.showlegend} == {"(top level)", "north", "(all)"}


def test_the_report_counts_each_reason_for_no_car_apart(tmp_path):
    from carapp.analysis.report import write_report
    from carapp.analysis.summary import Tally, summary_rows
    tally = Tally()
    base = {"group": "g", "make": "Aurora", "make_prob": "0.4", "model": "Aurora Sprint", "model_prob": "0.4"}
    texture = "Not a car: its colours and textures are unlike every car photo the model was trained on"
    for i, why in enumerate([texture] * 3 + ["Not a car: none of the model's car classes responds to it"]):
        tally.add({**base, "path": str(tmp_path / f"missing{i}.jpg"), "status": "no-car",
                   "reason": f"{why} (far-from-training score {2 + i:.2f}; 99% of the validation cars score below "
                             f"1.10)."})
    tally.add({**base, "path": str(tmp_path / "car.jpg"), "status": "model", "reason": ""})
    page = write_report(tmp_path, tally, summary_rows(tally), calibrated=True).read_text()
    section = page[page.index("Why no car was named"):]
    assert f"<td>{texture.replace(chr(39), '&#x27;')}</td><td>3</td>" in section
    assert "responds to it</td><td>1</td>" in section and "score 2.00" not in section


def test_the_analyze_tab_shows_the_no_car_photos_with_why(tmp_path):
    import pandas as pd
    from PIL import Image

    from carapp.ui.analyze_tab import refused_gallery
    photo = tmp_path / "cup.jpg"
    Image.new("RGB", (640, 480), (120, 60, 30)).save(photo)
    why = "Not a car: none of the model's car classes responds to it (far-from-training score 2.10; 99% ...)."
    rows = pd.DataFrame([{"path": str(photo), "status": "no-car", "reason": why},
                         {"path": str(tmp_path / "gone.jpg"), "status": "no-car", "reason": why},  # deleted since
                         {"path": str(photo), "status": "model", "reason": ""}])
    items = refused_gallery(rows)
    assert len(items) == 1 and max(items[0][0].size) <= 256
    assert items[0][1] == "no class responds · cup.jpg"  # short enough for a gallery caption
    from carapp.evaluation.trust import SIGNAL_WORDS
    from carapp.evaluation.answers import refusal_tag
    assert refusal_tag(f"Not a car: {SIGNAL_WORDS['layer1']} (far-from-training score 3.1; ...)") == \
        "colours, textures"
