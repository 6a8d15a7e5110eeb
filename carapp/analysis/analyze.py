"""Analyse a photo collection: which makes and models appear, how often, per group, with 95% Wilson intervals.

    python -m carapp analyze photos/ more.zip list.txt --run checkpoints/run1 --out analysis/ [--group-by folder]
    torchrun --nproc_per_node=4 -m carapp analyze photos/ --model RUN --out OUT   # a shard each; rank 0 merges

    python -m carapp analyze photos/ --run RUN --detector DET --out OUT   # one row per car (train-detector, coco)
    python -m carapp analyze list.csv --run RUN --out OUT --time exif --period month   # shares over time


OUT gets predictions.csv (one row per image, appended and fsynced per batch), summary.csv, report.html, and
progress.json while it runs. Running again with the same OUT skips the images already there, so a run killed at any
moment (even kill -9) completes with every image exactly once. With a detector, one row per car (CAR_COLUMNS say
which car of how many, its box and the detector's score; a photo without a car: one `no-car` row, empty box); a
photo counts as done once all its rows are written, so a kill between two of its cars repeats that photo whole.
With times (a list's `time` column, or `--time exif`: DateTimeOriginal), a last `time` column; `--period` counts
summary.csv per week, month or quarter too (carapp.analysis.trends).
"""
from __future__ import annotations

import contextlib
import csv
import hashlib
import json
import logging
import os
import shutil
import time
from functools import partial
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset

from .. import rundir, safecsv
from ..dataset.images import ImageError, open_image
from ..dataset.loader import build_transform, ignore_stop_signals, resize_size
from ..car_crops import car_crop, mark_small
from ..engines import (ENGINES, OnnxEngine, TorchEngine, detector_engine, export_shared, pick_engine, quantize,
                       shared_onnx_path)
from ..runtime import init_distributed
from .collection import READ_ERRORS, CollectionError, Item, collect
from .summarize import META, short_summary, write_outputs
from .trends import PERIODS, TIME_SOURCES, exif_time

log = logging.getLogger("carapp")

COLUMNS = ["path", "group", "status", "make", "make_prob", "model", "model_prob", "ood_score", "top5", "reason"]
CAR_COLUMNS = ["car", "cars", "x1", "y1", "x2", "y2", "det_score"]  # with a detector: this car (0, 1, ...) of `cars`
TIME_COLUMN = "time"  # last, when the photos have times: ISO 8601, "" for a photo without one
CALIBRATION_PHOTOS = 64   # photos that set the int8 activation ranges
SHARED_MEMORY_ROOM = 2 << 30  # free /dev/shm under which a photo goes through the pipe instead (handed_over)


class CollectionImages(Dataset):
    """Decoded, eval-transformed images of a collection; an unreadable one yields its reason instead. With
    `photos=True` the decoded photos themselves, at full size: a detector's, whose cars are cropped from them (with
    `shared`, as loader workers hand them over: handed_over)."""

    def __init__(self, items: list[Item], image_size: int, resize: str = "crop", photos: bool = False,
                 shared: bool = False, exif: bool = False):
        self.items, self.exif = items, exif
        self.draft, self.transform = reading(image_size, resize, photos, shared)
        self.archives: dict = {}  # zip files, opened once per worker process

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int):
        item = self.items[i]
        try:
            return (i, *decode(item.open(self.archives), item, self.draft, self.transform, self.exif))
        except READ_ERRORS as exc:  # a vanished file, a broken zip member
            return i, None, f"cannot read ({exc})", item.time


def reading(image_size: int, resize: str, photos: bool, shared: bool = False) -> tuple:
    """How a collection's photos are decoded: (the JPEG draft size, the transform after decoding). The classifier's
    input, or for a detector the whole photo (`shared`: as a loader worker hands it over to the main process)."""
    if photos:
        return None, handed_over if shared else whole_photo
    return resize_size(image_size), build_transform(image_size, False, resize=resize)


def whole_photo(photo: Image.Image) -> Image.Image:
    return photo


