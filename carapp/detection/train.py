"""Training a car detector from a dataset's own boxes, with the classifier trainer's habits.

    python -m carapp train-detector --data ROOT --run-dir checkpoints/det [--preset demo] [--epochs N]
    python -m carapp train-detector --run-dir checkpoints/det --resume [--epochs N]

The run directory holds config.json, progress.json (live), metrics.jsonl (per epoch: train loss, AP50, recall and
precision on the held-out photos' mosaics), train.log, and last.pt / best.pt (atomic, weights_only-loadable; best is
the highest AP50). A STOP file, SIGINT or SIGTERM finishes the step, saves last.pt and exits; --resume goes on from
that very step, with the same images (carapp.detection.data) and the optimizer and schedule as they were.
"""
from __future__ import annotations

import dataclasses
import logging
import math
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from .. import rundir
from ..checkpoint import load_checkpoint, save_checkpoint
from ..training.train import StopSignal, TrainingError, take_over
from .data import boxed_photos, negative_paths, split_photos, training_batch, validation_set
from .metrics import average_precision, count_figures, operating_score
from .model import DETECTOR_KIND, build_detector, without_parts

log = logging.getLogger("carapp")


@dataclass
class DetectorConfig:
    data: str = ""
    format: str = "auto"
    epochs: int = 30
    steps_per_epoch: int = 100
    batch_size: int = 8         # mosaics per step
    lr: float = 2e-3            # AdamW: a linear warmup over WARMUP_STEPS, then a cosine to 0 over the run
    weight_decay: float = 1e-4
    val_frac: float = 0.15      # photos held out for the validation mosaics
    negatives: str = "generated"  # photos without a car for a quarter of the mosaic cells (a folder; "": none)
    seed: int = 0
    preset: str = ""
    kind: str = "detector"      # what config.json says this run is: runs list it apart from the classifiers

    def __post_init__(self):
        checks = [("epochs", self.epochs >= 1), ("steps_per_epoch", self.steps_per_epoch >= 1),
                  ("batch_size", self.batch_size >= 1), ("lr", self.lr > 0), ("val_frac", 0 < self.val_frac < 1)]
        bad = [name for name, ok in checks if not ok]
        if bad:
            raise ValueError("invalid detector options: " + ", ".join(f"{n}={getattr(self, n)!r}" for n in bad))


# the demo set on a 2-core CPU in minutes (docs/BENCHMARKS.md says how many)
DETECTOR_PRESETS = {"": {}, "demo": dict(epochs=48, steps_per_epoch=40, batch_size=8, lr=2e-3)}
WARMUP_STEPS = 50


def detector_config(preset: str = "", **options) -> DetectorConfig:
    if preset not in DETECTOR_PRESETS:
        raise ValueError(f"unknown detector preset {preset!r}; choose from "
                         f"{', '.join(p for p in DETECTOR_PRESETS if p)}")
    given = {k: v for k, v in options.items() if v is not None}
    return DetectorConfig(preset=preset, **{**DETECTOR_PRESETS[preset], **given})


def train_detector(cfg: DetectorConfig | None, run_dir: str | Path, resume: bool = False,
                   epochs: int | None = None) -> dict:
    """Train (or resume) a detector run; returns {"status", "epochs", "best_ap50"}."""
    run = Path(run_dir)
    if resume and not (run / "config.json").is_file():
        raise TrainingError(f"{run} holds no detector run to resume")
    if not resume and (run / "last.pt").exists():
        raise TrainingError(f"{run} already holds a run: resume it with --resume, or pick a new --run-dir")
    made_here, level = not run.exists(), log.level
    lock, handler = take_over(run)
    try:
        if resume:
            cfg = DetectorConfig(**rundir.read_json(run / "config.json"))
            cfg.epochs = epochs or cfg.epochs
        photos = boxed_photos(cfg.data, cfg.format)
        rundir.write_json(run / "config.json", dataclasses.asdict(cfg))
        made_here = False
        negatives = negative_paths(cfg.negatives)
        with StopSignal(run) as stop:
            return _fit(cfg, run, stop, *split_photos(photos, cfg.val_frac, cfg.seed), negatives)
    except Exception as exc:
        if not made_here:
            rundir.write_progress(run, status="failed", error=str(exc))
        raise
    finally:
        log.removeHandler(handler)
        handler.close()
        log.setLevel(level)
        lock.unlink(missing_ok=True)
        if made_here:
            shutil.rmtree(run, ignore_errors=True)


def _stopped(run: Path, cfg: DetectorConfig, epoch: int, state: dict) -> dict:
    """After last.pt is saved: say where the run stopped and how to go on."""
    rundir.write_progress(run, status="stopped", epoch=epoch, epochs=cfg.epochs, step=state["step"])
    where = f"in epoch {epoch} at step {state['step']}" if state["step"] else f"after epoch {epoch}"
    log.info("stopped %s; resume with: python -m carapp train-detector --run-dir %s --resume", where, run)
    return {"status": "stopped", "epochs": state["epoch"], "best_ap50": max(state["best_ap50"], 0.0)}


def _schedule(cfg: DetectorConfig):
    total = cfg.epochs * cfg.steps_per_epoch
    return lambda step: min(1.0, (step + 1) / WARMUP_STEPS) * 0.5 * (1 + math.cos(math.pi * min(step, total) / total))


