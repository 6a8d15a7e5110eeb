"""Training with the paper's recipe, resumable at any step.

    python -m carapp train --data ROOT --run-dir checkpoints/run1 [--preset demo] [--epochs N] ...
    python -m carapp train --resume checkpoints/run1 [--epochs N]

A STOP file in the run directory, SIGINT or SIGTERM finishes the current step, saves last.pt and exits cleanly.
"""
from __future__ import annotations

import logging
import math
import signal
import threading
import time
from pathlib import Path

import torch
from tqdm import tqdm

from . import rundir
from .checkpoint import load_checkpoint, save_checkpoint
from .config import TrainConfig
from .data import Split, index_dataset, make_split
from .loader import CarImages, EpochSampler, build_transform, make_loader
from .losses import FocalLoss, class_alpha
from .model import build_model
from .runtime import autocast, describe_device, needs_grad_scaler, pick_device

log = logging.getLogger("carapp")


class TrainingError(RuntimeError):
    """Training cannot go on; the message says why and what to do."""


class StopSignal:
    """True once SIGINT/SIGTERM arrived or a STOP file appeared in the run directory."""

    def __init__(self, run: Path):
        self.run, self.signalled = run, False
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGINT, signal.SIGTERM):
                signal.signal(sig, self._on_signal)

    def _on_signal(self, signum, frame):
        log.info("signal %s: stopping after this step", signal.Signals(signum).name)
        self.signalled = True

    def __bool__(self) -> bool:
        return self.signalled or rundir.stop_requested(self.run)


def train(cfg: TrainConfig, run_dir: str | Path, resume: bool = False, epochs: int | None = None,
          split: Split | None = None) -> dict:
    """Train (or resume) the run in run_dir; returns {"status", "epochs", "best_val_loss", "test": ...}.

    `split` freezes a given split into a fresh run (the sweep shares one); by default the run makes its own.
    """
    run = Path(run_dir)
    run.mkdir(parents=True, exist_ok=True)
    handler = _log_to(run / "train.log")
    try:
        cfg, split, ckpt = _prepare(cfg, run, resume, epochs, split)
        return _fit(cfg, run, split, ckpt)
    except Exception as exc:
        rundir.write_progress(run, status="failed", error=str(exc))
        raise
    finally:
        log.removeHandler(handler)
        handler.close()


def _prepare(cfg: TrainConfig, run: Path, resume: bool, epochs: int | None, split: Split | None):
    """Fresh run: index, split and freeze. Resume: read back config, split and last.pt."""
    (run / "STOP").unlink(missing_ok=True)
    if resume:
        saved = rundir.read_json(run / "config.json")
        if saved is None or not (run / "last.pt").is_file():
            raise TrainingError(f"{run} has no config.json and last.pt to resume from")
        cfg = TrainConfig.from_dict(saved)
        if epochs:
            cfg.epochs = epochs
        index = index_dataset(cfg.data, cfg.format)
        split = rundir.read_split(run, dict(zip(index.paths, index.bboxes)))
        ckpt = load_checkpoint(run / "last.pt")
        rundir.truncate_metrics(run, ckpt["epoch"])
    else:
        if (run / "last.pt").exists():
            raise TrainingError(f"{run} already holds a run: resume it with --resume, or pick a new --run-dir")
        if split is None:
            split = make_split(index_dataset(cfg.data, cfg.format), cfg.min_images, cfg.val_frac, cfg.test_frac,
                               cfg.seed)
        rundir.write_split(run, split)
        ckpt = None
    rundir.write_json(run / "config.json", cfg.to_dict())
    return cfg, split, ckpt