def handed_over(photo: Image.Image) -> torch.Tensor | Image.Image:
    """A decoded photo as a loader worker hands it over: its pixels as a uint8 height x width x RGB tensor, which
    PyTorch passes in shared memory, while /dev/shm has SHARED_MEMORY_ROOM free; else the PIL image, pickled through
    a pipe (1.4 MB for an 800 x 600 photo: a fifth of per-car analyze's time went there). A container's /dev/shm is
    64 MB unless set larger, and a full one kills the workers with a bus error; without /dev/shm, the pipe too."""
    try:
        room = shutil.disk_usage("/dev/shm").free
    except OSError:
        room = 0
    return torch.from_numpy(np.array(photo)) if room >= SHARED_MEMORY_ROOM else photo


def decode(source, item: Item, draft: int | None, transform, exif: bool) -> tuple:
    """(the image transformed; None when unreadable), the reason it is unreadable, the photo's time: the list's,
    else (exif) its DateTimeOriginal."""
    when = item.time or (exif_time(source) if exif else "")
    try:
        photo = open_image(source, draft_size=draft)
    except ImageError as exc:
        return None, exc.reason, when
    return transform(photo), None, when


def collate(batch, photos: bool = False):
    """(indices, the images stacked, or with `photos` the photos' pixels as a list (each its own size); None when
    none was readable), (i, reason), {i: time}."""
    good = [(i, x) for i, x, _, _ in batch if x is not None]
    images = [x for _, x in good]
    return ([i for i, _ in good], (images if photos else torch.stack(images))
            if good else None, [(i, reason) for i, x, reason, _ in batch if x is None], {i: t for i, _, _, t in batch})


def analyze(sources: list[str], run: str, out: str | Path, group_by: str = "folder", batch_size: int = 32,
            workers: int = 2, device: str = "auto", force: bool = False, engine: str = "auto",
            detector=None, time_source: str = "list", period: str | None = None, limit: int | None = None,
            owner_pid: int | None = None) -> dict:
    """`detector` (a carapp.detection.model.Detector): one row per car instead of one per photo. `time_source`: list (a
    list's time column) or exif (that, else DateTimeOriginal); `period`: week | month | quarter counts per period.
    `limit`: at most this many more photos in this call, the rest left for the next one (which resumes): a ZeroGPU
    call's share (carapp.ui.hardware); such a call returns {"finished": False, "done", "total"} until the last.
    `owner_pid`: the process progress.json names as the job's (default this one; a ZeroGPU call's short-lived worker
    names the app, whose job it is)."""
    from ..predict import Predictor
    out, owner_pid = Path(out), owner_pid or os.getpid()
    if time_source not in TIME_SOURCES or period not in (None, *PERIODS):
        raise ValueError(f"--time must be one of {', '.join(TIME_SOURCES)} and --period one of {', '.join(PERIODS)}")
    items, skipped = collect(sources, group_by)
    if not items:
        raise CollectionError(f"no images found in {', '.join(sources)} ({skipped} other files skipped)")
    layout = columns(detector is not None, has_times(items, time_source))
    dist = init_distributed()
    if limit is not None and dist.world > 1:
        raise ValueError("an analysis in limited calls runs in one process, not under torchrun")
    predictor = Predictor.load(run, device=device)
    onnx_file = predictor.onnx_file or shared_onnx_path(predictor, run)  # an ONNX export brings its own
    if predictor.onnx_file and engine not in ("auto", "onnx", "int8"):
        raise ValueError(f"{run} is an ONNX export: it runs in ONNX Runtime (--engine onnx or int8), not {engine}")
    asked = engine  # the detector follows the rule from what was asked, not from the classifier's pick
    engine = pick_engine(engine, predictor.device, len(items) * (predictor.image_size / 224) ** 2,
                         onnx_file.is_file())
    part = out / ("predictions.csv" if dist.world == 1 else f".predictions.rank{dist.rank}.csv")
    shard = items[dist.rank::dist.world]
    if dist.main:
        _claim(out, run, predictor, force, detector, layout)
        done = read_done(part, per_car=detector is not None)  # a resumed run shows what it has from the start
        rundir.write_json(out / "progress.json", {"status": "running", "done": len(done) * dist.world,
                                                  "total": len(items), "pid": owner_pid, "updated": time.time()})
        model_file = _prepare_engine(engine, predictor, onnx_file, out, items)  # after the claim: a refused OUT
        detector_engine(detector, asked, len(items))                          # costs no export
    dist.barrier()
    if not dist.main:  # rank 0 exported them: here they are found in the cache
        model_file = _prepare_engine(engine, predictor, onnx_file, out, items)
        detector_engine(detector, asked, len(items))
        done = read_done(part, per_car=detector is not None)
    pending = [item for item in shard if item.path not in done]
    left_over = len(pending) - limit if limit is not None and len(pending) > limit else 0
    pending = pending[:len(pending) - left_over]
    log.info("%d images (%d other files skipped); %d already done, %d to go%s", len(items), skipped, len(done),
             len(pending) + left_over, "" if predictor.calibration.calibrated else "; " + _uncalibrated())
    run_batch = TorchEngine(predictor.model, predictor.device) if engine == "torch" else OnnxEngine(model_file)
    _predict_into(part, pending, predictor, run_batch, batch_size, workers, out if dist.main else None,
                  len(shard) - len(pending) - left_over, len(shard), dist.world, detector, layout,
                  time_source == "exif", owner_pid)
    dist.barrier()
    if left_over:
        return {"finished": False, "done": len(items) - left_over, "total": len(items)}
    if not dist.main:
        dist.close()
        return {}
    if dist.world > 1:
        _merge(out, [out / f".predictions.rank{r}.csv" for r in range(dist.world)], layout)
    dist.close()
    counts = write_outputs(out, [out / "predictions.csv"], period, predictor.calibration.calibrated)
    result = {**short_summary(counts, out, predictor.calibration.calibrated), "skipped_not_images": skipped}
    total = counts.total()
    rundir.write_json(out / "progress.json", {"status": "finished", "done": total, "total": total,
                                              "pid": owner_pid, "updated": time.time()})
    return result


