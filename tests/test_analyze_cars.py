"""Analyze with a detector: one row per car, summary.csv counting cars and photos, the report's car crops, and a
photo done only when all its cars are written (kill -9, shards)."""
from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time

import pytest
import torch
from conftest import ROOT, cli_error, cli_json
from PIL import Image
from torchvision.transforms.v2 import functional as TF

from carapp import safecsv
from carapp.analysis.analyze import CAR_COLUMNS, _merge, analyze, read_done
from carapp.dataset.images import open_image
from carapp.dataset.scenes import make_demo_scenes
from carapp.detection.model import Detector
from carapp.predict import Predictor


class TrueBoxes(torch.nn.Module):
    """A detection model that finds each scene's true cars (told apart by their pixels), as torchvision models
    answer in eval mode: what the analysis does with boxes is then checked against known boxes."""

    def __init__(self, folder, records):
        super().__init__()
        self.truth = {self.key(TF.to_dtype(TF.to_image(open_image(folder / r["image"])), torch.float32, scale=True)):
                      [c["box"] for c in r["cars"]] for r in records}

    @staticmethod
    def key(image: torch.Tensor) -> float:
        return round(float(image.double().sum()), 2)

    def forward(self, images):
        out = []
        for image in images:
            boxes = torch.tensor(self.truth[self.key(image)], dtype=torch.float32).reshape(-1, 4)
            out.append({"boxes": boxes, "scores": torch.linspace(0.9, 0.8, len(boxes)),
                        "labels": torch.ones(len(boxes), dtype=torch.int64)})
        return out


def _rows(path):
    with open(path, newline="") as f:
        return list(safecsv.DictReader(f))


@pytest.fixture(scope="module")
def scenes(tmp_path_factory):
    folder = tmp_path_factory.mktemp("scenes") / "street"
    records = make_demo_scenes(folder, 12, seed=3)
    assert any(not r["cars"] for r in records) and any(len(r["cars"]) >= 2 for r in records)
    return folder, records


@pytest.fixture(scope="module")
def naming_run(tiny_run, tmp_path_factory):
    """tiny_run answering every car with a model (its calibrated thresholds lowered; the no-car score kept high):
    the make counts then have cars to count."""
    run = tmp_path_factory.mktemp("naming") / "run"
    shutil.copytree(tiny_run, run)
    calibration = json.loads((run / "calibration.json").read_text())
    calibration["thresholds"].update(model=0.0, make=0.0, ood=1e9)
    (run / "calibration.json").write_text(json.dumps(calibration))
    return run


def test_one_row_per_car_and_summary_counts_cars_and_photos(scenes, naming_run, tmp_path):
    folder, records = scenes
    detector = Detector(TrueBoxes(folder, records), (1,), "true boxes", min_score=0.5)
    result = analyze([str(folder)], str(naming_run), tmp_path / "out", group_by="none", workers=0,
                     detector=detector)
    rows = _rows(tmp_path / "out" / "predictions.csv")
    assert set(CAR_COLUMNS) <= set(rows[0])
    # the true cars, less any lying mostly inside a nearer one's box (Detector.detect's without_parts)
    found = {r["image"]: [b.as_list() for b in detector.detect([open_image(folder / r["image"])])[0]]
             for r in records}
    cars = sum(map(len, found.values()))
    assert result["images"] == len(records) and result["cars"] == cars >= sum(len(r["cars"]) for r in records) - 2
    min_box = Predictor.load(naming_run).min_box
    for r in records:  # every car, once, in the photo's pixels; a scene without one: one no-car row
        mine, boxes = [row for row in rows if row["path"].endswith(r["image"])], found[r["image"]]
        if not boxes:
            assert [(m["status"], m["x1"], m["cars"]) for m in mine] == [("no-car", "", "0")]
            assert "found no car" in mine[0]["reason"]
            continue
        assert [int(m["car"]) for m in mine] == list(range(len(boxes)))
        assert {m["cars"] for m in mine} == {str(len(boxes))}
        assert [[float(m[k]) for k in ("x1", "y1", "x2", "y2")] for m in mine] == boxes
        assert all(0.8 <= float(m["det_score"]) <= 0.9 for m in mine)
        small = [min(b[2] - b[0], b[3] - b[1]) < min_box for b in boxes]
        assert [m["status"] for m in mine] == ["small" if s else "model" for s in small]
    summary = _rows(tmp_path / "out" / "summary.csv")
    named = [row for row in rows if row["status"] in ("model", "make")]
    makes = {s["name"]: int(s["count"]) for s in summary if s["level"] == "make" and s["group"] == "(all)"}
    assert sum(makes.values()) == len(named)  # makes count cars ...
    photos = {s["name"]: s for s in summary if s["level"] == "photos" and s["group"] == "(all)"}
    for make in makes:  # ... and level photos counts the photos holding one
        holding = {row["path"] for row in named if row["make"] == make}
        assert int(photos[make]["count"]) == len(holding)
        assert float(photos[make]["share"]) == pytest.approx(len(holding) / len(records), abs=1e-6)
    assert int(photos["(no car)"]["count"]) == sum(not boxes for boxes in found.values())
    assert len(named) >= 5 and any(len(p) > 1 for p in found.values())
    share = next(s for s in summary if s["level"] == "make" and s["group"] == "(all)")
    assert float(share["share"]) == pytest.approx(int(share["count"]) / cars, abs=1e-6)  # a share of the cars
    small = [int(s["count"]) for s in summary if s["level"] == "status" and s["name"] == "small"
             and s["group"] == "(all)"]
    assert sum(small) == sum(row["status"] == "small" for row in rows)
    report = (tmp_path / "out" / "report.html").read_text()
    assert f"{cars} cars in {len(records)} photos" in report and "Photos holding each make" in report
    from carapp.ui.analyze_tab import results
    from carapp.ui.settings import resolve_settings
    shares = results(tmp_path / "out", resolve_settings(None, None, str(tmp_path / "runs")))[0]
    assert shares.layout.yaxis.title.text == "share of cars"  # the Analyze tab's chart says what it counts


