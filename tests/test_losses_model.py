"""Focal loss against its formula, and the model against torchvision's ResNet-50."""
from __future__ import annotations

import math
import time

import pytest
import torch
import torch.nn.functional as F
import torchvision

from carapp.losses import FocalLoss, class_alpha, focal_loss
from carapp.model import DropoutLinear, build_model


def test_focal_loss_matches_textbook_formula():
    logits = torch.tensor([[2.0, 0.5, -1.0], [0.1, 0.2, 0.3]])
    targets = torch.tensor([0, 2])
    alpha = torch.tensor([0.5, 1.0, 2.0])
    expected = []
    for row, t in zip(logits.tolist(), targets.tolist()):
        p_t = math.exp(row[t]) / sum(math.exp(v) for v in row)
        expected.append(-alpha[t].item() * (1 - p_t) ** 2 * math.log(p_t))
    got = focal_loss(logits, targets, alpha, gamma=2.0, reduction="none")
    assert torch.allclose(got, torch.tensor(expected), atol=1e-6)
    assert focal_loss(logits, targets, alpha).item() == pytest.approx(sum(expected) / 2, abs=1e-6)
    assert FocalLoss(alpha, 2.0)(logits, targets).item() == pytest.approx(sum(expected) / 2, abs=1e-6)


def test_focal_loss_is_cross_entropy_at_gamma_zero():
    torch.manual_seed(0)
    logits, targets = torch.randn(16, 10), torch.randint(0, 10, (16,))
    assert torch.allclose(focal_loss(logits, targets, gamma=0.0), F.cross_entropy(logits, targets), atol=1e-6)
    w = torch.rand(10)
    weighted = (F.cross_entropy(logits, targets, reduction="none") * w[targets]).mean()
    assert torch.allclose(focal_loss(logits, targets, alpha=w, gamma=0.0), weighted, atol=1e-6)


def test_focal_loss_down_weights_easy_examples():
    easy = focal_loss(torch.tensor([[5.0, 0.0]]), torch.tensor([0]))
    hard = focal_loss(torch.tensor([[0.0, 5.0]]), torch.tensor([0]))
    ce_easy = F.cross_entropy(torch.tensor([[5.0, 0.0]]), torch.tensor([0]))
    assert easy < ce_easy / 100 and hard > easy * 1000


def test_class_alpha_inverse_and_effective():
    a = class_alpha([100, 10, 1], "inverse")
    assert a.mean().item() == pytest.approx(1.0) and a[2] / a[0] == pytest.approx(100.0)
    e = class_alpha([100, 10, 1], "effective")
    assert e.mean().item() == pytest.approx(1.0) and e[0] < e[1] < e[2]
    assert class_alpha([1, 2], "none") is None


def test_resnet50_trunk_keys_match_torchvision():
    ours = build_model("resnet50", num_classes=927, dropout=0.2)
    ref = torchvision.models.resnet50(weights=None)
    assert list(ours.state_dict().keys()) == list(ref.state_dict().keys())
    trunk = {k: v for k, v in ref.state_dict().items() if not k.startswith("fc.")}
    assert all(ours.state_dict()[k].shape == v.shape for k, v in trunk.items())
    assert isinstance(ours.fc, DropoutLinear) and ours.fc.dropout.p == 0.2
    assert ours.fc.weight.shape == (927, 2048)
    assert [len(getattr(ours, f"layer{i}")) for i in range(1, 5)] == [3, 4, 6, 3]
    ours.eval()
    assert ours(torch.randn(1, 3, 224, 224)).shape == (1, 927)
    assert ours.layer1(torch.randn(1, 64, 56, 56)).shape == (1, 256, 56, 56)  # no downsampling in stage 2


def test_torchvision_weights_file_loads(tmp_path):
    ref = torchvision.models.resnet18(weights=None)
    torch.save(ref.state_dict(), tmp_path / "r18.pth")
    ours = build_model("resnet18", num_classes=5, weights=str(tmp_path / "r18.pth"))
    assert torch.equal(ours.conv1.weight, ref.conv1.weight)
    assert ours.fc.weight.shape == (5, 512)


def test_offline_imagenet_warns_and_trains_from_scratch(tmp_path, monkeypatch, caplog):
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path / "hub"))
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "hub"))
    monkeypatch.setenv("HTTPS_PROXY", "http://127.0.0.1:9")  # no network, for sure, and fast to fail
    started = time.time()
    model = build_model("resnet18", num_classes=3, weights="imagenet")
    assert time.time() - started < 30
    assert model.fc.weight.shape == (3, 512)
    assert any("training from scratch" in r.message for r in caplog.records)


def test_focal_loss_with_label_smoothing_matches_a_hand_computation():
    """FL = -alpha_t * sum_k q_k (1 - p_k)^gamma log p_k with q = (1 - e) one_hot + e / K, worked by hand."""
    import math
    logits, target, e, gamma = [2.0, 0.5, -1.0], 0, 0.3, 2.0
    z = sum(math.exp(v) for v in logits)
    p = [math.exp(v) / z for v in logits]
    q = [(1 - e) * (k == target) + e / 3 for k in range(3)]
    expected = -sum(q[k] * (1 - p[k]) ** gamma * math.log(p[k]) for k in range(3)) * 0.5  # alpha_t = 0.5
    got = focal_loss(torch.tensor([logits]), torch.tensor([target]), torch.tensor([0.5, 1.0, 1.5]), gamma=gamma,
                     label_smoothing=e)
    assert got.item() == pytest.approx(expected, abs=1e-6)
    many, targets = torch.randn(6, 5), torch.tensor([0, 1, 2, 3, 4, 0])
    assert torch.allclose(focal_loss(many, targets, gamma=0.0, label_smoothing=0.1),
                          F.cross_entropy(many, targets, label_smoothing=0.1), atol=1e-6)  # PyTorch's at gamma 0
    assert torch.allclose(focal_loss(many, targets, label_smoothing=0.0), focal_loss(many, targets))
