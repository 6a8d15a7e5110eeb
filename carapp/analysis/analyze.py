"""Analyse a photo collection: which makes and models appear, how often, per group, with 95% Wilson intervals.

    python -m carapp analyze photos/ more.zip list.txt --run checkpoints/run1 --out analysis/ [--group-by folder]
    torchrun --nproc_per_node=4 -m carapp analyze photos/ --model RUN --out OUT   # a shard each; rank 0 merges

OUT gets predictions.csv (one row per image, appended and fsynced per batch), summary.csv, report.html, and
progress.json while it runs. Running again with the same OUT skips the images already there, so a run killed at any
moment (even kill -9) completes with every image exactly once.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import time
from pathlib import Path

import torch
from torch.utils.data import DataLoader, Dataset

from .. import rundir, safecsv
from ..dataset.images import ImageError, open_image
from ..dataset.loader import build_transform, ignore_stop_signals, resize_size
from ..engines import ENGINES, OnnxEngine, TorchEngine, export_shared, pick_engine, quantize, shared_onnx_path
from ..runtime import init_distributed
from .collection import ALL_GROUPS, READ_ERRORS, CollectionError, Item, collect

log = logging.getLogger("carapp")

COLUMNS = ["path", "group", "status", "make", "make_prob", "model", "model_prob", "ood_score", "top5", "reason"]
META = "analysis.json"
CALIBRATION_PHOTOS = 64   # photos that set the int8 activation ranges


class CollectionImages(Dataset):
    """Decoded, eval-transformed images of a collection; an unreadable one yields its reason instead."""

    def __init__(self, items: list[Item], image_size: int, resize: str = "crop"):
        self.items, self.draft = items, resize_size(image_size)
        self.transform = build_transform(image_size, False, resize=resize)
        self.archives: dict = {}  # zip files, opened once per worker process

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int):
        try:
            return i, self.transform(open_image(self.items[i].open(self.archives), draft_size=self.draft)), None
        except ImageError as exc:
            return i, None, exc.reason
        except READ_ERRORS as exc:  # a vanished file, a broken zip member
            return i, None, f"cannot read ({exc})"


def collate(batch):
    good = [(i, x) for i, x, _ in batch if x is not None]
    return ([i for i, _ in good], torch.stack([x for _, x in good]) if good else None,
            [(i, reason) for i, x, reason in batch if x is None])


def analyze(sources: list[str], run: str, out: str | Path, group_by: str = "folder", batch_size: int = 32,
            workers: int = 2, device: str = "auto", force: bool = False, engine: str = "auto") -> dict:
    from ..predict import Predictor
    out = Path(out)
    items, skipped = collect(sources, group_by)
    if not items:
        raise CollectionError(f"no images found in {', '.join(sources)} ({skipped} other files skipped)")
    dist = init_distributed()
    predictor = Predictor.load(run, device=device)
    onnx_file = predictor.onnx_file or shared_onnx_path(predictor, run)  # an ONNX export brings its own
    if predictor.onnx_file and engine not in ("auto", "onnx", "int8"):
        raise ValueError(f"{run} is an ONNX export: it runs in ONNX Runtime (--engine onnx or int8), not {engine}")
    engine = pick_engine(engine, predictor.device, len(items) * (predictor.image_size / 224) ** 2,
                         onnx_file.is_file())
    if dist.main:
        _claim(out, run, predictor, force)
        rundir.write_json(out / "progress.json", {"status": "running", "done": 0, "total": len(items),
                                                  "pid": os.getpid(), "updated": time.time()})
        model_file = _prepare_engine(engine, predictor, onnx_file, out, items)
    dist.barrier()
    if not dist.main:  # rank 0 exported it: here it is found in the cache
        model_file = _prepare_engine(engine, predictor, onnx_file, out, items)
    part = out / ("predictions.csv" if dist.world == 1 else f".predictions.rank{dist.rank}.csv")
    shard = items[dist.rank::dist.world]
    done = read_done(part)
    pending = [item for item in shard if item.path not in done]
    log.info("%d images (%d other files skipped); %d already done, %d to go%s", len(items), skipped, len(done),
             len(pending), "" if predictor.calibration.calibrated else "; " + _uncalibrated())
    run_batch = TorchEngine(predictor.model, predictor.device) if engine == "torch" else OnnxEngine(model_file)
    _predict_into(part, pending, predictor, run_batch, batch_size, workers, out if dist.main else None,
                  len(shard) - len(pending), len(shard), dist.world)
    dist.barrier()
    if not dist.main:
        dist.close()
        return {}
    if dist.world > 1:
        _merge(out, [out / f".predictions.rank{r}.csv" for r in range(dist.world)])
    dist.close()
    from .report import tally, write_report, write_summary
    counts = tally(out / "predictions.csv")  # one streaming pass: memory stays flat however many photos
    summary = write_summary(out, counts)
    write_report(out, counts, summary, predictor.calibration.calibrated)
    result = _short_summary(counts, skipped, predictor.calibration.calibrated, out)
    total = sum(counts.statuses.values())
    rundir.write_json(out / "progress.json", {"status": "finished", "done": total, "total": total,
                                              "pid": os.getpid(), "updated": time.time()})
    return result


def _predict_into(part: Path, pending: list[Item], predictor, run_batch, batch_size: int, workers: int,
                  progress_dir, already: int, total: int, world: int) -> None:
    """Batches of decoded images through the network; every batch's rows appended, flushed and fsynced."""
    dataset = CollectionImages(pending, predictor.image_size, predictor.resize)
    loader = DataLoader(dataset, batch_size=batch_size, num_workers=workers, collate_fn=collate,
                        worker_init_fn=ignore_stop_signals if workers else None)
    new_file = not part.exists() or part.stat().st_size == 0
    started, done = time.time(), 0
    with open(part, "a", newline="") as f:
        writer = safecsv.Writer(f)
        if new_file:
            writer.writerow(COLUMNS)
        for indices, images, bad in loader:
            rows = [_unreadable_row(pending[i], reason) for i, reason in bad]
            if images is not None:
                rows += _predicted_rows(predictor.calibration, run_batch, [pending[i] for i in indices], images)
            writer.writerows(rows)
            f.flush()
            os.fsync(f.fileno())
            done += len(rows)
            if progress_dir is not None:
                rate = done * world / max(time.time() - started, 1e-9)
                rundir.write_json(progress_dir / "progress.json", {
                    "status": "running", "done": already + done * world, "total": total * world,
                    "images_per_sec": rate, "eta_seconds": (total - already - done) * world / max(rate, 1e-9),
                    "pid": os.getpid(), "updated": time.time()})