def _fit(cfg: TrainConfig, run: Path, split: Split, ckpt: dict | None) -> dict:
    device = pick_device(cfg.device)
    torch.manual_seed(cfg.seed)
    num_classes = len(split.class_info)
    model = build_model(cfg.backbone, num_classes, cfg.dropout, None if ckpt else cfg.weights).to(device)
    if cfg.channels_last and device.type == "cuda":
        model = model.to(memory_format=torch.channels_last)
    criterion = FocalLoss(class_alpha(split.counts("train"), cfg.alpha), cfg.gamma).to(device)
    optimizer = torch.optim.Adam(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    scheduler = torch.optim.lr_scheduler.ReduceLROnPlateau(optimizer, factor=cfg.lr_factor, patience=cfg.lr_patience)
    scaler = torch.amp.GradScaler("cuda", enabled=needs_grad_scaler(device, cfg.amp))
    state = {"epoch": 0, "step": 0, "partial": None, "best_val_loss": math.inf, "bad_epochs": 0}
    if ckpt:
        model.load_state_dict(ckpt["model"])
        optimizer.load_state_dict(ckpt["optimizer"])
        scheduler.load_state_dict(ckpt["scheduler"])
        state.update({k: ckpt[k] for k in state})
        torch.set_rng_state(ckpt["rng"])

    train_paths, train_labels, train_boxes = split.subset("train")
    val_paths, val_labels, val_boxes = split.subset("val")
    num_samples = cfg.steps_per_epoch * cfg.batch_size if cfg.steps_per_epoch else len(train_paths)
    sampler = EpochSampler(train_labels, cfg.sampler == "weighted", num_samples, cfg.seed)
    train_set = CarImages(cfg.data, train_paths, train_labels, train_boxes,
                          build_transform(cfg.image_size, True, cfg.jitter), cfg.crop_bbox, cfg.image_size)
    val_set = CarImages(cfg.data, val_paths, val_labels, val_boxes,
                        build_transform(cfg.image_size, False), cfg.crop_bbox, cfg.image_size)
    pin = device.type == "cuda"
    train_loader = make_loader(train_set, cfg.batch_size, cfg.workers, sampler, pin)
    val_loader = make_loader(val_set, cfg.batch_size, cfg.workers, None, pin)
    stop = StopSignal(run)
    bad_paths: set[str] = set()
    log.info("run %s: %d classes, %d train / %d val images, %s, %s", run, num_classes, len(train_paths),
             len(val_paths), cfg.backbone, describe_device(device))

    while state["epoch"] < cfg.epochs:
        epoch = state["epoch"] + 1
        sampler.set_epoch(epoch, state["step"] * cfg.batch_size)
        if state["step"] == 0:  # augmentation and dropout seeds follow the epoch; mid-epoch, last.pt's RNG goes on
            torch.manual_seed(cfg.seed * 1_000_003 + epoch)
        result = train_one_epoch(model, train_loader, criterion, optimizer, scaler, device, cfg, run, stop, epoch,
                                 state, bad_paths)
        if result is None:  # stopped mid-epoch: everything needed to continue is in last.pt
            save_last(run, model, optimizer, scheduler, state, cfg)
            rundir.write_progress(run, status="stopped", epoch=epoch, epochs=cfg.epochs)
            log.info("stopped at epoch %d step %d; resume with: python -m carapp train --resume %s",
                     epoch, state["step"], run)
            return {"status": "stopped", "epochs": state["epoch"], "best_val_loss": state["best_val_loss"]}
        val_loss, val_acc = validate(model, val_loader, criterion, device, cfg)
        scheduler.step(val_loss)
        row = {"epoch": epoch, **result, "val_loss": val_loss, "val_acc": val_acc,
               "lr": optimizer.param_groups[0]["lr"]}
        rundir.append_metrics(run, row)
        log.info("epoch %3d/%d | train loss %.4f acc %.4f | val loss %.4f acc %.4f | lr %.1e | %.1f s",
                 epoch, cfg.epochs, row["train_loss"], row["train_acc"], val_loss, val_acc, row["lr"],
                 row["seconds"])
        improved = val_loss < state["best_val_loss"]
        state.update(epoch=epoch, step=0, partial=None, bad_epochs=0 if improved else state["bad_epochs"] + 1,
                     best_val_loss=min(val_loss, state["best_val_loss"]))
        if improved:
            save_best(run, model, cfg, split, row)
        save_last(run, model, optimizer, scheduler, state, cfg)
        _report_bad_images(run, bad_paths)
        if state["bad_epochs"] >= cfg.patience:
            log.info("early stopping: val loss has not improved for %d epochs", cfg.patience)
            break
        if stop:
            rundir.write_progress(run, status="stopped", epoch=epoch, epochs=cfg.epochs)
            return {"status": "stopped", "epochs": state["epoch"], "best_val_loss": state["best_val_loss"]}

    from .evaluate import evaluate_run  # after training: best.pt on the test split
    test = evaluate_run(run, "test", workers=cfg.workers)
    log.info("test (best.pt): top-1 %.4f top-5 %.4f macro-F1 %.4f on %d images", test["top1"], test["top5"],
             test["macro_f1"], test["num_images"])
    rundir.write_progress(run, status="finished", epoch=state["epoch"], epochs=cfg.epochs, test=test)
    return {"status": "finished", "epochs": state["epoch"], "best_val_loss": state["best_val_loss"], "test": test}


def train_one_epoch(model, loader, criterion, optimizer, scaler, device, cfg, run, stop, epoch, state, bad_paths):
    """One pass of the sampler; returns the epoch's figures, or None if asked to stop (state then holds the step)."""
    model.train()
    p = state["partial"] or {"loss_sum": 0.0, "correct": 0, "seen": 0, "seconds": 0.0}
    steps = len(loader) + state["step"]
    started, last_write = time.time() - p["seconds"], 0.0
    bar = tqdm(loader, total=steps, initial=state["step"], desc=f"epoch {epoch}/{cfg.epochs}", disable=None,
               leave=False)
    for images, labels, _, bad in bar:
        bad_paths.update(loader.dataset.paths[i] for i in bad)
        if images is not None:
            images = images.to(device, non_blocking=True)
            labels = labels.to(device, non_blocking=True)
            if cfg.channels_last and device.type == "cuda":
                images = images.contiguous(memory_format=torch.channels_last)
            with autocast(device, cfg.amp):
                logits = model(images)
            loss = criterion(logits, labels)
            if not torch.isfinite(loss):
                raise TrainingError(f"loss became {loss.item()} at epoch {epoch} step {state['step'] + 1}; "
                                    f"last.pt keeps the last good state. Try a smaller --lr.")
            optimizer.zero_grad(set_to_none=True)
            scaler.scale(loss).backward()
            scaler.step(optimizer)
            scaler.update()
            p["loss_sum"] += loss.item() * len(labels)
            p["correct"] += (logits.argmax(1) == labels).sum().item()
            p["seen"] += len(labels)
        state["step"] += 1
        p["seconds"] = time.time() - started
        rate = p["seen"] / max(p["seconds"], 1e-9)
        running_loss, running_acc = p["loss_sum"] / max(p["seen"], 1), p["correct"] / max(p["seen"], 1)
        bar.set_postfix(loss=f"{running_loss:.4f}", acc=f"{running_acc:.3f}", img_s=f"{rate:.1f}")
        if time.time() - last_write >= 1.0 or state["step"] == steps:
            last_write = time.time()
            eta = (steps - state["step"]) * p["seconds"] / max(state["step"], 1)
            rundir.write_progress(run, status="running", epoch=epoch, epochs=cfg.epochs, step=state["step"],
                                  steps=steps, running_loss=running_loss, running_acc=running_acc,
                                  images_per_sec=rate, eta_seconds=eta)
        if stop and state["step"] < steps:
            state["partial"] = p
            bar.close()
            return None
    bar.close()
    return {"train_loss": p["loss_sum"] / max(p["seen"], 1), "train_acc": p["correct"] / max(p["seen"], 1),
            "seconds": round(p["seconds"], 2)}


@torch.no_grad()
def validate(model, loader, criterion, device, cfg) -> tuple[float, float]:
    """Mean focal loss and top-1 accuracy over a split."""
    model.eval()
    loss_sum, correct, seen = 0.0, 0, 0
    for images, labels, _, _ in loader:
        if images is None:
            continue
        images, labels = images.to(device, non_blocking=True), labels.to(device, non_blocking=True)
        with autocast(device, cfg.amp):
            logits = model(images)
        loss_sum += criterion(logits, labels).item() * len(labels)
        correct += (logits.argmax(1) == labels).sum().item()
        seen += len(labels)
    return loss_sum / max(seen, 1), correct / max(seen, 1)


def save_last(run: Path, model, optimizer, scheduler, state: dict, cfg: TrainConfig) -> None:
    save_checkpoint({"model": model.state_dict(), "optimizer": optimizer.state_dict(),
                     "scheduler": scheduler.state_dict(), "rng": torch.get_rng_state(),
                     "config": cfg.to_dict(), "labels": rundir.label_names(run), **state}, run / "last.pt")


def save_best(run: Path, model, cfg: TrainConfig, split: Split, row: dict) -> None:
    """Weights plus what a predictor needs to stand alone: config, class names, the epoch's figures."""
    save_checkpoint({"model": model.state_dict(), "config": cfg.to_dict(),
                     "labels": [c["name"] for c in split.class_info], "metrics": row}, run / "best.pt")


def _report_bad_images(run: Path, bad_paths: set[str]) -> None:
    if not bad_paths:
        return
    (run / "bad_images.txt").write_text("".join(p + "\n" for p in sorted(bad_paths)))
    log.warning("%d unreadable images skipped (listed in bad_images.txt), e.g. %s", len(bad_paths),
                ", ".join(sorted(bad_paths)[:3]))


def _log_to(path: Path) -> logging.Handler:
    handler = logging.FileHandler(path)
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s", "%Y-%m-%d %H:%M:%S"))
    log.addHandler(handler)
    log.setLevel(logging.INFO)
    return handler