def _predict_into(part: Path, pending: list[Item], predictor, run_batch, batch_size: int, workers: int,
                  progress_dir, already: int, total: int, world: int, detector, layout: list[str],
                  exif: bool, owner_pid: int) -> None:
    """Batches of decoded images through the network (with a detector: their cars); every batch's rows appended,
    flushed and fsynced."""
    per_car = detector is not None
    dataset = CollectionImages(pending, predictor.image_size, predictor.resize, photos=per_car,
                               shared=workers > 0, exif=exif)
    loader = DataLoader(dataset, batch_size=batch_size, num_workers=workers,
                        collate_fn=partial(collate, photos=per_car),
                        worker_init_fn=ignore_stop_signals if workers else None)
    new_file = not part.exists() or part.stat().st_size == 0
    started, done = time.time(), 0
    with open(part, "a", newline="") as f:
        writer = safecsv.Writer(f)
        if new_file:
            writer.writerow(layout)
        for batch in loader:
            writer.writerows(batch_rows(predictor, detector, run_batch, pending, batch, batch_size, layout))
            f.flush()
            os.fsync(f.fileno())
            done += len(batch[0]) + len(batch[2])
            if progress_dir is not None:
                rate = done * world / max(time.time() - started, 1e-9)
                rundir.write_json(progress_dir / "progress.json", {
                    "status": "running", "done": already + done * world, "total": total * world,
                    "images_per_sec": rate, "eta_seconds": (total - already - done) * world / max(rate, 1e-9),
                    "pid": owner_pid, "updated": time.time()})


def columns(per_car: bool, timed: bool = False) -> list[str]:
    return COLUMNS + CAR_COLUMNS * per_car + [TIME_COLUMN] * timed


def has_times(items: list[Item], time_source: str) -> bool:
    """Whether an analysis's rows carry a time column: EXIF asked for, or a list gave some photo a time."""
    return time_source == "exif" or any(item.time for item in items)


def batch_rows(predictor, detector, run_batch, items: list[Item], batch: tuple, batch_size: int,
               layout: list[str]) -> list[list]:
    """The rows of one collated batch (indices into items, images, unreadable ones, times), in `layout`'s columns:
    every photo's, with a detector every car's."""
    indices, images, bad, times = batch
    per_car = detector is not None
    rows = [_unreadable_row(items[i], reason, per_car) for i, reason in bad]
    if images is not None and per_car:
        rows += _car_rows(predictor, detector, run_batch, [items[i] for i in indices], images, batch_size)
    elif images is not None:
        rows += _predicted_rows(predictor.calibration, run_batch, [items[i] for i in indices], images)
    if TIME_COLUMN in layout:
        time_of = {items[i].path: when for i, when in times.items()}
        rows = [row + [time_of[row[0]]] for row in rows]
    return rows


