"""Every car in the photo: the detector's training (run directory, resume), its metrics, the crop rule, and the
Predictor's one answer per car."""
from __future__ import annotations

import shutil

import numpy as np
import pytest
import torch
from conftest import TINY_DETECTOR as TINY
from conftest import cli_error, cli_json
from PIL import Image

from carapp import rundir
from carapp.checkpoint import CheckpointError
from carapp.dataset.scenes import make_demo_scenes
from carapp.car_crops import BOX, car_crop, crop_region, measure_context, min_box_side
from carapp.detection.metrics import average_precision, count_figures, operating_score
from carapp.detection.model import Detector, load_detector
from carapp.detection.train import detector_config, train_detector
from carapp.predict import Predictor

def test_a_detector_run_has_the_trainers_habits(detector_run):
    rows = rundir.read_metrics(detector_run)
    assert [r["epoch"] for r in rows] == [1, 2] and all(0 <= r["ap50"] <= 1 for r in rows)
    assert {"train_loss", "ap50", "recall", "precision", "min_score", "lr", "seconds"} <= set(rows[0])
    assert rundir.read_progress(detector_run)["status"] == "finished"
    for name in ("best.pt", "last.pt"):  # plain tensors and numbers: loadable without unpickling anything
        assert torch.load(detector_run / name, weights_only=True)["kind"] == "carapp-detector"
    detector = load_detector(detector_run)
    best = torch.load(detector_run / "best.pt", weights_only=True)["metrics"]
    assert detector.source == str(detector_run) and detector.min_score == best["min_score"]  # chosen on validation
    assert isinstance(detector.detect([Image.new("RGB", (320, 240), (90, 120, 150))])[0], list)


@pytest.mark.slow
def test_a_stopped_detector_resumes_exactly(demo_root, detector_run, tmp_path, monkeypatch):
    calls = []  # asked once per step: stop after step 2 of epoch 1
    monkeypatch.setattr(rundir, "stop_requested", lambda run, pid=None: calls.append(1) or len(calls) == 2)
    run = tmp_path / "stopped"
    assert train_detector(detector_config(data=str(demo_root), **TINY), run)["status"] == "stopped"
    assert rundir.read_progress(run)["status"] == "stopped" and "resume with" in (run / "train.log").read_text()
    monkeypatch.undo()
    out = cli_json("train-detector", "--run-dir", run, "--resume")
    assert out["status"] == "finished" and out["epochs"] == 2
    keys = ("epoch", "train_loss", "ap50", "recall", "precision", "lr")
    assert [{k: r[k] for k in keys} for r in rundir.read_metrics(run)] == \
        [{k: r[k] for k in keys} for r in rundir.read_metrics(detector_run)]


def test_wrong_inputs_get_a_clear_message(demo_root, detector_run, tiny_run, tmp_path, monkeypatch):
    folder = tmp_path / "classes"
    (folder / "Aurora Sprint").mkdir(parents=True)
    for i in range(3):
        Image.new("RGB", (64, 48), (i * 60, 0, 0)).save(folder / "Aurora Sprint" / f"{i}.jpg")
    assert "has no car boxes" in cli_error("train-detector", "--data", folder, "--run-dir", tmp_path / "d1",
                                           "--epochs", "1")
    assert not (tmp_path / "d1").exists()  # nothing left behind
    assert "already holds a run" in cli_error("train-detector", "--data", demo_root, "--run-dir", detector_run)
    assert "no detector run to resume" in cli_error("train-detector", "--run-dir", tmp_path / "none", "--resume")
    with pytest.raises(CheckpointError, match="not a carapp detector"):
        load_detector(tiny_run)  # a classifier is not a detector
    import urllib.error
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "no-hub"))  # nothing cached, and offline:
    import torchvision.models._api as weights_api
    monkeypatch.setattr(weights_api, "load_state_dict_from_url", lambda *a, **k: (_ for _ in ()).throw(
        urllib.error.URLError("no network")))
    with pytest.raises(OSError, match=r"fasterrcnn_mobilenet_v3_large_fpn-\w+\.pth.*no-hub/hub/checkpoints"):
        load_detector("coco")
    assert load_detector("none") is None and load_detector(None) is None