def test_a_photo_is_done_only_when_all_its_cars_are_written(tmp_path):
    header = ["path", "group", "status", "make", "make_prob", "model", "model_prob", "ood_score", "top5", "reason",
              *CAR_COLUMNS]
    def row(path, car, cars):  # noqa: E306
        return [path, "g", "model", "A", 1, "A x", 1, 0, "[]", "", car, cars, 0, 0, 5, 5, 0.9]
    part = tmp_path / "predictions.csv"
    with open(part, "w", newline="") as f:
        writer = safecsv.Writer(f)
        writer.writerows([header, row("a.jpg", 0, 2), row("a.jpg", 1, 2), row("b,\nodd.jpg", 0, 3),
                          row("b,\nodd.jpg", 1, 3)])  # killed before b's third car
    assert read_done(part, per_car=True) == {"a.jpg"}
    assert [r["path"] for r in _rows(part)] == ["a.jpg", "a.jpg"]  # b's two rows gone: it is analysed again, whole
    with open(part, "a", newline="") as f:
        safecsv.Writer(f).writerows([row("c.jpg", 0, 1)])
    assert read_done(part, per_car=True) == {"a.jpg", "c.jpg"}
    other = tmp_path / ".predictions.rank1.csv"  # rank 0 merges every car of the other rank's photos
    with open(other, "w", newline="") as f:
        safecsv.Writer(f).writerows([header, row("d.jpg", 0, 2), row("d.jpg", 1, 2), row("c.jpg", 0, 1)])
    _merge(tmp_path, [other], header)
    assert [r["path"] for r in _rows(part)] == ["a.jpg", "a.jpg", "c.jpg", "d.jpg", "d.jpg"]


