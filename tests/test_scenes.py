"""demo-data --scenes: synthetic multi-car scenes with their true boxes and classes (issue 23's test data)."""
from __future__ import annotations

import json

import numpy as np
import pytest
from conftest import cli_error, cli_json
from PIL import Image

from carapp.dataset.scenes import SCENES_FILE, make_demo_scenes, read_scenes


def test_scenes_hold_several_cars_with_boxes_that_fit_them(tmp_path):
    records = make_demo_scenes(tmp_path, 30, seed=0)
    assert records == read_scenes(tmp_path) and len(records) == 30
    counts = [len(r["cars"]) for r in records]
    assert 0 in counts and max(counts) >= 3 and sum(c >= 2 for c in counts) >= 10
    background_grey = []
    for r in records:
        photo = np.asarray(Image.open(tmp_path / r["image"]).convert("RGB"), float)
        assert photo.shape == (r["height"], r["width"], 3)
        for car in r["cars"]:
            x1, y1, x2, y2 = car["box"]
            assert 0 <= x1 < x2 <= r["width"] and 0 <= y1 < y2 <= r["height"]
            assert car["class"].startswith(car["make"] + " ")
            # the box holds the car: its wheels are near-black; strips just outside the box are not all car
            inside = photo[int(y1):int(np.ceil(y2)), int(x1):int(np.ceil(x2))]
            assert (inside.max(axis=2) < 60).mean() > 0.02, car
        background_grey.append(photo[:20].std())
    assert np.mean(background_grey) > 1.0  # sensor noise and sky gradients: not a flat test card
    widths = [c["box"][2] - c["box"][0] for r in records for c in r["cars"]]
    assert min(widths) < 0.2 * 320 and max(widths) > 0.45 * 320  # small and large cars
    cut = [c for r in records for c in r["cars"] if c["box"][0] == 0 or c["box"][2] == r["width"]
           or c["box"][3] == r["height"]]
    assert cut  # some cars are cut by the frame


def test_scenes_are_reproducible_and_one_scene_does_not_depend_on_the_count(tmp_path):
    a, b = make_demo_scenes(tmp_path / "a", 6, seed=4), make_demo_scenes(tmp_path / "b", 3, seed=4)
    assert a[:3] == b
    assert (tmp_path / "a" / "0002.jpg").read_bytes() == (tmp_path / "b" / "0002.jpg").read_bytes()
    assert make_demo_scenes(tmp_path / "c", 3, seed=5) != b


def test_demo_data_writes_scenes_beside_the_dataset_and_refuses_a_negative_count(tmp_path):
    out = cli_json("demo-data", "--out", tmp_path / "demo", "--scale", "0.05", "--scenes", "4")
    records = json.loads((tmp_path / "demo" / "scenes" / SCENES_FILE).read_text())
    assert out["scenes"] == 4 == len(records) and out["scene_cars"] == sum(len(r["cars"]) for r in records)
    stats = cli_json("stats", "--data", tmp_path / "demo", "--min-images", "0")
    assert stats["format"] == "compcars" and stats["num_images"] == out["num_images"]  # scenes are not training photos
    again = cli_json("demo-data", "--out", tmp_path / "demo", "--scale", "0.05", "--force")
    assert "scenes" not in again and not (tmp_path / "demo" / "scenes").exists()  # --force leaves no stale scenes
    assert "0 or more" in cli_error("demo-data", "--out", tmp_path / "other", "--scenes", "-2")
    with pytest.raises(FileNotFoundError, match="no scenes.json"):
        read_scenes(tmp_path)


def test_the_other_style_puts_cars_of_other_sizes_on_backdrops_no_training_uses(tmp_path):
    road, other = make_demo_scenes(tmp_path / "road", 20, seed=3), make_demo_scenes(tmp_path / "o", 20, seed=3,
                                                                                     style="other")
    widths = {name: [c["box"][2] - c["box"][0] for r in records for c in r["cars"]]
              for name, records in (("road", road), ("other", other))}
    assert min(widths["other"]) < min(widths["road"])  # smaller cars than the road scenes hold
    tops = [c["box"][1] for r in other for c in r["cars"]]
    assert min(tops) < 0.3 * 240  # anywhere in the frame, not only on a road
    with pytest.raises(ValueError, match="style"):
        make_demo_scenes(tmp_path / "x", 1, style="night")