def test_average_precision_and_counts_by_hand():
    truth = [np.array([[0, 0, 10, 10], [20, 20, 30, 30]], float), np.zeros((0, 4))]
    perfect = [(truth[0], np.array([0.9, 0.8])), (np.zeros((0, 4)), np.zeros(0))]
    assert average_precision(perfect, truth) == pytest.approx(1.0)
    # a false box scored above the second true one: precision 1 at recall 0.5, 2/3 at recall 1
    mixed = [(np.array([[0, 0, 10, 10], [50, 50, 60, 60], [20, 20, 30, 30]], float), np.array([0.9, 0.8, 0.7])),
             (np.zeros((0, 4)), np.zeros(0))]
    assert average_precision(mixed, truth) == pytest.approx(0.5 * 1 + 0.5 * 2 / 3)
    figures = count_figures([mixed[0][0], np.array([[1, 1, 5, 5]], float)], truth)
    assert figures["recall"] == 1.0 and figures["precision"] == pytest.approx(2 / 4)
    assert figures["exact_count"] == 0.0 and figures["no_car_photos"] == 1 and figures["no_car_photos_right"] == 0.0


def test_the_operating_score_is_the_best_f1_on_validation():
    truth = [np.array([[0, 0, 10, 10]], float)] * 3
    boxes = np.array([[0, 0, 10, 10], [40, 40, 50, 50]], float)
    preds = [(boxes, np.array([0.8, 0.4]))] * 3  # each photo: its car at 0.8, a false one at 0.4
    assert 0.4 < operating_score(preds, truth) <= 0.8
    assert operating_score([(boxes, np.array([0.8, 0.9]))] * 3, truth) == pytest.approx(0.8)


def test_the_crop_follows_how_the_classifier_trained():
    assert crop_region([10, 20, 50, 40], BOX) == (10, 20, 50, 40)
    context = measure_context([(128, 96)] * 3, [[20, 50, 100, 90], [24, 52, 104, 92], [16, 48, 96, 88]])
    assert context["width"] == pytest.approx(1.6) and context["height"] == pytest.approx(2.4)
    assert context["dy"] < 0  # the photos' centre sits above their cars
    x1, y1, x2, y2 = crop_region([100, 100, 140, 120], context)
    assert (x2 - x1, y2 - y1) == pytest.approx((64, 48)) and (y1 + y2) / 2 < 110
    # the smallest box named: its crop enlarged at most twice to the input; the context makes the crop larger
    assert min_box_side(BOX, 224) == 112 and min_box_side(context, 224) == 70 and min_box_side(context, 32) == 16
    assert min_box_side({"kind": "context", "width": 1.45, "height": 1.6}, 64) == 22  # the demo model
    photo = Image.new("RGB", (160, 120), (200, 10, 10))
    crop = car_crop(photo, [130, 90, 160, 120], context)  # runs past the corner: filled with the photo's colour
    assert crop.size == (48, 72) and crop.getpixel((0, 0)) == (200, 10, 10)


class FixedBoxes(torch.nn.Module):
    """A detection model that finds the same boxes in every photo (as torchvision models answer in eval mode)."""

    def __init__(self, boxes, scores):
        super().__init__()
        self.boxes, self.scores = torch.tensor(boxes, dtype=torch.float32), torch.tensor(scores)

    def forward(self, images):
        return [{"boxes": self.boxes.reshape(-1, 4), "scores": self.scores, "labels": torch.ones(len(self.scores),
                                                                                                 dtype=torch.int64)}
                for _ in images]


