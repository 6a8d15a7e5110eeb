"""The field's benchmarks as the field runs them: a dataset's own train/test lists (--split official) for CompCars
and Stanford Cars (the devkit layout, .mat files written with scipy.io.savemat as MATLAB struct arrays)."""
from __future__ import annotations

import csv
import json
import shutil

import numpy as np
import pytest
from conftest import FAST_TRAIN, cli_error, cli_json
from PIL import Image
from scipy.io import savemat

from carapp.dataset.index import DatasetError, index_dataset
from carapp.dataset.split import official_split


def _read_split(run) -> dict[str, str]:
    with open(run / "split.csv", newline="") as f:
        return {row["path"]: row["split"] for row in csv.DictReader(f)}


@pytest.fixture(scope="module")
def compcars(demo_root, tmp_path_factory):
    """The demo set (CompCars layout) with classification lists: 3 photos of 4 classes to train, 2 to test (one
    class has none there), and a listed photo that is not on disk."""
    root = tmp_path_factory.mktemp("official") / "compcars"
    shutil.copytree(demo_root, root)
    image = root / "data" / "image"
    by_class: dict[str, list[str]] = {}
    for path in sorted(image.rglob("*.jpg")):
        by_class.setdefault(path.parent.parent.name, []).append(path.relative_to(image).as_posix())
    classes = sorted(by_class)[:4]
    train = [p for c in classes for p in by_class[c][:3]] + ["1/999/2099/missing.jpg"]
    test = [p for c in classes[:3] for p in by_class[c][3:5]]
    lists = root / "data" / "train_test_split" / "classification"
    lists.mkdir(parents=True)
    (lists / "train.txt").write_text("\n".join(train) + "\n")
    (lists / "test.txt").write_text("\n".join(test) + "\n")
    return root, train, test, classes


@pytest.mark.slow
def test_train_with_the_official_split_freezes_the_datasets_lists(compcars, tmp_path):
    root, train, test, classes = compcars
    run = tmp_path / "run"
    cli_json("train", "--data", root, "--run-dir", run, "--split", "official", "--epochs", "1", *FAST_TRAIN)
    split = _read_split(run)
    listed_train = {f"data/image/{p}" for p in train if "missing" not in p}
    assert {p for p, s in split.items() if s in ("train", "val")} == listed_train  # val carved from train
    assert {p for p, s in split.items() if s == "test"} == {f"data/image/{p}" for p in test}
    assert any(s == "val" for s in split.values())
    labels = [c["name"] for c in json.loads((run / "labels.json").read_text())]
    assert len(labels) == len(classes)  # every listed class, no floor(mean) filter
    assert json.loads((run / "config.json").read_text())["split"] == "official"
    figures = cli_json("evaluate", "--run", run)
    assert figures["dataset_split"] == "official" and figures["top1_whole_photo"] == figures["top1"]
    assert 0 <= figures["top1_box_crop"] <= 1 and 0 <= figures["top5_box_crop"] <= 1  # the field's two figures
    assert figures["make_top1"] <= figures["make_top5"] <= 1 and "top5" in figures  # model and make level
    from carapp.export import model_card
    card = model_card(run, json.loads((run / "config.json").read_text()), labels)
    assert "every class of the dataset's own train/test lists" in card
    stats = cli_json("stats", "--data", root, "--split", "official")
    assert stats["split"] == "official" and stats["splits"]["test"] == len(test)
    assert stats["splits"]["train"] + stats["splits"]["val"] == len(listed_train)
    assert stats["official"]["train"]["missing"] == 1 and "missing.jpg" in stats["official"]["train"][
        "missing_examples"][0]
    from carapp.ui import dataset_tab, train_tab
    from carapp.ui.settings import resolve_settings
    summary = dataset_tab.scan(str(root), False, resolve_settings(str(root), None, str(tmp_path)))[0]
    assert f"test **{len(test)}**" in summary and "**Official split**" in summary and "1 listed photos are missing" \
        in summary  # the Dataset tab shows the official sizes
    assert "split" in train_tab.form_fields()  # ... and the Train tab offers the choice


def test_lists_that_name_nothing_or_no_lists_are_refused_by_name(compcars, demo_root, tmp_path):
    root, *_ = compcars
    broken = tmp_path / "broken"
    shutil.copytree(root, broken)
    (broken / "data/train_test_split/classification/test.txt").write_text("9/9/2000/none.jpg\n")
    message = cli_error("stats", "--data", broken, "--split", "official")
    assert "test.txt names 1 photos and none of them" in message
    assert "no official train/test lists" in cli_error("stats", "--data", demo_root, "--split", "official")


def _stanford(root, rows_train, rows_test, names):
    """A Stanford Cars tree in the devkit layout; rows: (file name, class 1-based, box)."""
    (root / "devkit").mkdir(parents=True)
    savemat(root / "devkit" / "cars_meta.mat", {"class_names": np.array([names], dtype=object)})
    fields = ["bbox_x1", "bbox_y1", "bbox_x2", "bbox_y2", "class", "fname"]

    def annotations(rows):
        table = np.zeros((1, len(rows)), dtype=[(f, "O") for f in fields])
        for i, (fname, label, box) in enumerate(rows):
            for f, v in zip(fields, [*box, label, fname]):
                table[0, i][f] = np.array([[v]]) if f != "fname" else np.array([v])
        return {"annotations": table}
    savemat(root / "devkit" / "cars_train_annos.mat", annotations(rows_train))
    savemat(root / "cars_test_annos_withlabels.mat", annotations(rows_test))
    for folder, rows in (("cars_train", rows_train), ("cars_test", rows_test)):
        (root / folder).mkdir()
        for k, (fname, label, _) in enumerate(rows):
            if fname != "00099.jpg":  # listed, not on disk
                Image.new("RGB", (64, 48), (40 * label, 90, 10 * k)).save(root / folder / fname)


