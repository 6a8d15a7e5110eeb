"""The one-forward Grad-CAM equals pytorch-grad-cam's GradCAM; the other methods come from the package."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from carapp.cam import gradcam_from_features, head, package_cam, trunk
from carapp.model import build_model
from carapp.predict import Predictor


def _trained_like(backbone: str, classes: int) -> torch.nn.Module:
    torch.manual_seed(0)
    model = build_model(backbone, classes, dropout=0.2)
    with torch.no_grad():  # zero-init leaves blocks as identities; give every weight some structure
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    return model.eval()


@pytest.mark.parametrize("backbone,size", [("resnet18", 64), ("resnet50", 224)])
def test_one_forward_gradcam_equals_the_package(backbone, size):
    model = _trained_like(backbone, 12)
    x = torch.randn(1, 3, size, size)
    with torch.inference_mode():
        features = trunk(model, x)
        logits = head(model, features)
    assert torch.allclose(logits, model(x), atol=1e-5)  # trunk + head is the model
    for target in (0, 5, int(logits.argmax())):
        ours = gradcam_from_features(features, model.fc.weight, [target], (size, size))[0]
        theirs = package_cam(model, x, target, "gradcam")
        assert ours.shape == theirs.shape == (size, size)
        assert np.abs(ours - theirs).max() < 1e-4


@pytest.mark.parametrize("method", ["gradcam", "gradcam++", "eigencam", "layercam"])
def test_predictor_heatmaps(method):
    from PIL import Image
    predictor = Predictor(_trained_like("resnet18", 4), ["a", "b", "c", "d"], {"image_size": 64})
    result = predictor.predict(Image.new("RGB", (90, 60), (10, 200, 30)), top_k=3, cam=True, method=method,
                               target="c")
    assert result.explained == "c" and result.cam.size == (256, 171)  # the whole 90 x 60 photo at display size
    assert len(result.top) == 3
    with pytest.raises(ValueError, match="unknown CAM method"):
        predictor.predict(Image.new("RGB", (64, 64)), method="magic")