def _predicted_rows(calibration, run_batch, items: list[Item], images: torch.Tensor) -> list[list]:
    logits, features = run_batch(images)
    return [_answer_row(item, a) for item, a in zip(items, calibration.answers(logits, features, 5))]


def _answer_row(item: Item, a) -> list:
    return [item.path, item.group, a.status, a.make[0], round(a.make[1], 6), a.top[0][0], round(a.top[0][1], 6),
            "" if a.ood_score is None else round(a.ood_score, 6),
            json.dumps([[n, round(p, 6)] for n, p in a.top]), "" if a.status == "model" else a.reason]


def _car_rows(predictor, detector, run_batch, items: list[Item], pixels: list, batch_size: int) -> list[list]:
    """Every car of these photos (PIL images, or their pixels from shared memory): found in one detector pass,
    cropped as the classifier trained, classified in batches; a photo without a car gets one `no-car` row with an
    empty box."""
    photos = [Image.fromarray(p.numpy()) if isinstance(p, torch.Tensor) else p for p in pixels]
    found = detector.detect(photos)
    cars = [(i, k, box) for i, boxes in enumerate(found) for k, box in enumerate(boxes)]
    answers = []
    for start in range(0, len(cars), batch_size):
        crops = [car_crop(photos[i], box.as_list(), predictor.crop_rule) for i, _, box in cars[start:start + batch_size]]
        logits, features = run_batch(torch.stack([predictor.transform(crop) for crop in crops]))
        answers += predictor.calibration.answers(logits, features, 5, cars=True)
    rows = [[item.path, item.group, "no-car", "", "", "", "", "", "", detector.no_car_reason, 0, 0, "", "", "", "", ""]
            for i, item in enumerate(items) if not found[i]]
    for (i, k, box), a in zip(cars, answers):
        mark_small(a, box.short_side, predictor.min_box)
        rows.append(_answer_row(items[i], a) + [k, len(found[i]), *box.as_list(), round(box.score, 4)])
    return rows


def _unreadable_row(item: Item, reason: str, per_car: bool = False) -> list:
    return [item.path, item.group, "unreadable", "", "", "", "", "", "", reason] + (["", 0] + [""] * 5) * per_car


def read_done(part: Path, per_car: bool = False) -> set[str]:
    """Paths already in a predictions file. A torn last line (a kill mid-write) is cut off, so its image is
    predicted again and appears once; with per_car, so is a last photo with fewer rows than its cars."""
    if not part.is_file():
        return set()
    _cut_torn_tail(part)
    if per_car:
        _cut_unfinished_photo(part)
    return {row["path"] for row in iter_rows(part)}


def _cut_unfinished_photo(path: Path) -> None:
    """Truncate before the last photo's rows when fewer than its `cars` were written (a photo's rows are written
    together, so only the last can be short)."""
    with open(path, "rb") as f:
        end = 0

        def lines():  # the file's lines, keeping count of where the reader is
            nonlocal end
            for raw in f:
                end += len(raw)
                yield raw.decode("utf-8")
        reader = csv.reader(lines())
        header = next(reader, None)
        if header is None or "cars" not in header:
            return
        at_path, at_cars = header.index("path"), header.index("cars")
        last, have, need, last_start, row_start = None, 0, 0, end, end
        for row in reader:
            if row[at_path] != last:
                last, have, last_start = row[at_path], 0, row_start
            have, need, row_start = have + 1, int(row[at_cars] or 0), end
    if last is not None and have < need:
        with open(path, "r+b") as f:
            f.truncate(last_start)


def _cut_torn_tail(path: Path, chunk: int = 1 << 16) -> None:
    """Truncate after the last newline, reading backwards from the end: the file itself may be large."""
    with open(path, "r+b") as f:
        end = f.seek(0, os.SEEK_END)
        f.seek(max(end - 1, 0))
        if end == 0 or f.read(1) == b"\n":
            return
        pos = end
        while pos > 0:
            start = max(0, pos - chunk)
            f.seek(start)
            newline = f.read(pos - start).rfind(b"\n")
            if newline >= 0:
                f.truncate(start + newline + 1)
                return
            pos = start
        f.truncate(0)


def iter_rows(path: Path):
    """The rows of a predictions file, one at a time."""
    with open(path, newline="") as f:
        yield from safecsv.DictReader(f)