def test_stanford_cars_in_the_devkit_layout(tmp_path):
    names = ["AM General Hummer SUV 2000", "Aston Martin V8 Vantage Convertible 2012", "Acura RL Sedan 2012"]
    rows_train = [(f"{k:05d}.jpg", 1 + k % 3, [2, 3, 60, 40]) for k in range(1, 10)] + [("00099.jpg", 1, [1, 1, 5, 5])]
    rows_test = [(f"{k:05d}.jpg", 1 + k % 2, [4, 4, 50, 44]) for k in range(1, 5)]  # class 3: no test photo
    _stanford(tmp_path / "cars", rows_train, rows_test, names)
    index = index_dataset(tmp_path / "cars")
    assert index.format == "stanford" and len(index.paths) == 13
    makes = {c["name"]: c["make"] for c in index.classes.values()}
    assert makes == {names[0]: "AM General", names[1]: "Aston Martin", names[2]: "Acura"}
    assert index.bboxes[index.paths.index("cars_train/00001.jpg")] == [2, 3, 60, 40]  # boxes: --crop-bbox, detector
    split = official_split(index, val_frac=0.3, seed=0)
    roles = dict(zip(split.paths, split.splits))
    assert {p for p, s in roles.items() if s == "test"} == {f"cars_test/{k:05d}.jpg" for k in range(1, 5)}
    assert {p for p, s in roles.items() if s != "test"} == {f"cars_train/{k:05d}.jpg" for k in range(1, 10)}
    assert any(s == "val" for s in roles.values()) and len(split.class_info) == 3
    assert index.official_lists["train"]["missing"] == 1
    with pytest.raises(DatasetError, match="cars_meta.mat"):
        (tmp_path / "cars" / "devkit" / "cars_meta.mat").write_bytes(b"not a mat file")
        index_dataset(tmp_path / "cars", use_cache=False)


@pytest.mark.slow
def test_train_on_stanford_cars_with_its_own_lists(tmp_path):
    names = ["AM General Hummer SUV 2000", "Aston Martin V8 Vantage Convertible 2012", "Acura RL Sedan 2012"]
    rows_train = [(f"{k:05d}.jpg", 1 + k % 3, [2, 3, 60, 40]) for k in range(1, 13)]
    rows_test = [(f"{k:05d}.jpg", 1 + k % 3, [4, 4, 50, 44]) for k in range(1, 7)]
    _stanford(tmp_path / "cars", rows_train, rows_test, names)
    run = tmp_path / "run"
    cli_json("train", "--data", tmp_path / "cars", "--run-dir", run, "--split", "official", "--epochs", "1",
             "--min-images", "100", *FAST_TRAIN)  # no class filter on the official split, whatever --min-images says
    split = _read_split(run)
    assert {p for p, s in split.items() if s == "test"} == {f"cars_test/{k:05d}.jpg" for k in range(1, 7)}
    assert {p for p, s in split.items() if s != "test"} == {f"cars_train/{k:05d}.jpg" for k in range(1, 13)}
    makes = {c["name"]: c["make"] for c in json.loads((run / "labels.json").read_text())}
    assert makes[names[1]] == "Aston Martin" and makes[names[0]] == "AM General"
    figures = cli_json("evaluate", "--run", run)
    assert figures["num_images"] == 6 and "top1_box_crop" in figures


def test_compcars_surveillance_lists(tmp_path):
    base = tmp_path / "cc" / "sv_data"
    base.mkdir(parents=True)
    savemat(base / "sv_make_model_name.mat", {"sv_make_model_name": np.array(
        [["Audi", "A4"], ["BMW", "X5"], ["Kia", "Rio"]], dtype=object)})
    for model in ("1", "2", "3"):
        (base / "image" / model).mkdir(parents=True)
        for k in range(6):
            Image.new("RGB", (40, 30), (int(model) * 60, 20 * k, 90)).save(base / "image" / model / f"{k}.jpg")
    train = [f"{m}/{k}.jpg" for m in "123" for k in range(4)] + ["3/gone.jpg"]
    test = [f"{m}/{k}.jpg" for m in "12" for k in range(4, 6)]  # model 3: no test photo
    (base / "train_surveillance.txt").write_text("\n".join(train) + "\n")
    (base / "test_surveillance.txt").write_text("\n".join(test) + "\n")
    index = index_dataset(tmp_path / "cc")
    assert index.format == "sv" and index.official_lists["train"]["missing"] == 1
    split = official_split(index, val_frac=0.25, seed=1)
    roles = dict(zip(split.paths, split.splits))
    assert {p for p, s in roles.items() if s == "test"} == {f"sv_data/image/{p}" for p in test}
    assert len([s for s in roles.values() if s != "test"]) == 12 and "val" in roles.values()
    assert {c["make"] for c in split.class_info} == {"Audi", "BMW", "Kia"}
