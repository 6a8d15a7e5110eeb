"""Dataset health on data the tests make: injected duplicates of each kind are found, the leak list matches a run's
split, grouped splits keep groups together, exclusion lists leave photos out of new runs."""
from __future__ import annotations

import csv
import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
from conftest import cli_error, cli_json
from PIL import Image

from carapp import rundir
from carapp.config import make_config
from carapp.dataset import health
from carapp.dataset.index import index_dataset
from carapp.dataset.split import make_split, stratified_split
from carapp.exclusions import mark, read_exclusions
from carapp.training.train import make_run_split


def _images(root: Path) -> list[Path]:
    return sorted((root / "data" / "image").rglob("*.jpg"))


@pytest.fixture(scope="module")
def sick(demo_root, tmp_path_factory) -> dict:
    """The small demo set plus one injected case of every problem health looks for; returns root and the cases."""
    root = tmp_path_factory.mktemp("sick") / "demo"
    shutil.copytree(demo_root, root)
    images = _images(root)
    src, other = images[0], images[-1]           # first and last class differ
    assert src.parent.parent != other.parent.parent
    rel = lambda p: p.relative_to(root).as_posix()
    img = Image.open(src).convert("RGB")
    w, h = img.size
    cases = {"original": rel(src)}
    shutil.copy(src, src.with_name("copy_exact.jpg"))
    img.resize((w * 2, h * 2), Image.BICUBIC).save(src.with_name("copy_resized.jpg"), quality=92)
    img.save(src.with_name("copy_recompressed.jpg"), quality=35)
    img.crop((round(w * .04), round(h * .04), round(w * .96), round(h * .96))).save(src.with_name("copy_cropped.jpg"))
    conflict = other.with_name("copy_in_other_class.jpg")
    shutil.copy(src, conflict)
    cases["copies"] = [rel(src.with_name(n)) for n in ("copy_exact.jpg", "copy_resized.jpg", "copy_recompressed.jpg",
                                                       "copy_cropped.jpg")] + [rel(conflict)]
    d = other.parent
    (d / "text.jpg").write_text("not a photo")
    (d / "empty.jpg").write_bytes(b"")
    Image.new("RGB", (40, 30), (200, 10, 10)).save(d / "tiny.jpg")
    Image.fromarray(np.random.default_rng(1).integers(0, 255, (120, 520, 3), np.uint8)).save(d / "wide.jpg")
    Image.fromarray(np.random.default_rng(2).integers(0, 255, (70, 90), np.uint8)).save(d / "grey.jpg")
    cases |= {"text": rel(d / "text.jpg"), "empty": rel(d / "empty.jpg"), "tiny": rel(d / "tiny.jpg"),
              "wide": rel(d / "wide.jpg"), "grey": rel(d / "grey.jpg")}
    label = root / "data" / "label" / other.relative_to(root / "data" / "image").with_suffix(".txt")
    label.write_text("1\n1\n5 5 900 700\n")      # a box far outside its 128 x 96 photo
    cases["box"] = rel(other)
    cases["root"] = root
    return cases


@pytest.fixture(scope="module")
def report(sick, tmp_path_factory) -> dict:
    # module fixtures start before the autouse cache fixture: name the tests' cache here
    env = {**os.environ, "CARAPP_CACHE": str(tmp_path_factory.getbasetemp() / "cache")}
    return cli_json("health", "--data", sick["root"], env=env)


def test_every_kind_of_injected_duplicate_is_found(report, sick):
    assert report["exact_duplicates"] == [sorted([sick["original"], sick["copies"][0], sick["copies"][4]])]
    near = [g for g in report["near_duplicates"] if sick["original"] in g]
    assert near == [sorted([sick["original"], *sick["copies"]])]  # resized, recompressed, cropped, other class
    # nothing else in the demo set is called a copy: pHash alone pairs two drawings of one layout, colours do not
    assert report["counts"]["near_duplicates"] == 1
    assert report["label_conflicts"][0]["paths"] == sorted([sick["original"], *sick["copies"]])
    assert len(report["label_conflicts"][0]["classes"]) == 2


def test_problem_files_are_reported_not_fatal(report, sick):
    reasons = {u["path"]: u["reason"] for u in report["unreadable"]}
    assert reasons == {sick["text"]: "text.jpg: not an image file (or a format Pillow cannot read)",
                       sick["empty"]: "empty.jpg: empty file (0 bytes)"}
    assert report["tiny"] == [sick["tiny"]]
    assert report["extreme_aspect"] == [sick["wide"]]
    assert report["grayscale"] == [sick["grey"]]
    assert [b["path"] for b in report["bbox_outside"]] == [sick["box"]]
    assert report["counts"]["unreadable"] == 2 and report["num_images"] == len(_images(sick["root"]))