def _prepare_engine(engine: str, predictor, onnx_file: Path, out: Path, items: list[Item]) -> Path | None:
    """The ONNX file an ONNX engine runs: the model's shared export (made on first use), or for int8 its
    quantised copy in OUT (calibrated on this collection's first photos, so it belongs to this analysis)."""
    if engine == "torch":
        return None
    if engine not in ENGINES:
        raise ValueError(f"--engine must be one of {', '.join(ENGINES)}, not {engine!r}")
    float_file = onnx_file if predictor.onnx_file else export_shared(predictor, onnx_file)
    if engine == "onnx":
        return float_file
    int8_file = out / f".{float_file.stem}-int8.onnx"
    if not int8_file.is_file():
        log.info("quantising to int8, calibrated on the first %d photos", min(len(items), CALIBRATION_PHOTOS))
        dataset = CollectionImages(items[:CALIBRATION_PHOTOS], predictor.image_size, predictor.resize)
        engine_input = OnnxEngine(float_file)
        batches = [engine_input.prepare(images) for _, images, _, _ in DataLoader(dataset, 16, collate_fn=collate)
                   if images is not None]
        quantize(float_file, int8_file, batches)
    return int8_file


def _claim(out: Path, run: str, predictor, force: bool, detector, layout: list[str]) -> None:
    """OUT belongs to one model (and detector): results of another are refused unless --force, which starts OUT
    afresh. So are results with other columns (with or without times)."""
    out.mkdir(parents=True, exist_ok=True)
    identity = identity_of(run, predictor, detector.source if detector is not None else None)
    previous = rundir.read_json(out / META)
    if previous and previous.get("identity") != identity:
        if not force:
            theirs = previous["identity"]
            raise CollectionError(f"{out} holds the results of another model ({theirs['model']}"
                                  + (f", detector {theirs['detector']}" if theirs.get("detector") else ", no detector")
                                  + "): choose another --out, or --force to replace them")
    if not force:
        _check_layout(out, layout)
    if previous and previous.get("identity") != identity or force:
        for name in ("predictions.csv", "summary.csv", "report.html", "progress.json"):
            (out / name).unlink(missing_ok=True)
        for part in [*out.glob(".predictions.rank*.csv"), *out.glob(".model-*.onnx")]:
            part.unlink()
    rundir.write_json(out / META, {"identity": identity, "calibrated": predictor.calibration.calibrated})


def identity_of(run, predictor, detector_source: str | None) -> dict:
    """What an analysis's rows came from: the model (and its labels) and the detector, if any."""
    identity = {"model": _source_name(run),
                "labels": hashlib.sha256("\n".join(predictor.labels).encode()).hexdigest()[:16]}
    if detector_source not in (None, "", "none"):  # an analysis without one keeps the identity it always had
        identity["detector"] = _source_name(detector_source)
    return identity


def _check_layout(out: Path, layout: list[str]) -> None:
    for part in [out / "predictions.csv", *out.glob(".predictions.rank*.csv")]:
        with contextlib.suppress(OSError), open(part, newline="") as f:
            header = next(csv.reader(f), None)
            if header and header != layout:
                said = "with" if TIME_COLUMN in header else "without"
                raise CollectionError(f"{out} holds an analysis {said} photo times, and this one is "
                                      f"{'without' if said == 'with' else 'with'}: choose another --out, or --force "
                                      f"to replace it")


def _source_name(source) -> str:
    return str(Path(source).resolve()) if "://" not in str(source) and str(source) != "coco" else str(source)


def _merge(out: Path, parts: list[Path], layout: list[str]) -> None:
    """Rank 0 appends the other ranks' rows (every car of a photo) that predictions.csv lacks; the parts stay for a
    later resume. Shards hold disjoint photos, so a photo's rows come from one part, together."""
    target = out / "predictions.csv"
    done = read_done(target, "cars" in layout)
    with open(target, "a", newline="") as f:
        writer = safecsv.DictWriter(f, layout)
        if not done and f.tell() == 0:
            writer.writeheader()
        for part in parts:
            for row in (iter_rows(part) if part.is_file() else []):
                if row["path"] not in done:
                    writer.writerow(row)
        f.flush()
        os.fsync(f.fileno())


def _uncalibrated() -> str:
    from ..evaluation.answers import UNCALIBRATED_NOTE
    return UNCALIBRATED_NOTE