def _predicted_rows(calibration, run_batch, items: list[Item], images: torch.Tensor) -> list[list]:
    logits, features = run_batch(images)
    answers = calibration.answers(logits, features, 5)
    return [[item.path, item.group, a.status, a.make[0], round(a.make[1], 6), a.top[0][0], round(a.top[0][1], 6),
             "" if a.ood_score is None else round(a.ood_score, 6),
             json.dumps([[n, round(p, 6)] for n, p in a.top]), "" if a.status == "model" else a.reason]
            for item, a in zip(items, answers)]


def _unreadable_row(item: Item, reason: str) -> list:
    return [item.path, item.group, "unreadable", "", "", "", "", "", "", reason]


def read_done(part: Path) -> set[str]:
    """Paths already in a predictions file. A torn last line (a kill mid-write) is cut off, so its image is
    predicted again and appears once."""
    if not part.is_file():
        return set()
    _cut_torn_tail(part)
    return {row["path"] for row in iter_rows(part)}


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
        batches = [engine_input.prepare(images) for _, images, _ in DataLoader(dataset, 16, collate_fn=collate)
                   if images is not None]
        quantize(float_file, int8_file, batches)
    return int8_file


def _claim(out: Path, run: str, predictor, force: bool) -> None:
    """OUT belongs to one model: results of another are refused unless --force, which starts OUT afresh."""
    out.mkdir(parents=True, exist_ok=True)
    identity = {"model": str(Path(run).resolve()) if "://" not in str(run) else str(run),
                "labels": hashlib.sha256("\n".join(predictor.labels).encode()).hexdigest()[:16]}
    previous = rundir.read_json(out / META)
    if previous and previous.get("identity") != identity:
        if not force:
            raise CollectionError(f"{out} holds the results of another model ({previous['identity']['model']}): "
                                  f"choose another --out, or --force to replace them")
    if previous and previous.get("identity") != identity or force:
        for name in ("predictions.csv", "summary.csv", "report.html", "progress.json"):
            (out / name).unlink(missing_ok=True)
        for part in [*out.glob(".predictions.rank*.csv"), *out.glob(".model-*.onnx")]:
            part.unlink()
    rundir.write_json(out / META, {"identity": identity, "calibrated": predictor.calibration.calibrated})


def _merge(out: Path, parts: list[Path]) -> None:
    """Rank 0 appends the other ranks' rows that predictions.csv lacks; the parts stay for a later resume."""
    target = out / "predictions.csv"
    done = read_done(target)
    with open(target, "a", newline="") as f:
        writer = safecsv.DictWriter(f, COLUMNS)
        if not done and f.tell() == 0:
            writer.writeheader()
        for part in parts:
            for row in (iter_rows(part) if part.is_file() else []):
                if row["path"] not in done:
                    writer.writerow(row)
                    done.add(row["path"])
        f.flush()
        os.fsync(f.fileno())


def _short_summary(counts, skipped: int, calibrated: bool, out: Path) -> dict:
    makes = counts.counts[ALL_GROUPS]["make"]
    return {"out": str(out), "images": sum(counts.statuses.values()), "skipped_not_images": skipped,
            "calibrated": calibrated,
            "status_counts": {s: counts.statuses[s] for s in ("model", "make", "unsure", "no-car", "unreadable")},
            "groups": sorted(set(counts.images) - {ALL_GROUPS}), "top_makes": dict(makes.most_common(10))}


def _uncalibrated() -> str:
    from ..evaluation.answers import UNCALIBRATED_NOTE
    return UNCALIBRATED_NOTE
