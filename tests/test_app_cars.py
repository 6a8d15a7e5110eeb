"""Every car in the app: /predict_cars as gradio_client and a stranger's raw queue calls reach it, the Predict tab's
boxes and car chooser, and an app without a detector saying so."""
from __future__ import annotations

import pytest
from conftest import fn_index_updating, raw_call, raw_upload, serving
from gradio_client import Client, handle_file
from PIL import Image
from test_public_app import photo

from carapp.dataset.scenes import make_demo_scenes
from carapp.detection.model import load_detector
from carapp.predict import Predictor
from carapp.ui import uploads


@pytest.fixture(scope="module")
def scene(tmp_path_factory):
    folder = tmp_path_factory.mktemp("app-scenes")
    records = make_demo_scenes(folder, 4, seed=5)
    return folder / next(r for r in records if len(r["cars"]) >= 2)["image"]


@pytest.fixture(scope="module")
def public_cars(demo_root, tiny_run, eager_detector, tmp_path_factory):
    runs = tmp_path_factory.mktemp("cars-runs")
    with serving(demo_root, tiny_run, runs, public=True, detector=str(eager_detector)) as url:
        yield url


def test_predict_cars_returns_every_car_as_the_cli_does(public_cars, scene, tiny_run, eager_detector):
    expected = Predictor.load(tiny_run).predict(Image.open(scene), cam=False, detector=load_detector(eager_detector))
    assert len(expected.cars) >= 2
    ok, data = raw_call(public_cars, "/predict_cars", [{"path": raw_upload(public_cars, scene)}, None])
    assert ok, data
    entry = data[0]
    assert [c["box"] for c in entry["cars"]] == [c.box for c in expected.cars]  # in the photo's own pixels
    assert [c["top"][0]["label"] for c in entry["cars"]] == [c.top[0][0] for c in expected.cars]
    assert entry["box"] == expected.box and entry["status"] == expected.status
    client = Client(public_cars, verbose=False, analytics_enabled=False)
    same = client.predict(handle_file(str(scene)), api_name="/predict_cars")
    assert [c["box"] for c in same["cars"]] == [c["box"] for c in entry["cars"]] and same["image"] == scene.name
    for forged in ("/etc/passwd", str(scene)):  # a server path, even an existing photo's, is no upload
        assert raw_call(public_cars, "/predict_cars", [{"path": forged}, None]) == (False, uploads.NOT_AN_UPLOAD)
    ok, old = raw_call(public_cars, "/predict", photo(raw_upload(public_cars, scene)))  # /predict's old inputs
    assert ok and old[0]["confidences"]


def test_the_predict_tab_numbers_the_cars_and_keeps_every_cars_answer(public_cars, scene):
    index = fn_index_updating(public_cars, "cars-found", "change")
    upload = {"path": raw_upload(public_cars, scene), "meta": {"_type": "gradio.FileData"}}
    # the page's own event: the photo's inputs, "find every car", and the sliders-moved state (the server keeps it)
    ok, data = raw_call(public_cars, index, [*photo(upload["path"]), True, None])
    assert ok, data
    label, cam, answer, makes, boxes, chooser, views = data
    names = [a["label"] for a in boxes["value"]["annotations"]] if "value" in boxes else \
        [a["label"] for a in boxes["annotations"]]
    assert len(names) >= 2 and [n.split(":")[0] for n in names] == [str(k + 1) for k in range(len(names))]
    assert "Car " in answer and " of " in answer


def test_an_app_without_a_detector_says_so(demo_root, tiny_run, scene, tmp_path):
    with serving(demo_root, tiny_run, tmp_path, public=True) as url:
        ok, message = raw_call(url, "/predict_cars", [{"path": raw_upload(url, scene)}, None])
    assert not ok and "no car detector" in message