def test_one_answer_per_car_the_largest_on_top_small_boxes_not_named(tiny_run, tmp_path):
    scenes = make_demo_scenes(tmp_path / "scenes", 6, seed=1)
    scene = next(r for r in scenes if len(r["cars"]) >= 2)
    photo = Image.open(tmp_path / "scenes" / scene["image"])
    predictor = Predictor.load(tiny_run)
    boxes = [c["box"] for c in scene["cars"]] + [[2, 2, 2 + predictor.min_box - 1, 60]]  # + one too small
    detector = Detector(FixedBoxes(boxes, [0.9] * len(boxes)), (1,), "fixed")
    result = predictor.predict(photo, cam=False, detector=detector)
    assert len(result.cars) == len(boxes) and [c.box for c in result.cars] == [
        [round(v, 1) for v in b] for b in boxes]
    assert result.cars[-1].status == "small" and "Too small to name" in result.cars[-1].reason
    largest = max(result.cars[:-1], key=lambda c: (c.box[2] - c.box[0]) * (c.box[3] - c.box[1]))
    assert result.box == largest.box and result.top == largest.top and result.status == largest.status
    entry = result.to_json()
    assert [c["box"] for c in entry["cars"]] == [c.box for c in result.cars] and entry["box"] == largest.box
    assert all({"box", "score", "status", "top", "make", "makes", "ood_score"} <= set(c) for c in entry["cars"])
    nothing = Detector(FixedBoxes([], []), (1,), "/srv/owner/runs/street-det/best.pt")
    empty = predictor.predict(photo, cam=False, detector=nothing)
    assert empty.status == "no-car" and empty.cars == [] and "found no car" in empty.reason and empty.top
    assert "street-det" in empty.reason and "/srv" not in empty.reason  # a public app's visitor reads it


@pytest.mark.slow
def test_predict_and_evaluate_with_a_detector_on_the_command_line(tiny_run, detector_run, tmp_path):
    scenes = make_demo_scenes(tmp_path / "scenes", 5, seed=2)
    out = cli_json("predict", tmp_path / "scenes" / scenes[0]["image"], "--run", tiny_run, "--detector",
                   detector_run)
    assert "cars" in out[0] and all("box" in car for car in out[0]["cars"])
    figures = cli_json("evaluate", "--run", tiny_run, "--detector", detector_run, "--scenes", tmp_path / "scenes")
    assert figures["scenes"] == 5 and figures["cars"] == sum(len(s["cars"]) for s in scenes)
    for key in ("ap50", "recall", "exact_count", "car_top1", "car_answered_model"):
        assert key in figures
    shutil.rmtree(tmp_path / "scenes")
    assert "no scenes.json" in cli_error("evaluate", "--run", tiny_run, "--detector", detector_run, "--scenes",
                                         tmp_path / "scenes")


def test_a_box_on_part_of_a_car_is_no_second_car():
    from carapp.detection.model import without_parts
    boxes = torch.tensor([[0, 0, 100, 50], [0, 0, 45, 50], [90, 0, 190, 50], [300, 0, 320, 10]], dtype=torch.float32)
    scores = torch.tensor([0.9, 0.8, 0.7, 0.6])
    # the front half of car 0 goes; a neighbour overlapping it a little and a far box stay
    assert without_parts(boxes, scores) == [0, 2, 3]
    assert without_parts(boxes[:0], scores[:0]) == []


def test_a_large_photo_gets_the_boxes_of_its_small_copy_in_its_own_pixels(eager_detector, tmp_path):
    """The detector scales a photo down to its input itself (antialiased, as its training mosaics were): a scene 3x
    larger gives the same cars, in its own pixels."""
    records = make_demo_scenes(tmp_path, 3, seed=5)
    detector = load_detector(eager_detector)
    for record in records:
        photo = Image.open(tmp_path / record["image"])  # 320 x 240
        large = photo.resize((photo.width * 3, photo.height * 3), Image.BICUBIC)
        small_boxes, large_boxes = detector.detect([photo, large])
        assert small_boxes and large_boxes
        best_small, best_large = small_boxes[0], large_boxes[0]
        assert best_large.score == pytest.approx(best_small.score, abs=0.05)
        scaled = [v * 3 for v in best_small.as_list()]
        assert all(abs(a - b) <= 0.03 * 960 for a, b in zip(best_large.as_list(), scaled)), (best_large, scaled)


