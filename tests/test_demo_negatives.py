"""make_no_car_images: synthetic "no car" photos for not-a-car checks and outlier exposure."""
from __future__ import annotations

import hashlib

import numpy as np
import pytest
from PIL import Image

from carapp.dataset.demo import IMG_H, IMG_W, NO_CAR_KINDS, make_no_car_images


def _digests(paths):
    return [hashlib.sha256(p.read_bytes()).hexdigest() for p in paths]


@pytest.fixture(scope="module")
def negatives(tmp_path_factory):
    return make_no_car_images(tmp_path_factory.mktemp("neg"), count=15, seed=1)


def test_count_names_and_kinds(negatives):
    assert len(negatives) == 15
    assert all(p.is_file() and p.suffix == ".jpg" for p in negatives)
    kinds = [p.stem.rsplit("_", 1)[0] for p in negatives]
    assert set(kinds) == set(NO_CAR_KINDS)
    assert kinds[:len(NO_CAR_KINDS)] == list(NO_CAR_KINDS)  # round-robin
    assert [p.stem.rsplit("_", 1)[1] for p in negatives] == [f"{k:03d}" for k in range(15)]


def test_images_are_rgb_demo_size(negatives):
    for p in negatives:
        with Image.open(p) as im:
            assert im.format == "JPEG"
            assert im.mode == "RGB"
            assert im.size == (IMG_W, IMG_H)


def test_deterministic_per_seed(negatives, tmp_path):
    again = make_no_car_images(tmp_path / "again", count=15, seed=1)
    assert [p.name for p in again] == [p.name for p in negatives]
    assert _digests(again) == _digests(negatives)
    other = make_no_car_images(tmp_path / "other", count=15, seed=2)
    assert all(a != b for a, b in zip(_digests(other), _digests(negatives)))


def test_images_differ_from_each_other(negatives):
    assert len(set(_digests(negatives))) == len(negatives)
    arrays = [np.asarray(Image.open(p), float) for p in negatives]
    # Not near-duplicates either: every pair differs clearly in pixel values.
    for i in range(len(arrays)):
        for j in range(i + 1, len(arrays)):
            assert np.abs(arrays[i] - arrays[j]).mean() > 5, (negatives[i].name, negatives[j].name)
    # And not all flat: most images have real content.
    assert sum(a.std() > 10 for a in arrays) >= len(arrays) - 3


def test_kinds_subset_and_validation(tmp_path):
    paths = make_no_car_images(tmp_path / "sub", count=4, kinds=("noise", "scene"))
    assert [p.name for p in paths] == ["noise_000.jpg", "scene_001.jpg", "noise_002.jpg", "scene_003.jpg"]
    assert make_no_car_images(tmp_path / "none", count=0) == []
    with pytest.raises(ValueError):
        make_no_car_images(tmp_path / "bad", count=2, kinds=("car",))
    with pytest.raises(ValueError):
        make_no_car_images(tmp_path / "bad", count=2, kinds=())