def test_second_pass_reads_the_cache_and_sees_a_changed_file(sick, report, monkeypatch):
    """...and writes nothing beside the dataset (it may be on a read-only disk): the cache is the user's."""
    tree = lambda: sorted(p for p in Path(sick["root"]).rglob("*"))
    before = tree()
    calls = []
    real = health.file_facts
    monkeypatch.setattr(health, "file_facts", lambda p: calls.append(p) or real(p))
    again = health.check_health(str(sick["root"]), workers=1)
    assert calls == [] and again["exact_duplicates"] == report["exact_duplicates"]
    grey = Path(sick["root"]) / sick["grey"]
    Image.new("RGB", (90, 80), (0, 90, 200)).save(grey)  # now a colour photo: its facts are read anew
    again = health.check_health(str(sick["root"]), workers=1)
    assert [Path(p).name for p in calls] == ["grey.jpg"] and again["grayscale"] == []
    Image.fromarray(np.random.default_rng(2).integers(0, 255, (70, 90), np.uint8)).save(grey)  # grey again
    health.check_health(str(sick["root"]), workers=1)
    assert tree() == before


def test_hashes_in_worker_processes_equal_hashes_in_process(sick, monkeypatch, tmp_path):
    index = index_dataset(sick["root"])
    serial = health.collect_facts(index, workers=1)
    monkeypatch.setenv("CARAPP_CACHE", str(tmp_path))  # an empty cache: everything hashed again
    monkeypatch.setattr(health, "PARALLEL_FROM", 1)
    parallel = health.collect_facts(index, workers=2)
    assert parallel == serial


def test_near_pairs_finds_exactly_the_pairs_within_the_threshold():
    rng = np.random.default_rng(0)
    base = rng.integers(0, 2 ** 63, 300, dtype=np.int64).view(np.uint64)
    flips = np.array([sum(1 << int(b) for b in rng.choice(64, k, replace=False)) for k in range(1, 9)], np.uint64)
    hashes = np.concatenate([base, base[:8] ^ flips])   # copy k of hash k differs in k+1 bits
    found = {tuple(p) for p in health.near_pairs(hashes, 6)}
    brute = {(i, j) for i in range(len(hashes)) for j in range(i + 1, len(hashes))
             if bin(int(hashes[i]) ^ int(hashes[j])).count("1") <= 6}
    assert found == brute and {(k, 300 + k) for k in range(6)} <= found and (6, 306) not in found


def _run_with_split(run: Path, index, split_of: dict[str, str]) -> None:
    split = make_split(index, min_images=0)
    split.splits = [split_of.get(p, s) for p, s in zip(split.paths, split.splits)]
    run.mkdir(parents=True)
    rundir.write_split(run, split)
    rundir.write_json(run / "config.json", {"data": str(index.root)})


def test_leaks_list_the_groups_a_run_split(sick, tmp_path):
    index = index_dataset(sick["root"])
    group = sorted([sick["original"], *sick["copies"]])
    run = tmp_path / "leaky"
    _run_with_split(run, index, {p: "train" for p in group} | {sick["copies"][1]: "test"})
    report = cli_json("health", "--data", sick["root"], "--run", run)
    with open(run / "split.csv", newline="") as f:
        split_of = {r["path"]: r["split"] for r in csv.DictReader(f)}
    assert report["leaks"] == [{"paths": group, "splits": [split_of[p] for p in group]}]
    tidy = tmp_path / "tidy"
    _run_with_split(tidy, index, {p: "train" for p in group})
    assert cli_json("health", "--data", sick["root"], "--run", tidy)["leaks"] == []


def test_a_run_of_another_dataset_is_refused_clearly(sick, tmp_path):
    run = tmp_path / "elsewhere"
    run.mkdir()
    (run / "split.csv").write_text("path,label,split\nother/a.jpg,0,train\nother/b.jpg,0,test\n")
    (run / "config.json").write_text(json.dumps({"data": "/somewhere/else"}))
    assert "was trained on another dataset (/somewhere/else)" in cli_error("health", "--data", sick["root"], "--run",
                                                                           run)


def _split_before_groups(labels, seed):
    """The split as carapp made it before groups existed: runs and published figures rely on it."""
    rng, labels, out = np.random.default_rng(seed), np.asarray(labels), np.full(len(labels), "train", dtype=object)
    for c in np.unique(labels):
        idx = rng.permutation(np.flatnonzero(labels == c))
        if len(idx) >= 3:
            n_val, n_test = max(1, round(.15 * len(idx))), max(1, round(.15 * len(idx)))
            out[idx[:n_val]], out[idx[n_val:n_val + n_test]] = "val", "test"
    return out.tolist()


