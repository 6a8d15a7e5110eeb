"""Dataset parsing, the floor(mean) class filter, the stratified split, the index cache."""
from __future__ import annotations

import os
import time

import pytest
from conftest import build_compcars, cli_json, write_jpeg
from PIL import Image

from carapp.dataset.images import find_unreadable
from carapp.dataset.index import DatasetError, index_dataset
from carapp.dataset.loader import CarImages, build_transform, collate_skip_bad
from carapp.dataset.split import dataset_stats, kept_classes, make_split, stratified_split

# 4 makes; model 3 has images but an empty name cell, make 4 has an empty name cell, model 5 is an unused id.
MAKES = ["Aurora", "Borealis", "Cirrus", ""]
MODELS = ["Sprint", "Vista", "", "Glide", "", "Nimbus"]
LAYOUT = {  # (make, model): {year: count}; 60 images over 5 classes -> mean 12
    (1, 1): {"2010": 10, "unknown": 10},   # 20
    (1, 2): {"2011": 12},                  # 12: exactly at the threshold, kept
    (2, 3): {"unknown": 11},               # 11: just below, dropped
    (3, 4): {"2012": 9, "2013": 5},        # 14
    (4, 6): {"2014": 3},                   # 3: dropped
}


@pytest.fixture
def compcars(tmp_path):
    return build_compcars(tmp_path / "CompCars", LAYOUT, MAKES, MODELS)


def test_compcars_parsing_names_years_labels(compcars):
    index = index_dataset(compcars)
    assert index.format == "compcars"
    assert len(index.paths) == 60
    counts = index.class_counts()
    assert counts == {"1": 20, "2": 12, "3": 11, "4": 14, "6": 3}  # years merged, 'unknown' included
    assert index.classes["1"]["name"] == "Aurora Sprint"
    assert index.classes["3"]["name"] == "Borealis model 3"       # empty model cell -> generated name
    assert index.classes["6"]["name"] == "Make 4 Nimbus"          # empty make cell -> generated name
    assert all(p.startswith("data/image/") for p in index.paths)  # relative to the root the user gave
    assert set(index.viewpoints) == {1, 2, 3, 4, 5}
    assert index.bboxes[0] == [5, 4, 36, 28]
    assert index.attributes["1"]["door_number"] == 4


def test_data_folder_itself_is_accepted(compcars):
    index = index_dataset(compcars / "data")
    assert index.format == "compcars" and len(index.paths) == 60
    assert index.paths[0].startswith("image/")


def test_floor_mean_filter_keeps_class_at_threshold(compcars):
    keys, threshold = kept_classes(index_dataset(compcars))
    assert threshold == 12                       # floor(60 / 5)
    assert keys == ["1", "2", "4"]               # 12 kept (exactly at), 11 and 3 dropped
    keys_all, _ = kept_classes(index_dataset(compcars), min_images=0)
    assert len(keys_all) == 5
    stats = dataset_stats(index_dataset(compcars))
    assert stats["num_classes"] == 5 and stats["num_classes_kept"] == 3 and stats["num_images_kept"] == 46
    assert sum(stats["splits"].values()) == 46


def test_stratified_split_sizes_per_class():
    labels = [0] * 100 + [1] * 20 + [2] * 7 + [3] * 2
    split = stratified_split(labels, 0.15, 0.15, seed=3)
    def sizes(c):
        return [sum(1 for lab, s in zip(labels, split) if lab == c and s == name) for name in ("train", "val", "test")]
    assert sizes(0) == [70, 15, 15]
    assert sizes(1) == [14, 3, 3]
    assert sizes(2) == [5, 1, 1]                 # every class with >= 3 images reaches val and test
    assert sizes(3) == [2, 0, 0]                 # too small to stratify: train only
    assert split == stratified_split(labels, 0.15, 0.15, seed=3)
    assert split != stratified_split(labels, 0.15, 0.15, seed=4)


def test_corrupt_image_is_reported_and_skipped(compcars):
    bad = compcars / "data/image/1/1/2010/11102010000.jpg"
    bad.write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    index = index_dataset(compcars)
    assert find_unreadable(index) == ["data/image/1/1/2010/11102010000.jpg"]
    split = make_split(index)
    ds = CarImages(str(compcars), split.paths, split.labels, transform=build_transform(32, False), image_size=32)
    batch = collate_skip_bad([ds[i] for i in range(len(ds))])
    assert len(batch.bad) == 1 and split.paths[batch.bad[0]].endswith("11102010000.jpg")
    assert batch.images.shape == (len(ds) - 1, 3, 32, 32)
    stats = cli_json("stats", "--data", compcars, "--verify")
    assert stats["unreadable"]["count"] == 1


