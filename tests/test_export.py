"""Sharing models: safetensors and ONNX exports, the model card, the Hugging Face Hub (offline, from a cache)."""
from __future__ import annotations

import csv
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from carapp.export import export_run, push
from carapp.predict import Predictor
from conftest import ROOT, cli_json

EXAMPLES = sorted((ROOT / "assets" / "examples").glob("*.jpg"))


@pytest.fixture(scope="module")
def exported(tiny_run, tmp_path_factory):
    out = tmp_path_factory.mktemp("exported") / "tiny"
    summary = cli_json("export", "--run", tiny_run, "--format", "safetensors", "--out", out)
    assert summary["files"] == ["README.md", "calibration.json", "config.json", "feature_bank.npz",
                                "feature_stats.npz", "labels.json", "model.safetensors"]
    return out


def test_exported_folder_predicts_exactly_like_the_run(tiny_run, exported):
    run, export = Predictor.load(tiny_run), Predictor.load(exported)
    assert not export.model.training and export.labels == run.labels
    photos = [Image.open(p) for p in EXAMPLES]
    for a, b in zip(run.predict_many(photos, cam=False), export.predict_many(photos, cam=False)):
        assert [label for label, _ in a.top] == [label for label, _ in b.top]
        assert np.allclose([p for _, p in a.top], [p for _, p in b.top], atol=1e-6)


def test_model_card_and_config(tiny_run, exported):
    card = (exported / "README.md").read_text()
    test = json.loads((tiny_run / "test_metrics.json").read_text())
    labels = json.loads((exported / "labels.json").read_text())
    assert card.startswith("---\n") and "pipeline_tag: image-classification" in card
    assert f"{test['top1']:.4f}" in card and f"{len(labels)} classes" in card
    for section in ("## Classes", "## Training data", "## Recipe", "## Metrics", "## Intended use", "## Limitations"):
        assert section in card
    assert labels[0]["name"] in card and "| lr | 0.001 |" in card
    # metadata the Hub reads (huggingface_hub's ModelCardData), the run's own split, no placeholder link
    from huggingface_hub import ModelCard
    meta = ModelCard(card).data.to_dict()
    results = meta["model-index"][0]["results"][0]
    assert results["dataset"]["split"] == "test" and results["metrics"][0]["value"] == pytest.approx(test["top1"])
    split = [r["split"] for r in csv.DictReader(open(tiny_run / "split.csv"))]
    assert f"train {split.count('train')} / val {split.count('val')} / test {split.count('test')}" in card
    assert "70/15/15" not in card and "github.com" not in card and "Calibrated on the validation split" in card
    config = json.loads((exported / "config.json").read_text())
    assert config["preprocessing"]["center_crop"] == 32 and config["preprocessing"]["mean"][0] == 0.485


@pytest.mark.slow
def test_onnx_logits_match_torch(tiny_run, tmp_path):
    import onnxruntime as ort
    out = export_run(tiny_run, "onnx", tmp_path / "onnx")
    session = ort.InferenceSession(str(out / "model.onnx"), providers=["CPUExecutionProvider"])
    predictor = Predictor.load(tiny_run)
    x = predictor.prepare([Image.open(p) for p in EXAMPLES[:3]])  # a batch of 3: the batch axis is dynamic
    (logits,) = session.run(["logits"], {"image": x.numpy()})
    with torch.inference_mode():
        expected = predictor.model(x).numpy()
    assert logits.shape == expected.shape == (3, len(predictor.labels))
    assert np.abs(logits - expected).max() < 1e-4
    config = json.loads((out / "config.json").read_text())
    assert config["weights"] == "onnx" and config["preprocessing"]["resize_short_side"] == 37