@pytest.mark.slow
def test_kill_9_mid_analysis_with_a_detector_then_rerun_gives_every_car_once(scenes, tiny_run, eager_detector,
                                                                                tmp_path):
    folder, _ = scenes
    args = ["analyze", str(folder), "--run", str(tiny_run), "--detector", str(eager_detector), "--batch-size", "2",
            "--workers", "1", "--engine", "torch"]
    whole = cli_json(*args, "--out", tmp_path / "whole")
    for delay in (3.0, 4.5):
        proc = subprocess.Popen([sys.executable, "-m", "carapp", *args, "--out", str(tmp_path / "cut")], cwd=ROOT,
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
        time.sleep(delay)
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    cli_json(*args, "--out", tmp_path / "cut")  # the rerun, in this process
    def cells(out):  # noqa: E306
        return sorted((r["path"], r["car"], r["x1"], r["status"], r["model"]) for r in _rows(out / "predictions.csv"))
    assert cells(tmp_path / "cut") == cells(tmp_path / "whole") and whole["cars"] > whole["images"]
    assert json.loads((tmp_path / "cut" / "progress.json").read_text())["status"] == "finished"
    refused = cli_error("analyze", str(folder), "--run", str(tiny_run), "--out", tmp_path / "cut", "--detector",
                        "none")  # a per-car OUT is not mixed with per-photo rows
    assert "another model" in refused and "detector" in refused


@pytest.mark.slow
def test_the_detector_in_onnx_runtime_finds_the_same_cars_and_is_exported_once(scenes, tiny_run, eager_detector,
                                                                                tmp_path):
    """`--engine onnx` runs the detector's backbone and head in ONNX Runtime too: every car found in PyTorch is
    found, in the same box with the same score; the export is one file of the shared cache, made once."""
    from carapp.cache import cache_dir
    from carapp.detection.model import load_detector
    folder, _ = scenes
    rows, exports = {}, []
    for attempt, engine in enumerate(("torch", "onnx", "onnx", "auto")):
        detector = load_detector(eager_detector, device="cpu")
        analyze([str(folder)], str(tiny_run), tmp_path / f"{engine}{attempt}", workers=0, detector=detector,
                engine=engine)
        assert (detector.onnx is not None) == (engine != "torch")  # auto: a small job, but exported already
        rows[engine] = sorted(_rows(tmp_path / f"{engine}{attempt}" / "predictions.csv"),
                              key=lambda r: (r["path"], r["car"]))
        exports.append([f.stat().st_ino for f in cache_dir("engines").glob("detector-*.onnx")])
    assert exports[0] == [] and len(exports[1]) == 1 and exports[1] == exports[2] == exports[3]
    torch_rows, onnx_rows = rows["torch"], rows["onnx"]
    assert [(r["path"], r["car"], r["cars"], r["status"] == "no-car") for r in onnx_rows] == \
        [(r["path"], r["car"], r["cars"], r["status"] == "no-car") for r in torch_rows]
    assert sum(r["status"] != "no-car" for r in torch_rows) >= 12  # there were cars to compare
    for ours, theirs in zip(onnx_rows, torch_rows):
        if ours["x1"]:
            assert all(abs(float(ours[k]) - float(theirs[k])) <= 0.2 for k in ("x1", "y1", "x2", "y2"))
            assert abs(float(ours["det_score"]) - float(theirs["det_score"])) <= 1e-3


def test_a_car_at_the_photos_left_edge_is_shown_as_its_crop(tmp_path):
    """A box starting at x = 0 (a car cut by the frame) is still a box: pandas reads the column as the number 0.0,
    which the galleries once took for "no box" and showed the whole photo."""
    import pandas as pd

    from carapp.analysis.report import row_image
    from carapp.analysis.summary import has_box
    photo = tmp_path / "edge.jpg"
    Image.new("RGB", (320, 240), (30, 90, 150)).save(photo)
    # every photo with a car (no empty cell): pandas reads x1 as numbers, so a box at the left edge is 0
    (tmp_path / "rows.csv").write_text(f"path,x1,y1,x2,y2\n{photo},0,10,40,30\n{photo},100,10,140,30\n")
    car = pd.read_csv(tmp_path / "rows.csv", keep_default_na=False).to_dict("records")[0]
    whole = {"path": str(photo), "x1": ""}
    assert car["x1"] == 0 and has_box(car) and not has_box(whole)
    assert row_image(car, {}).size == (44, 24) and row_image(whole, {}).size == (320, 240)


@pytest.mark.slow
def test_photos_through_shared_memory_or_the_pipe_give_the_same_cars(scenes, tiny_run, eager_detector, tmp_path,
                                                                      monkeypatch):
    """Loader workers hand whole photos over in shared memory while /dev/shm has room, else through the pipe (a
    container's 64 MB /dev/shm would kill them): the same rows either way."""
    from carapp.analysis import analyze as analyze_module
    from carapp.detection.model import load_detector
    folder, records = scenes
    photo = open_image(folder / records[0]["image"])
    rows = {}
    for name, room in (("shared", 0), ("pipe", 1 << 62)):
        monkeypatch.setattr(analyze_module, "SHARED_MEMORY_ROOM", room)
        given = analyze_module.handed_over(photo)
        assert isinstance(given, torch.Tensor) == (name == "shared")
        analyze([str(folder)], str(tiny_run), tmp_path / name, workers=2, batch_size=4, engine="torch",
                detector=load_detector(eager_detector, device="cpu"))
        rows[name] = sorted((r["path"], r["car"], r["x1"], r["y2"], r["status"], r["model"], r["model_prob"])
                            for r in _rows(tmp_path / name / "predictions.csv"))
    assert rows["shared"] == rows["pipe"] and sum(r[1] not in ("", "0") for r in rows["pipe"]) >= 3