def test_verify_counts_what_training_refuses(compcars):
    """A valid 81-megapixel PNG: PIL only warns below twice its limit, so a plain decode calls it readable; the
    loader refuses it as a decompression bomb. `stats --verify` must report what training will skip."""
    big = compcars / "data/image/1/1/2010/11102010000.jpg"
    Image.new("1", (9000, 9000)).save(big, format="PNG")
    assert find_unreadable(index_dataset(compcars)) == ["data/image/1/1/2010/11102010000.jpg"]


def test_index_cache_is_used_and_invalidated(compcars):
    first = index_dataset(compcars)
    t = time.perf_counter()
    again = index_dataset(compcars)
    assert time.perf_counter() - t < 1.0 and again.paths == first.paths
    new = compcars / "data/image/1/2/2011/extra.jpg"
    write_jpeg(new, (1, 2, 3))
    os.utime(new.parent, ns=(time.time_ns() + 10**9,) * 2)  # coarse filesystem clocks: force a newer mtime
    assert len(index_dataset(compcars).paths) == 61


def test_folder_and_sv_formats(tmp_path):
    for cls, n in (("Aurora Sprint", 4), ("Borealis Vista", 3)):
        for k in range(n):
            write_jpeg(tmp_path / "folder" / cls / f"{k}.jpg", (k * 40, 0, 0))
    index = index_dataset(tmp_path / "folder")
    assert index.format == "folder" and index.class_counts() == {"Aurora Sprint": 4, "Borealis Vista": 3}

    import numpy as np
    from scipy.io import savemat
    sv = tmp_path / "sv" / "sv_data"
    for model, n in (("1", 2), ("2", 5)):
        for k in range(n):
            write_jpeg(sv / "image" / model / f"{k}.jpg", (0, k * 40, 0))
    cells = np.empty((2, 3), dtype=object)
    cells[0] = [np.array(["Aurora"]), np.array(["Sprint"]), np.array([[7]])]
    cells[1] = [np.array(["Cirrus"]), np.array(["Glide"]), np.array([[9]])]
    savemat(sv / "sv_make_model_name.mat", {"sv_make_model_name": cells})
    index = index_dataset(tmp_path / "sv")
    assert index.format == "sv"
    assert {c["name"] for c in index.classes.values()} == {"Aurora Sprint", "Cirrus Glide"}


def test_wrong_folder_gets_a_clear_error(tmp_path):
    with pytest.raises(DatasetError, match="not found"):
        index_dataset(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(DatasetError, match="not a dataset"):
        index_dataset(tmp_path / "empty")
    proc = __import__("conftest").run_cli("stats", "--data", tmp_path / "empty", check=False)
    assert proc.returncode == 2 and "not a dataset" in proc.stderr and "Traceback" not in proc.stderr


def test_bbox_crop_uses_label_box(compcars):
    index = index_dataset(compcars)
    path = compcars / index.paths[0]
    Image.new("RGB", (40, 30), (0, 0, 0)).save(path)
    ds = CarImages(str(compcars), [index.paths[0]], [0], [index.bboxes[0]], transform=lambda im: im,
                   crop_bbox=True, image_size=32)
    _, (img, _) = ds[0]
    assert img.size == (32, 25)                  # x 5..36, y 4..28, 1-based inclusive


def test_resized_cache_is_used_with_boxes_scaled(compcars):
    from carapp.dataset.resized import ResizedCache, build_resized_cache
    big = compcars / "data/image/1/1/2010/112010001.jpg"
    Image.new("RGB", (400, 300), (0, 0, 255)).save(big)
    index = index_dataset(compcars)
    summary = build_resized_cache(str(compcars), short_side=30, workers=1)
    assert summary["images"] == 60 and summary["unreadable"] == 0
    assert ResizedCache.find(str(compcars), 64) is None          # too small for 64 px training
    cache = ResizedCache.find(str(compcars), 24)
    rel = "data/image/1/1/2010/112010001.jpg"
    path, scale = cache.lookup(rel)
    width, height = Image.open(path).size
    assert height == 30 and scale == width / 400 and 0.09 < scale < 0.11
    box = index.bboxes[index.paths.index(rel)]                   # 5 4 36 28 in original pixels
    ds = CarImages(str(compcars), [rel], [0], [[50, 40, 360, 280]], transform=lambda im: im, crop_bbox=True,
                   image_size=24, cache=cache)
    _, (img, _) = ds[0]                                          # the box, in the copy's pixels
    assert abs(img.width - 310 * scale) <= 2 and abs(img.height - 240 * scale) <= 2
    assert box == [5, 4, 36, 28]