def test_grouped_split_keeps_groups_whole_and_plain_split_is_unchanged():
    labels = [c for c in range(4) for _ in range(20)] + [4, 4] + [5] * 7
    for seed in range(3):
        assert stratified_split(labels, seed=seed) == _split_before_groups(labels, seed)
    groups = [[0, 1, 2, 3], [20, 21], [40, 41, 42], [5, 25]]   # the last one spans two classes
    for seed in range(10):
        split = stratified_split(labels, seed=seed, groups=groups)
        assert all(len({split[i] for i in g}) == 1 for g in groups)
        for c in range(4):
            mine = split[c * 20:(c + 1) * 20]
            assert mine.count("val") >= 2 and mine.count("test") >= 2 and mine.count("train") >= 12


def test_new_run_split_groups_duplicates_and_leaves_out_marked_photos(sick, tmp_path):
    marks = tmp_path / "exclusions.csv"
    mark(marks, sick["wide"], "not a car")
    mark(marks, sick["tiny"], "exclude")
    mark(marks, sick["grey"], "wrong label")
    mark(marks, sick["grey"], "keep")                    # unmarked again
    assert read_exclusions(marks) == {sick["wide"]: "not a car", sick["tiny"]: "exclude"}
    with pytest.raises(ValueError, match="inside the dataset"):
        mark(marks, "/etc/passwd", "exclude")
    cfg = make_config("demo", data=str(sick["root"]), min_images=0, group_duplicates=True, exclude=str(marks))
    split, recorded = make_run_split(cfg)
    assert sick["wide"] not in split.paths and sick["tiny"] not in split.paths
    assert recorded["excluded"] == [{"path": sick["tiny"], "reason": "exclude"},
                                    {"path": sick["wide"], "reason": "not a car"}]
    where = dict(zip(split.paths, split.splits))
    group = [sick["original"], *sick["copies"]]
    assert len({where[p] for p in group}) == 1 and recorded["duplicate_groups"] >= 1
    with pytest.raises(FileNotFoundError, match="exclusion list not found"):
        make_run_split(make_config("demo", data=str(sick["root"]), exclude=str(tmp_path / "missing.csv")))


def test_file_facts_of_a_decompression_bomb_is_a_reason_not_a_crash(tmp_path):
    from test_hardening_images import make_bomb
    make_bomb(tmp_path / "bomb.png")
    assert health.file_facts(str(tmp_path / "bomb.png")) == {
        "error": "bomb.png: image too large to decode safely (over 80,000,000 pixels)"}


def test_label_suspects_are_the_flipped_labels():
    from carapp.evaluation.evaluate import label_suspects
    rng = np.random.default_rng(0)
    truth = np.repeat(np.arange(5), 40)
    sure = rng.uniform(0.4, 0.9, len(truth))             # a model that mostly knows the true classes
    flipped = [3, 50, 97, 140, 188]
    sure[flipped] = 0.95                                 # and is sure of these photos' true class
    probs = rng.dirichlet(np.ones(5), len(truth)) * (1 - sure)[:, None]
    probs[np.arange(len(truth)), truth] += sure
    labels = truth.copy()
    labels[flipped] = (truth[flipped] + 1) % 5           # five wrong labels
    assert sorted(label_suspects(probs, labels)) == flipped


@pytest.mark.slow
def test_train_with_group_duplicates_and_exclude_records_both(sick, tmp_path):
    from conftest import FAST_TRAIN
    marks = tmp_path / "marks.csv"
    mark(marks, sick["wide"], "not a car")
    run = tmp_path / "run"
    cli_json("train", "--data", sick["root"], "--run-dir", run, "--epochs", "1", "--steps-per-epoch", "1",
             "--min-images", "0", "--group-duplicates", "--exclude", marks, *FAST_TRAIN)
    config = json.loads((run / "config.json").read_text())
    assert config["group_duplicates"] is True and config["exclude"] == str(marks)
    assert config["excluded"] == [{"path": sick["wide"], "reason": "not a car"}] and config["duplicate_groups"] >= 1
    with open(run / "split.csv", newline="") as f:
        where = {r["path"]: r["split"] for r in csv.DictReader(f)}
    assert sick["wide"] not in where and len({where[p] for p in [sick["original"], *sick["copies"]]}) == 1
    cli_json("train", "--resume", run, "--epochs", "2")  # what the first start recorded stays
    assert json.loads((run / "config.json").read_text())["excluded"] == config["excluded"]
