"""carapp inside a batch engine: a callable class that Ray Data (or Spark) calls with batches of photos and that
returns predictions.csv's columns, and a Ray Data job that runs it over a collection.

    pip install "ray[data]"
    python -m carapp analyze-ray photos/ list.csv --run RUN --out OUT [--detector DET] [--concurrency 4] [--num-gpus 1]
    # OUT/predictions/*.parquet, then OUT/summary.csv and OUT/report.html (as `python -m carapp summarize` makes them)

Ray Data directly, on files it reads itself (the model loads once per actor, in __init__):

    ds = ray.data.read_binary_files("s3://bucket/photos/", include_paths=True)       # columns bytes, path
    rows = ds.map_batches(BatchPredictor, fn_constructor_kwargs={"run": "RUN", "root": "s3://bucket/photos/"},
                          compute=ray.data.ActorPoolStrategy(size=4), num_gpus=1, batch_size=64,
                          batch_format="pandas")
    rows.write_parquet("OUT/predictions")  # then: python -m carapp summarize OUT/predictions --out OUT

Every photo is one input row and gives its rows (a photo, or each of its cars) in the same output batch, so no
photo is counted twice: not by padding (Ray Data does not pad), and `summarize` counts a photo met twice once.
"""
from __future__ import annotations

import io
import logging
import shutil
from pathlib import Path, PurePosixPath

import pandas as pd

from .. import rundir
from .analyze import batch_rows, collate, columns, decode, has_times, identity_of, reading
from .collection import READ_ERRORS, ROOT_GROUP, CollectionError, Item, collect, item_of
from .summary import cell
from .trends import TIME_SOURCES

log = logging.getLogger("carapp")

NUMBERS = ("make_prob", "model_prob", "ood_score", "x1", "y1", "x2", "y2", "det_score")  # float, null when empty
COUNTS = ("car", "cars")                                                                # integer, null when empty
PREDICTIONS = "predictions"  # analyze-ray: the Parquet folder in OUT


class BatchPredictor:
    """Predictions rows for batches of photos: constructed once per worker with a run (or export) and optionally
    a detector, called with a batch whose columns are `path` and optionally `bytes` (the file's contents, as Ray's
    read_binary_files gives them), `group` and `time`. Returns a DataFrame with predictions.csv's columns (numbers
    as numbers, empty cells as nulls). Without a `group` column a photo's group is its first folder under `root`
    (analyze's folder groups), else "(top level)"."""

    def __init__(self, run: str, detector: str | None = None, device: str = "auto", engine: str = "auto",
                 time_source: str = "list", root: str | None = None, batch_size: int = 32, vehicles: bool = False):
        from ..detection.model import load_detector
        from ..engines import (EXPORT_PAYS_OFF, OnnxEngine, TorchEngine, detector_engine, export_shared, pick_engine,
                               shared_onnx_path)
        from ..predict import Predictor
        if time_source not in TIME_SOURCES:
            raise ValueError(f"time_source must be one of {', '.join(TIME_SOURCES)}, not {time_source!r}")
        self.predictor = Predictor.load(run, device=device)
        self.detector = load_detector(detector, vehicles, device)
        self.exif, self.root, self.batch_size = time_source == "exif", root, batch_size
        onnx_file = self.predictor.onnx_file or shared_onnx_path(self.predictor, run)
        # a batch job is large by nature: the ONNX export pays on a CPU
        name = pick_engine(engine, self.predictor.device, EXPORT_PAYS_OFF, onnx_file.is_file())
        if name == "int8":
            raise ValueError("int8 needs calibration photos: use analyze --engine int8, or onnx here")
        detector_engine(self.detector, engine, EXPORT_PAYS_OFF)
        self.run_batch = TorchEngine(self.predictor.model, self.predictor.device) if name == "torch" else \
            OnnxEngine(onnx_file if self.predictor.onnx_file else export_shared(self.predictor, onnx_file))
        self.draft, self.transform = reading(self.predictor.image_size, self.predictor.resize,
                                             photos=self.detector is not None)
        self.archives: dict = {}

    def __call__(self, batch) -> pd.DataFrame:
        frame = batch if isinstance(batch, pd.DataFrame) else pd.DataFrame({k: list(v) for k, v in batch.items()})
        timed = self.exif or "time" in frame
        records = frame.to_dict("records")
        items = [Item(str(r["path"]), cell(r.get("group")) or self._group(str(r["path"])), time=cell(r.get("time")))
                 for r in records]
        decoded = [(i, *self._decode(item, row.get("bytes"))) for i, (item, row) in enumerate(zip(items, records))]
        per_car = self.detector is not None
        layout = columns(per_car, timed)
        rows = batch_rows(self.predictor, self.detector, self.run_batch, items, collate(decoded, photos=per_car),
                          self.batch_size, layout)
        return typed(rows, layout)

    def _decode(self, item: Item, data) -> tuple:
        try:
            source = io.BytesIO(bytes(data)) if data is not None else item_of(item.path).open(self.archives)
            return decode(source, item, self.draft, self.transform, self.exif)
        except READ_ERRORS as exc:
            return None, f"cannot read ({exc})", item.time

    def _group(self, path: str) -> str:
        if not self.root:
            return ROOT_GROUP
        inside = PurePosixPath(path.replace("\\", "/").split("://")[-1]).parts
        root = PurePosixPath(self.root.replace("\\", "/").split("://")[-1].rstrip("/")).parts
        rest = inside[len(root):] if inside[:len(root)] == root else inside
        return rest[0] if len(rest) > 1 else ROOT_GROUP