def _fit(cfg: DetectorConfig, run: Path, stop: StopSignal, train_photos, val_photos, negatives) -> dict:
    torch.manual_seed(cfg.seed)
    model = build_detector()
    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, _schedule(cfg))
    state = {"epoch": 0, "step": 0, "loss_sum": 0.0, "seen": 0, "best_ap50": -1.0}
    if (run / "last.pt").is_file():
        ckpt = load_checkpoint(run / "last.pt")
        model.load_state_dict(ckpt["model"])
        optimizer.load_state_dict(ckpt["optimizer"])
        scheduler.load_state_dict(ckpt["scheduler"])
        state.update({k: ckpt[k] for k in state})
    rundir.truncate_metrics(run, state["epoch"])
    val = validation_set(val_photos, cfg.seed, negatives=negatives[::2])
    train_negatives = negatives[1::2]  # the validation mosaics' negatives are none the training saw
    log.info("detector: %d photos with boxes (%d held out for %d validation mosaics), %d photos without a car, "
             "%d epochs of %d steps of %d", len(train_photos) + len(val_photos), len(val_photos), len(val),
             len(negatives), cfg.epochs, cfg.steps_per_epoch, cfg.batch_size)
    while state["epoch"] < cfg.epochs:
        epoch = state["epoch"] + 1
        started = time.time()
        if not _train_epoch(cfg, run, stop, model, optimizer, scheduler, state, train_photos, train_negatives,
                            epoch):
            _save_last(run, cfg, model, optimizer, scheduler, state)
            return _stopped(run, cfg, epoch, state)
        row = {"epoch": epoch, "train_loss": state["loss_sum"] / max(state["seen"], 1), **validate(model, val),
               "lr": optimizer.param_groups[0]["lr"], "seconds": round(time.time() - started, 2)}
        improved = row["ap50"] > state["best_ap50"]
        state.update(epoch=epoch, step=0, loss_sum=0.0, seen=0, best_ap50=max(row["ap50"], state["best_ap50"]))
        rundir.append_metrics(run, row)
        log.info("epoch %3d/%d | train loss %.4f | val AP50 %.3f, at score %.2f recall %.3f precision %.3f | %.1f s",
                 epoch, cfg.epochs, row["train_loss"], row["ap50"], row["min_score"], row["recall"] or 0,
                 row["precision"] or 0, row["seconds"])
        if improved:
            save_checkpoint({"kind": DETECTOR_KIND, "model": model.state_dict(), "config": dataclasses.asdict(cfg),
                             "metrics": row}, run / "best.pt")
        _save_last(run, cfg, model, optimizer, scheduler, state)
        if stop:
            return _stopped(run, cfg, epoch, state)
    rundir.write_progress(run, status="finished", epoch=state["epoch"], epochs=cfg.epochs,
                          best_ap50=state["best_ap50"])
    return {"status": "finished", "epochs": state["epoch"], "best_ap50": state["best_ap50"]}


def _train_epoch(cfg, run, stop, model, optimizer, scheduler, state, photos, negatives, epoch) -> bool:
    """The steps of one epoch from state["step"] on; False when asked to stop (state holds where)."""
    model.train()
    last_write, started, first = 0.0, time.time(), state["step"]
    while state["step"] < cfg.steps_per_epoch:
        images, targets = training_batch(photos, cfg.batch_size, cfg.seed, epoch, state["step"], negatives)
        loss = sum(model(images, targets).values())
        if not torch.isfinite(loss):
            raise TrainingError(f"the detector's loss became {loss.item()} at epoch {epoch} step {state['step'] + 1};"
                                f" last.pt keeps the last good state. Try a smaller --lr.")
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 10.0)  # FCOS from scratch: an early spike must not explode
        optimizer.step()
        scheduler.step()
        state["step"] += 1
        state["loss_sum"] += loss.item() * len(images)
        state["seen"] += len(images)
        if time.time() - last_write >= 1.0 or state["step"] == cfg.steps_per_epoch:
            last_write = time.time()
            rate = (state["step"] - first) * cfg.batch_size / max(last_write - started, 1e-9)
            left = (cfg.steps_per_epoch - state["step"] + (cfg.epochs - epoch) * cfg.steps_per_epoch)
            rundir.write_progress(run, status="running", epoch=epoch, epochs=cfg.epochs, step=state["step"],
                                  steps=cfg.steps_per_epoch, running_loss=state["loss_sum"] / state["seen"],
                                  images_per_sec=rate, eta_seconds=left * cfg.batch_size / max(rate, 1e-9))
        if stop and state["step"] < cfg.steps_per_epoch:
            return False
    return True


@torch.inference_mode()
def validate(model, val: list) -> dict:
    """AP50 over the validation mosaics; the operating score (best F1 on them) and recall / precision there. Boxes
    go through without_parts first, as Detector.detect does: the score is chosen for the boxes a user will get."""
    model.eval()
    preds, truths = [], []
    for start in range(0, len(val), 8):
        chunk = val[start:start + 8]
        for out, (_, target) in zip(model([image for image, _ in chunk]), chunk):
            kept = without_parts(out["boxes"], out["scores"])
            preds.append((out["boxes"][kept].numpy().reshape(-1, 4), out["scores"][kept].numpy()))
            truths.append(target["boxes"].numpy())
    threshold = operating_score(preds, truths)
    figures = count_figures([b[s >= threshold] for b, s in preds], truths)
    return {"ap50": average_precision(preds, truths), "recall": figures["recall"], "precision": figures["precision"],
            "min_score": threshold}


def _save_last(run, cfg, model, optimizer, scheduler, state) -> None:
    save_checkpoint({"kind": DETECTOR_KIND, "model": model.state_dict(), "optimizer": optimizer.state_dict(),
                     "scheduler": scheduler.state_dict(), "config": dataclasses.asdict(cfg), **state},
                    run / "last.pt")
