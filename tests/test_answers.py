"""Answers a user can trust, end to end: calibration of a run, statuses, makes, old runs, exports, the CLI."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from conftest import FAST_TRAIN, ROOT, cli_error, cli_json, run_cli
from PIL import Image

from carapp.evaluation import trust
from carapp.evaluation.answers import BANK_FILE, CALIBRATION_FILE, STATS_FILE
from carapp.evaluation.trust import STATUSES, softmax
from carapp.predict import Predictor

EXAMPLE = ROOT / "assets/examples/aurora_sprint.jpg"


@pytest.fixture
def run(tiny_run, tmp_path):
    """A private copy of the tiny run, which training calibrated at its end."""
    return shutil.copytree(tiny_run, tmp_path / "run")


def test_training_ends_calibrated(tiny_run):
    info = json.loads((tiny_run / CALIBRATION_FILE).read_text())
    for key in ("temperature", "ece_before", "ece_after", "nll_before", "nll_after", "bins_before", "bins_after",
                "target_accuracy", "thresholds"):
        assert key in info, key
    assert info["nll_after"] <= info["nll_before"] + 1e-9  # the temperature minimises the validation NLL
    assert len(info["bins_after"]) == 15 and sum(b["count"] for b in info["bins_after"]) == info["val_images"]
    assert 0 < info["thresholds"]["model"] <= 1 and 0 < info["thresholds"]["make"] <= 1
    assert info["thresholds"]["ood"] is not None and (tiny_run / BANK_FILE).is_file()


@pytest.mark.slow
def test_calibrate_command_and_its_bad_input(run, tmp_path):
    (run / CALIBRATION_FILE).unlink()
    result = cli_json("calibrate", "--run", run, "--target-accuracy", "0.9", "--workers", "0")
    assert result["target_accuracy"] == 0.9 and result["temperature"] > 0
    assert json.loads((run / CALIBRATION_FILE).read_text())["thresholds"] == result["thresholds"]
    bad = run_cli("calibrate", "--run", run, "--target-accuracy", "1.5", check=False)
    assert bad.returncode == 2 and "between 0 and 1" in bad.stderr and "Traceback" not in bad.stderr
    empty = tmp_path / "no-best"
    empty.mkdir()
    (empty / "split.csv").write_text("path,label,split\n")
    assert "no best.pt" in cli_error("calibrate", "--run", empty)
    no_val = shutil.copytree(run, tmp_path / "no-val")
    rows = (no_val / "split.csv").read_text().replace(",val\n", ",train\n")
    (no_val / "split.csv").write_text(rows)
    assert "needs a validation split" in cli_error("calibrate", "--run", no_val)


def test_predict_json_has_status_makes_and_calibrated_probabilities(run):
    out = cli_json("predict", EXAMPLE, "--run", run, "--top-k", "3")[0]
    assert out["status"] in STATUSES and set(out["make"]) == {"label", "prob"} and len(out["makes"]) >= 1
    assert out["reason"] and out["ood_signal"] in trust.SIGNAL_WORDS and out["ood_score"] is not None
    labels = json.loads((run / "labels.json").read_text())
    predictor = Predictor.load(run)
    x = predictor.prepare([Image.open(EXAMPLE).convert("RGB")])
    logits = predictor.model(x).detach().numpy()
    expected = softmax(logits, json.loads((run / CALIBRATION_FILE).read_text())["temperature"])[0]
    names = [c["name"] for c in labels]
    for entry in out["top"]:
        assert entry["prob"] == pytest.approx(expected[names.index(entry["label"])], abs=1e-5)
    make_of = {c["name"]: c["make"] for c in labels}
    summed = sum(p for n, p in zip(names, expected) if make_of[n] == out["make"]["label"])
    assert out["make"]["prob"] == pytest.approx(summed, abs=1e-5)  # a make's probability sums its models'


def test_thresholds_decide_the_status(run):
    predictor = Predictor.load(run)
    photo = Image.open(EXAMPLE)
    sure = predictor.predict(photo, cam=False, thresholds={"model": 1e-6, "make": 1e-6, "ood": None})
    assert sure.status == "model"
    make_only = predictor.predict(photo, cam=False, thresholds={"model": 1.0, "make": 1e-6, "ood": None})
    assert make_only.status == "make" and make_only.make[1] >= make_only.top[0][1]
    unsure = predictor.predict(photo, cam=False, thresholds={"model": 1.0, "make": 1.0, "ood": None})
    assert unsure.status == "unsure"
    not_a_car = predictor.predict(photo, cam=False, thresholds={"ood": -1.0})  # every photo is "far" now
    assert not_a_car.status == "no-car"
    # every answer says why, with the numbers it was decided on
    assert not_a_car.reason.startswith("Not a car: ") and f"{not_a_car.ood_score:.2f}" in not_a_car.reason
    assert "-1.00" in not_a_car.reason and not_a_car.ood_signal in trust.SIGNAL_WORDS
    assert trust.SIGNAL_WORDS[not_a_car.ood_signal] in not_a_car.reason
    assert unsure.reason.startswith("Not sure: ") and "under the 100%" in unsure.reason
    assert make_only.reason.startswith("Make only: ") and make_only.make[0] in make_only.reason
    assert sure.reason.startswith(sure.top[0][0]) and f"{sure.top[0][1]:.0%}" in sure.reason


def test_a_damaged_or_missing_statistics_file_costs_the_no_car_status_only(run, caplog):
    info = json.loads((run / CALIBRATION_FILE).read_text())
    assert info["ood_signals"] == ["stem", "layer1", "layer2", "layer3", "energy"] and (run / STATS_FILE).is_file()
    (run / STATS_FILE).write_bytes(b"PK\x03\x04 not an archive")
    damaged = Predictor.load(run)
    assert damaged.calibration.thresholds["ood"] is None and "ignoring" in caplog.text
    (run / STATS_FILE).unlink()  # the bank alone cannot be scored on the combined scale: no no-car either
    result = Predictor.load(run).predict(Image.open(EXAMPLE), cam=False)
    assert result.status != "no-car" and result.ood_score is None
    assert result.top[0][0] == damaged.predict(Image.open(EXAMPLE), cam=False).top[0][0]


@pytest.mark.slow
def test_an_old_run_without_calibration_still_predicts_and_says_so(run):
    (run / CALIBRATION_FILE).unlink()
    (run / BANK_FILE).unlink()
    (run / STATS_FILE).unlink()
    predictor = Predictor.load(run)
    assert not predictor.calibration.calibrated and predictor.calibration.temperature == 1.0
    result = predictor.predict(Image.open(EXAMPLE), cam=False)
    assert result.status in ("model", "make", "unsure") and result.ood_score is None
    proc = run_cli("predict", EXAMPLE, "--run", run, "--json")
    assert "calibrate" in proc.stderr and json.loads(proc.stdout)[0]["status"] in STATUSES


def test_evaluate_reports_trust_figures_and_tta(run):
    plain = cli_json("evaluate", "--run", run, "--workers", "0")
    for key in ("ece", "make_top1", "coverage", "selective_accuracy", "top1", "top5", "num_images"):
        assert key in plain, key
    assert 0 <= plain["ece"] <= 1 and 0 <= plain["coverage"] <= 1 and plain["make_top1"] >= plain["top1"] - 1e-9
    assert sum(plain["status_counts"].values()) == plain["num_images"]
    flipped = cli_json("evaluate", "--run", run, "--workers", "0", "--tta")
    assert flipped["tta"] is True and flipped["num_images"] == plain["num_images"]
    stored = json.loads((run / "test_metrics.json").read_text())
    assert len(stored["reliability_after"]) == 15 and stored["coverage_curve"][0]["coverage"] == 1.0


def test_heatmap_covers_the_whole_photo_with_the_seen_region_outlined(run):
    from carapp.predict import seen_region
    wide = Image.new("RGB", (400, 100), (40, 160, 40))
    predictor = Predictor.load(run)
    cam = predictor.predict(wide).cam
    assert cam.width / cam.height == pytest.approx(4, rel=0.02)  # the whole photo, not the centre crop
    margin = np.asarray(cam)[cam.height // 2, 5]
    assert np.allclose(margin, np.array([40, 160, 40]) * 0.6, atol=3)  # cut-away margins shown, dimmed
    left = round(seen_region(wide.size, predictor.image_size)[0] * cam.width / wide.width)
    assert 0.3 * cam.width < left < 0.5 * cam.width
    column = np.asarray(cam)[:, left - 1:left + 2]
    assert (column == 255).all(axis=2).any()  # the white outline of what the network saw


def test_an_export_carries_the_calibration(run, tmp_path):
    from carapp.export import export_run
    out = export_run(run, "safetensors", tmp_path / "export")
    assert (out / CALIBRATION_FILE).is_file() and (out / BANK_FILE).is_file() and (out / STATS_FILE).is_file()
    photo = Image.open(EXAMPLE)
    a, b = Predictor.load(run).predict(photo, cam=False), Predictor.load(out).predict(photo, cam=False)
    assert a.status == b.status and a.top[0][0] == b.top[0][0]
    assert a.top[0][1] == pytest.approx(b.top[0][1], abs=1e-5) and a.ood_score == pytest.approx(b.ood_score, rel=1e-3)


@pytest.mark.slow
def test_photos_without_a_car_are_not_named_as_cars(demo_root, tmp_path):
    """A model trained a little longer, with outlier exposure on the generated kinds it is given, does not name a car
    in photos of kinds it never saw: the held-out generated kinds, and real photographs shipped with scikit-learn
    and gradio (a Chinese temple, a flower, cheetahs, a lion, a tower)."""
    import importlib.util

    from carapp.dataset.demo import make_no_car_images
    from carapp.dataset.negatives import OE_KINDS
    run = tmp_path / "run"
    cli_json("train", "--data", demo_root, "--run-dir", run, "--epochs", "8", "--patience", "8",
             "--negatives", "generated", *FAST_TRAIN)
    predictor = Predictor.load(run)
    held_out = [k for k in ("texture", "gradient", "fractal") if k not in OE_KINDS]
    others = [predictor.predict(Image.open(p), cam=False).status
              for p in make_no_car_images(tmp_path / "nc", 30, seed=9, kinds=held_out)]
    assert sum(s in ("unsure", "no-car") for s in others) / len(others) >= 0.8, others
    photos = []
    for package, folder in (("sklearn", "datasets/images"), ("gradio", "media_assets/images")):
        where = Path(importlib.util.find_spec(package).origin).parent / folder
        photos += sorted(where.glob("*.jp*g"))
    answers = {p.name: predictor.predict(Image.open(p), cam=False) for p in photos}
    named = {name: a.top[0] for name, a in answers.items() if a.status in ("model", "make")}
    assert len(photos) >= 6 and len(named) <= len(photos) // 4, named
    assert all(a.reason for a in answers.values())