def typed(rows: list[list], layout: list[str]) -> pd.DataFrame:
    """Rows as a table: text as text, numbers as float64, counts as nullable integers ("" → null)."""
    frame = pd.DataFrame(rows, columns=layout, dtype=object)
    for column in layout:
        values = frame[column].map(lambda v: None if v == "" else v)
        if column in NUMBERS:
            frame[column] = pd.to_numeric(values).astype("float64")
        elif column in COUNTS:
            frame[column] = pd.to_numeric(values).astype("Int64")
        else:
            frame[column] = frame[column].astype(str)
    return frame


def actor_resources(concurrency: int, num_gpus: float) -> dict:
    """What each model replica asks of the cluster. On CPUs, one CPU at most, and together never all of them: the
    tasks that read and write the rows need one, and replicas holding every CPU wait for them forever."""
    import ray
    if num_gpus:
        return {"num_gpus": num_gpus}
    cpus = ray.cluster_resources().get("CPU", 1)
    return {"num_cpus": max(0.1, min(1.0, (cpus - 1) / max(concurrency, 1)))}


def analyze_with_ray(sources: list[str], run: str, out: str | Path, detector: str | None = None,
                     group_by: str = "folder", time_source: str = "list", period: str | None = None,
                     concurrency: int = 2, num_gpus: float = 0, batch_size: int = 32, engine: str = "auto",
                     address: str | None = None, force: bool = False) -> dict:
    """The collection (folders, zips, lists: each photo once, as analyze gathers them) through BatchPredictor on a
    Ray cluster (`address`; none: a local one), into OUT/predictions/*.parquet; then summary.csv and report.html."""
    try:
        import ray
    except ImportError:
        raise CollectionError('analyze-ray needs Ray Data: pip install "ray[data]"') from None
    from ..predict import Predictor
    from .summarize import summarize
    out = Path(out)
    items, skipped = collect(sources, group_by)
    if not items:
        raise CollectionError(f"no images found in {', '.join(sources)} ({skipped} other files skipped)")
    target = out / PREDICTIONS
    if target.exists():
        if not force:
            raise CollectionError(f"{target} exists: choose another --out, or --force to replace it")
        shutil.rmtree(target)
    out.mkdir(parents=True, exist_ok=True)
    predictor = Predictor.load(run, device="cpu")
    timed = has_times(items, time_source)
    rundir.write_json(out / "analysis.json", {"identity": identity_of(run, predictor, detector),
                                              "calibrated": predictor.calibration.calibrated, "engine": "ray"})
    started = not ray.is_initialized()
    if started:
        ray.init(address=address, include_dashboard=False, log_to_driver=False, ignore_reinit_error=True)
    try:
        rows = [{"path": i.path, "group": i.group, **({"time": i.time} if timed else {})} for i in items]
        kwargs = {"run": run, "detector": detector, "engine": engine, "time_source": time_source,
                  "batch_size": batch_size, "device": "cuda" if num_gpus else "cpu"}
        ray.data.from_items(rows).map_batches(
            BatchPredictor, fn_constructor_kwargs=kwargs, compute=ray.data.ActorPoolStrategy(size=concurrency),
            batch_size=batch_size, batch_format="pandas", **actor_resources(concurrency, num_gpus),
        ).write_parquet(str(target))
    finally:
        if started:
            ray.shutdown()
    result = summarize([str(target)], out, period)
    return {**result, "skipped_not_images": skipped}