def test_boxes_decoded_from_the_operating_score_are_those_every_candidate_gives(eager_detector, tmp_path):
    """The detector decodes only candidates that can reach the score asked for: the same cars as keeping every
    candidate and dropping the lower scores afterwards."""
    records = make_demo_scenes(tmp_path, 6, seed=7)
    photos = [Image.open(tmp_path / r["image"]) for r in records]
    detector = load_detector(eager_detector)
    every = detector.detect(photos, min_score=0.05)
    scores = sorted(b.score for boxes in every for b in boxes)
    assert len(scores) >= 8
    for score in (scores[len(scores) // 2], scores[-3]):  # a half of the boxes, then the best three
        asked = detector.detect(photos, min_score=score)
        assert [[(b.as_list(), b.score) for b in boxes] for boxes in asked] == \
            [[(b.as_list(), b.score) for b in boxes if b.score >= score] for boxes in every]
    assert detector.model.score_thresh == 0.05  # the shared model keeps its own threshold


def test_a_zoomed_out_mosaic_keeps_its_boxes_on_its_cars():
    """A training mosaic shrunk onto a backdrop (small cars with room around them): each box still frames its car,
    at the smaller size."""
    from carapp.detection.data import _zoom_out
    canvas = Image.new("RGB", (256, 192), (0, 0, 0))
    canvas.paste((255, 255, 255), (40, 30, 200, 150))  # the "car"
    boxes = np.array([[40, 30, 200, 150]], dtype=np.float32)
    for seed in range(5):
        zoomed, moved = _zoom_out(canvas, boxes, np.random.default_rng(seed), negatives=[])
        x1, y1, x2, y2 = moved[0]
        assert zoomed.size == canvas.size and 0.3 * 160 - 1 <= x2 - x1 <= 0.8 * 160 + 1
        pixels = np.asarray(zoomed.convert("L"), dtype=np.float32)
        inside = pixels[round(y1) + 1:round(y2) - 1, round(x1) + 1:round(x2) - 1]
        assert inside.min() >= 250, seed  # the white car fills its moved box
        ring = np.concatenate([pixels[round(y1) - 3:round(y1) - 1, round(x1):round(x2)].ravel(),
                               pixels[round(y2) + 1:round(y2) + 3, round(x1):round(x2)].ravel()])
        assert ring.max() <= 5, seed    # and the black photo around it is outside


def test_cars_pasted_over_each_other_are_labelled_only_while_half_in_view(tmp_path):
    """Cars pasted one in front of another onto a photo without a car: every box given shows its car on at least half
    its area (a car hidden behind later ones is no car to find), and overlapping cars do occur."""
    from carapp.detection.data import BoxedPhoto, _paste_cars
    colours = [(255, 0, 0), (0, 255, 0), (0, 0, 255)]
    photos = []
    for k, colour in enumerate(colours):
        Image.new("RGB", (40, 20), colour).save(tmp_path / f"{k}.png")
        photos.append(BoxedPhoto(str(tmp_path / f"{k}.png"), (0.0, 0.0, 40.0, 20.0)))
    overlapping = 0
    for seed in range(200):
        cell = Image.new("RGB", (100, 80), (0, 0, 0))
        boxes = _paste_cars(cell, photos, np.random.default_rng(seed))
        pixels = np.asarray(cell)
        for x1, y1, x2, y2 in boxes:
            region = pixels[y1:y2, x1:x2].reshape(-1, 3)
            most = max(int((region == colour).all(1).sum()) for colour in colours)
            assert most >= 0.5 * len(region), (seed, boxes)
        overlapping += any(a[0] < b[2] and b[0] < a[2] and a[1] < b[3] and b[1] < a[3]
                           for i, a in enumerate(boxes) for b in boxes[i + 1:])
    assert overlapping >= 10