def _fill_hub_cache(cache, repo: str, folder, commit: str = "0123456789abcdef0123456789abcdef01234567"):
    """The Hugging Face cache layout: models--owner--name/{refs/main, snapshots/<commit>/...}."""
    base = cache / f"models--{repo.replace('/', '--')}"
    shutil.copytree(folder, base / "snapshots" / commit)
    (base / "refs").mkdir(parents=True)
    (base / "refs" / "main").write_text(commit)


@pytest.mark.slow
def test_hub_model_from_an_offline_cache(exported, tmp_path):
    _fill_hub_cache(tmp_path / "hub", "carfan/tiny-cars", exported)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HUB_CACHE": str(tmp_path / "hub")}
    out = cli_json("predict", EXAMPLES[0], "--run", "hf://carfan/tiny-cars", env=env)
    labels = [c["name"] for c in json.loads((exported / "labels.json").read_text())]
    assert out[0]["top"][0]["label"] in labels
    proc = subprocess.run([sys.executable, "-m", "carapp", "predict", str(EXAMPLES[0]), "--run",
                           "hf://carfan/not-cached@v2"], cwd=ROOT, env=env, capture_output=True, text=True)
    assert proc.returncode == 2 and "not in the local Hugging Face cache and HF_HUB_OFFLINE is set" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_push_exports_and_uploads(tiny_run, monkeypatch):
    calls = {}

    class FakeApi:
        def __init__(self, token=None):
            calls["token"] = token

        def create_repo(self, repo, private=False, exist_ok=False):
            calls["repo"] = (repo, private, exist_ok)
            return f"https://huggingface.co/{repo}"

        def upload_folder(self, repo_id, folder_path, commit_message):
            calls["files"] = sorted(os.listdir(folder_path))
            calls["card"] = open(os.path.join(folder_path, "README.md")).read()
    import huggingface_hub
    monkeypatch.setattr(huggingface_hub, "HfApi", FakeApi)
    monkeypatch.setenv("HF_TOKEN", "hf_test_token")
    url = push(tiny_run, "carfan/tiny-cars", private=True)
    assert url == "https://huggingface.co/carfan/tiny-cars"
    assert calls["token"] == "hf_test_token" and calls["repo"] == ("carfan/tiny-cars", True, True)
    assert calls["files"] == ["README.md", "calibration.json", "config.json", "feature_bank.npz",
                              "feature_stats.npz", "labels.json", "model.safetensors"]
    assert 'Predictor.load("hf://carfan/tiny-cars")' in calls["card"]


@pytest.mark.slow
def test_predict_and_analyze_take_an_onnx_export(tiny_run, tmp_path):
    """`predict --run exported/demo-onnx` was refused though the README says an exported folder works."""

    out = export_run(tiny_run, "onnx", tmp_path / "onnx")
    torch_answers = cli_json("predict", *EXAMPLES[:3], "--run", tiny_run)
    onnx_answers = cli_json("predict", *EXAMPLES[:3], "--run", out, "--cam", tmp_path / "cams")
    for a, b in zip(torch_answers, onnx_answers):
        assert (a["status"], a["top"][0]["label"]) == (b["status"], b["top"][0]["label"])
        assert abs(a["top"][0]["prob"] - b["top"][0]["prob"]) < 1e-4
        assert b["ood_score"] is not None and abs(a["ood_score"] - b["ood_score"]) < 1e-4  # "not a car" travels too
        assert "cam" not in b  # no heatmap from ONNX Runtime
    assert "ONNX Runtime" in Predictor.load(out).describe()
    photos = tmp_path / "photos"
    photos.mkdir()
    for p in EXAMPLES[:3]:
        shutil.copy(p, photos)
    exports = set(Path(os.environ["CARAPP_CACHE"]).glob("engines/model-*.onnx"))
    result = cli_json("analyze", photos, "--run", out, "--out", tmp_path / "analysis", "--workers", "0")
    assert result["images"] == 3
    assert set(Path(os.environ["CARAPP_CACHE"]).glob("engines/model-*.onnx")) == exports  # its own file serves
