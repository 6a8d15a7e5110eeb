"""Batch inference on a real local Ray (Ray Data): the same rows as analyze, each photo once, whether Ray reads
the files itself (bytes) or carapp gathers them (folders, zips, lists), per photo and per car; summary.csv and
report.html as analyze makes them."""
from __future__ import annotations

import csv
import shutil
import zipfile

import pytest
from conftest import cli_json

ray = pytest.importorskip("ray")
pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def local_ray():
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, logging_level="WARNING")
    yield ray
    ray.shutdown()


@pytest.fixture(scope="module")
def photos(demo_root, tmp_path_factory):
    """Two cities of demo photos, a broken one, and a zip of three more."""
    root = tmp_path_factory.mktemp("ray") / "photos"
    for i, path in enumerate(sorted(demo_root.rglob("*.jpg"))[:30]):
        target = root / ("north" if i % 2 else "south") / f"{i:02d}.jpg"
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(path, target)
    (root / "south" / "broken.jpg").write_text("not a jpeg")
    archive = root.parent / "more.zip"
    with zipfile.ZipFile(archive, "w") as z:
        for i, path in enumerate(sorted(demo_root.rglob("*.jpg"))[30:33]):
            z.write(path, f"east/{i}.jpg")
    return root, archive


def _rows(path):
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def _same_rows(ours: list[dict], theirs: list[dict]) -> None:
    """The same photos, each once, with the same answers (numbers to 1e-4: float32 sums differ a little with the
    batch a photo is in)."""
    key = lambda r: (r["path"], r.get("car", ""))  # noqa: E731
    ours, theirs = sorted(ours, key=key), sorted(theirs, key=key)
    assert [key(r) for r in ours] == [key(r) for r in theirs]
    assert len({r["path"] for r in theirs}) == len({key(r) for r in theirs if r.get("car") in (None, "", "0")})
    for a, b in zip(ours, theirs):
        assert set(a) == set(b)
        for column in a:
            try:
                assert float(a[column]) == pytest.approx(float(b[column]), abs=1e-4), column
            except ValueError:
                assert a[column] == b[column], column


def test_ray_reproduces_analyze(local_ray, photos, tiny_run, tmp_path):
    from carapp.analysis.summarize import prediction_files, read_rows
    root, archive = photos
    analyzed = cli_json("analyze", root, archive, "--run", tiny_run, "--out", tmp_path / "a", "--engine", "torch",
                        "--workers", "0")
    on_ray = cli_json("analyze-ray", root, archive, "--run", tiny_run, "--out", tmp_path / "r", "--engine", "torch",
                      "--concurrency", "2", "--batch-size", "4")
    assert on_ray["images"] == analyzed["images"] == 34 and on_ray["repeated_rows_skipped"] == 0
    _same_rows(_rows(tmp_path / "a" / "predictions.csv"),
               list(read_rows(prediction_files([str(tmp_path / "r" / "predictions")]))))
    for name in ("summary.csv", "report.html"):
        assert (tmp_path / "r" / name).read_bytes() == (tmp_path / "a" / name).read_bytes(), name


def test_ray_reading_bytes_itself_gives_analyze_rows_per_car(local_ray, photos, tiny_run, detector_run, tmp_path):
    from carapp.analysis.batch import BatchPredictor, actor_resources
    from carapp.analysis.summarize import prediction_files, read_rows
    root, _ = photos
    cli_json("analyze", root, "--run", tiny_run, "--detector", detector_run, "--out", tmp_path / "a",
             "--engine", "torch", "--workers", "0")
    ds = ray.data.read_binary_files(str(root), include_paths=True)
    ds.map_batches(BatchPredictor, fn_constructor_kwargs={"run": str(tiny_run), "detector": str(detector_run),
                                                          "engine": "torch", "root": str(root), "device": "cpu"},
                   compute=ray.data.ActorPoolStrategy(size=2), batch_size=5, batch_format="pandas",
                   **actor_resources(2, 0)).write_parquet(str(tmp_path / "pq"))
    theirs = list(read_rows(prediction_files([str(tmp_path / "pq")])))
    for row in theirs:  # Ray names a local file without its leading slash
        row["path"] = "/" + row["path"].lstrip("/")
    _same_rows(_rows(tmp_path / "a" / "predictions.csv"), theirs)
    summary = cli_json("summarize", tmp_path / "pq", "--out", tmp_path / "s")
    assert summary["cars"] == sum(1 for r in theirs if r["x1"] != "")
