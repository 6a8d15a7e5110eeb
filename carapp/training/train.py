"""Training with the paper's recipe, resumable at any step.

    python -m carapp train --data ROOT --run-dir checkpoints/run1 [--preset demo] [--epochs N] ...
    python -m carapp train --resume checkpoints/run1 [--epochs N]
    torchrun --nproc_per_node=4 -m carapp train --data ROOT --run-dir checkpoints/run1   # DistributedDataParallel

A STOP file in the run directory, SIGINT or SIGTERM finishes the current step, saves last.pt and exits cleanly.
"""
from __future__ import annotations

import logging
import os
import shutil
import signal
import threading
import time
from pathlib import Path

import torch
from tqdm import tqdm

from .. import rundir
from ..checkpoint import load_checkpoint, save_checkpoint
from ..config import TrainConfig
from ..dataset.health import duplicate_groups
from ..dataset.index import index_dataset
from ..dataset.split import Split, choose_split
from ..exclusions import read_exclusions
from ..runtime import init_distributed
from .autobatch import resolve_batch_size
from .optim import freeze_trunk_statistics, make_scheduler
from .tracking import Tracker, check_trackers, open_tracker
from .trainer import Meter, Trainer

log = logging.getLogger("carapp")


class TrainingError(RuntimeError):
    """Training cannot go on; the message says why and what to do."""


class StopSignal:
    """True once SIGINT/SIGTERM arrived or a STOP file appeared in the run directory."""

    def __init__(self, run: Path):
        self.run, self.signalled, self.previous = run, False, {}
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGINT, signal.SIGTERM):
                self.previous[sig] = signal.signal(sig, self._on_signal)

    def __enter__(self) -> "StopSignal":
        return self

    def __exit__(self, *exc) -> None:
        """Give the signals back (an in-process caller keeps its Ctrl-C)."""
        for sig, handler in self.previous.items():
            signal.signal(sig, handler)

    def _on_signal(self, signum, frame):
        log.info("signal %s: stopping after this step", signal.Signals(signum).name)
        self.signalled = True

    def __bool__(self) -> bool:
        return self.signalled or rundir.stop_requested(self.run)


def train(cfg: TrainConfig, run_dir: str | Path, resume: bool = False, epochs: int | None = None,
          split: Split | None = None) -> dict:
    """Train (or resume) the run in run_dir; returns {"status", "epochs", "best_val_loss", "test": ...}.

    `split` freezes a given split into a fresh run (the sweep shares one); by default the run makes its own.
    Under torchrun every rank calls this; rank 0 alone writes the run directory.
    """
    run = Path(run_dir)
    if resume and not run.is_dir():
        raise TrainingError(f"run directory {run} does not exist: nothing to resume")
    check_trackers(cfg.log)  # before a long index or hash (a resume's own config is checked when opened)
    dist = init_distributed()
    handler = lock = tracker = None
    level = log.level  # train.log needs INFO; a Python caller's own logging gets its level back afterwards
    made_here = False  # a folder this call created holds nothing of value until the run is prepared
    try:
        if dist.main:
            made_here = not run.exists()
            lock, handler = take_over(run)
            prepared = _prepare(cfg, run, resume, epochs, split)
            tracker = open_tracker(prepared[0], run)  # a missing package fails here: before training, no junk run
            made_here = False
        else:
            log.setLevel(logging.WARNING)
        dist.barrier()  # the other ranks read what rank 0 froze: one config, one split
        cfg, split, ckpt = prepared if dist.main else _read_prepared(run)
        trainer = Trainer(cfg, split, ckpt, dist)
        with StopSignal(run) as stop:
            return fit(trainer, run, stop, tracker)
    except torch.cuda.OutOfMemoryError:
        smaller = max(1, cfg.batch_size // 2) if isinstance(cfg.batch_size, int) else 32
        message = (f"GPU out of memory at batch size {cfg.batch_size}: resume with a smaller batch, e.g. "
                   f"--batch-size {smaller} (last.pt keeps the last finished epoch)")
        if dist.main:
            rundir.write_progress(run, status="failed", error=message)
        raise TrainingError(message) from None
    except Exception as exc:
        if dist.main and not isinstance(exc, rundir.RunLocked) and not made_here:
            rundir.write_progress(run, status="failed", error=str(exc))
        raise
    finally:
        if tracker:
            tracker.close()
        if handler:
            log.removeHandler(handler)
            handler.close()
        log.setLevel(level)
        if lock:
            lock.unlink(missing_ok=True)
        if made_here:  # failed before anything worth keeping (no data, bad options): leave no junk run behind
            shutil.rmtree(run, ignore_errors=True)
        dist.close()


def take_over(run: Path) -> tuple[Path, logging.Handler]:
    """Rank 0 claims the run directory: its lock (taken before anything is written, so a second trainer is refused at
    once and a watcher such as the app sees this process as the run's trainer before the slow set-up), a fresh STOP
    state, a "preparing" progress line and train.log."""
    run.mkdir(parents=True, exist_ok=True)
    lock = rundir.acquire_lock(run)
    # A STOP is stale (pressed for an earlier trainer, or touched before this one started) unless it names this very
    # process: the app records a job's PID before the job starts, and its Stop can come while PyTorch is imported.
    if rundir.stop_target(run) != str(os.getpid()):
        (run / "STOP").unlink(missing_ok=True)
    rundir.write_progress(run, status="running", phase="preparing")
    return lock, _log_to(run / "train.log")


def _prepare(cfg: TrainConfig, run: Path, resume: bool, epochs: int | None, split: Split | None):
    """Fresh run: index, split and freeze. Resume: read back config, split and last.pt."""
    rundir.remove_stale_temp_files(run)
    if resume:
        if rundir.read_json(run / "config.json") is None or not (run / "split.csv").is_file():
            raise TrainingError(f"{run} has no config.json and split.csv to resume from")
        cfg, split, ckpt = _read_prepared(run)  # no last.pt yet (killed in epoch 1): start over on the same split
        cfg.epochs = epochs or cfg.epochs
        rundir.truncate_metrics(run, ckpt["epoch"] if ckpt else 0)
    else:
        if (run / "last.pt").exists():
            raise TrainingError(f"{run} already holds a run: resume it with --resume, or pick a new --run-dir")
        recorded: dict = {}
        if split is None:
            split, recorded = make_run_split(cfg)
        rundir.write_split(run, split)
        resolve_batch_size(cfg, len(split.class_info))  # "auto" becomes a number before config.json freezes it
        rundir.truncate_metrics(run, 0)  # a run that died before its first last.pt may have left epoch lines
        (run / rundir.STEPS_FILE).unlink(missing_ok=True)  # ... and step lines
        ckpt = None
    if resume:  # what the first start recorded besides the config (the photos it left out) stays
        old = rundir.read_json(run / "config.json") or {}
        recorded = {k: v for k, v in old.items() if k not in cfg.to_dict()}
    rundir.write_json(run / "config.json", cfg.to_dict() | recorded)
    return cfg, split, ckpt


def make_run_split(cfg: TrainConfig) -> tuple[Split, dict]:
    """A new run's split: the dataset less the exclusion list, duplicate groups kept together if asked; and what
    config.json records of it besides the config (the excluded photos, the groups kept together)."""
    index = index_dataset(cfg.data, cfg.format)
    recorded: dict = {}
    if cfg.exclude:
        excluded = read_exclusions(cfg.exclude)
        index = index.without(excluded)
        recorded["excluded"] = [{"path": p, "reason": r} for p, r in sorted(excluded.items())]
        log.info("left out %d photos listed in %s", len(excluded), cfg.exclude)
    groups = None
    if cfg.group_duplicates:
        groups = duplicate_groups(index)
        recorded["duplicate_groups"] = len(groups)
        log.info("kept %d groups of duplicate photos (%d photos) in one split each", len(groups),
                 sum(map(len, groups)))
    return choose_split(index, cfg.split, cfg.min_images, cfg.val_frac, cfg.test_frac, cfg.seed, groups), recorded


def _read_prepared(run: Path):
    cfg = TrainConfig.from_dict(rundir.read_json(run / "config.json"))
    ckpt = load_checkpoint(run / "last.pt") if (run / "last.pt").is_file() else None
    return cfg, rundir.read_run_split(run, cfg), ckpt


def fit(trainer: Trainer, run: Path, stop: StopSignal, tracker: Tracker | None) -> dict:
    """Epochs until the last, early stopping or a stop request: train, validate, step the schedule, record, save.
    `tracker` (rank 0's, when --log asks) gets each epoch's row and the test figures."""
    cfg, split, dist, state, bad_paths = trainer.cfg, trainer.split, trainer.dist, trainer.state, set()
    while state["epoch"] < cfg.epochs:
        epoch = state["epoch"] + 1
        trainer.sampler.set_epoch(epoch, state["step"] * cfg.batch_size)
        if state["step"] == 0:  # augmentation and dropout seeds follow the epoch; mid-epoch, last.pt's RNG goes on
            torch.manual_seed(cfg.seed * 1_000_003 + epoch + 7919 * dist.rank)
        if cfg.freeze_epochs and epoch in (1, cfg.freeze_epochs + 1) and dist.main:
            log.info("epoch %d: %s", epoch, "head only, trunk frozen" if epoch <= cfg.freeze_epochs
                     else "trunk unfrozen, the whole network trains")
        result = train_one_epoch(trainer, run, stop, epoch, bad_paths)
        if result is None:  # stopped mid-epoch: everything needed to continue is in last.pt
            return stopped(trainer, run, epoch)
        val_loss, val_acc, chosen, weights_row = validate_weights(trainer)
        if cfg.schedule == "plateau":
            trainer.scheduler.step(val_loss)  # the same all-reduced figure on every rank: the same decisions
        row = {"epoch": epoch, **result, "val_loss": val_loss, "val_acc": val_acc,
               "lr": trainer.optimizer.param_groups[0]["lr"], **weights_row}
        improved = val_loss < state["best_val_loss"]
        state.update(epoch=epoch, step=0, partial=None, bad_epochs=0 if improved else state["bad_epochs"] + 1,
                     best_val_loss=min(val_loss, state["best_val_loss"]))
        if dist.main:
            rundir.append_metrics(run, row)
            tracker.epoch(row)
            log.info("epoch %3d/%d | train loss %.4f acc %.4f | val loss %.4f acc %.4f | lr %.1e | %.1f s",
                     epoch, cfg.epochs, row["train_loss"], row["train_acc"], val_loss, val_acc, row["lr"],
                     row["seconds"])
            if improved:
                save_best(run, chosen, cfg, split, row)
            save_last(run, trainer)
            _report_bad_images(run, bad_paths)
        if state["bad_epochs"] >= cfg.patience:
            log.info("early stopping: val loss has not improved for %d epochs", cfg.patience)
            break
        if dist.max([float(bool(stop))], trainer.device)[0]:
            return stopped(trainer, run, epoch, saved=True)
    test = finish(run, cfg, state["epoch"], tracker) if dist.main else None
    dist.barrier()
    return {"status": "finished", "epochs": state["epoch"], "best_val_loss": state["best_val_loss"], "test": test}


def finish(run: Path, cfg: TrainConfig, epochs_done: int, tracker: Tracker) -> dict:
    """After training, on one process: calibrate best.pt on val, then measure it on the test split."""
    from ..evaluation.answers import threshold_note
    from ..evaluation.calibrate import calibrate_run
    from ..evaluation.evaluate import evaluate_run
    calibration = calibrate_run(run, workers=cfg.workers)
    log.info("calibrated: temperature %.3f, val ECE %.4f -> %.4f; answer thresholds model %.3f make %.3f",
             calibration["temperature"], calibration["ece_before"], calibration["ece_after"],
             calibration["thresholds"]["model"], calibration["thresholds"]["make"])
    if note := threshold_note(calibration):
        log.info(note)
    test = evaluate_run(run, "test", workers=cfg.workers)
    tracker.test(test)
    log.info("test (best.pt): top-1 %.4f top-5 %.4f macro-F1 %.4f make top-1 %.4f ECE %.4f on %d images; "
             "%.1f%% answered with a model%s", test["top1"], test["top5"], test["macro_f1"], test["make_top1"],
             test["ece"], test["num_images"], 100 * test["coverage"],
             "" if test["selective_accuracy"] is None else f", {test['selective_accuracy']:.1%} of those right")
    rundir.write_progress(run, status="finished", epoch=epochs_done, epochs=cfg.epochs, test=test)
    return test


def stopped(trainer: Trainer, run: Path, epoch: int, saved: bool = False) -> dict:
    state = trainer.state
    if trainer.dist.main:
        if not saved:
            save_last(run, trainer)
        rundir.write_progress(run, status="stopped", epoch=epoch, epochs=trainer.cfg.epochs)
        where = f"in epoch {epoch} at step {state['step']}" if state["step"] else f"after epoch {state['epoch']}"
        log.info("stopped %s; resume with: python -m carapp train --resume %s", where, run)
    return {"status": "stopped", "epochs": state["epoch"], "best_val_loss": state["best_val_loss"]}


def train_one_epoch(trainer: Trainer, run: Path, stop: StopSignal, epoch: int, bad_paths: set[str]) -> dict | None:
    """One pass of the sampler; returns the epoch's figures, or None if asked to stop (trainer.state holds the
    step). A batch size found by --batch-size auto is halved on a CUDA out-of-memory error, and the pass goes on
    from the last good step."""
    while True:
        try:
            return _train_pass(trainer, run, stop, epoch, bad_paths)
        except torch.cuda.OutOfMemoryError:
            cfg = trainer.cfg
            if not (cfg.batch_size_auto and trainer.dist.world == 1 and cfg.batch_size % 2 == 0):
                raise  # under torchrun the other ranks wait in an all-reduce: no rank may change course alone
            halve_batch(trainer, run, epoch)


def halve_batch(trainer: Trainer, run: Path, epoch: int) -> None:
    """Half the batch, twice the steps: the same samples per epoch, the epoch's position kept in samples (step k of
    size b is step 2k of size b/2), the loaders and a cosine schedule rebuilt, config.json rewritten (resume exact)."""
    cfg, state = trainer.cfg, trainer.state
    trainer.optimizer.zero_grad(set_to_none=True)
    torch.cuda.empty_cache()
    old = cfg.batch_size
    cfg.batch_size //= 2
    if cfg.steps_per_epoch:
        cfg.steps_per_epoch *= 2
    state["step"] *= 2
    trainer.build_loaders()
    trainer.sampler.set_epoch(epoch, state["step"] * cfg.batch_size)
    if cfg.schedule == "cosine":  # stepped per optimizer step: its count doubles with the steps
        done = trainer.scheduler.last_epoch
        trainer.scheduler = make_scheduler(trainer.optimizer, cfg, len(trainer.train_loader) + state["step"])
        trainer.scheduler.last_epoch = 2 * done - 1
        trainer.scheduler.step()  # the lr of step 2 * done, where the run is
    rundir.write_json(run / "config.json", (rundir.read_json(run / "config.json") or {}) | cfg.to_dict())
    log.warning("GPU out of memory at batch size %d in epoch %d: going on at batch size %d from step %d", old,
                epoch, cfg.batch_size, state["step"] + 1)


def _train_pass(trainer: Trainer, run: Path, stop: StopSignal, epoch: int, bad_paths: set[str]) -> dict | None:
    cfg, dist, state, loader = trainer.cfg, trainer.dist, trainer.state, trainer.train_loader
    trainer.model.train()
    frozen = epoch <= cfg.freeze_epochs  # a function of the epoch alone: a resumed run freezes the same epochs
    if frozen:
        freeze_trunk_statistics(trainer.net)
    meter = Meter(**(state["partial"] or {}))  # a pass stopped midway goes on with its sums
    steps = len(loader) + state["step"]
    started, last_write = time.time() - meter.seconds, 0.0
    bar = tqdm(loader, total=steps, initial=state["step"], desc=f"epoch {epoch}/{cfg.epochs}",
               disable=None if dist.main else True, leave=False)
    for images, labels, _, bad in bar:
        bad_paths.update(loader.dataset.paths[i] for i in bad)
        weight = 1.0
        if images is None:  # a batch of unreadable files: a zero-weight step keeps every rank in lockstep
            images, labels, weight = torch.zeros(1, 3, cfg.image_size, cfg.image_size, dtype=torch.uint8), \
                torch.zeros(1, dtype=torch.long), 0.0
        negatives = trainer.negatives.batch(epoch, state["step"]) if trainer.negatives else None
        logits, labels, loss = trainer.forward(images, labels, negatives=negatives)
        loss = loss * weight
        stop_now, nonfinite = dist.max([float(bool(stop)), float(not torch.isfinite(loss))], trainer.device)
        if nonfinite:
            raise TrainingError(f"loss became {loss.item()} at epoch {epoch} step {state['step'] + 1}; "
                                f"last.pt keeps the last good state. Try a smaller --lr.")
        trainer.step(loss, frozen)
        if weight:
            meter.update(loss, logits, labels)
        state["step"] += 1
        meter.seconds = time.time() - started
        rate = meter.seen * dist.world / max(meter.seconds, 1e-9)
        bar.set_postfix(loss=f"{meter.loss:.4f}", acc=f"{meter.acc:.3f}", img_s=f"{rate:.1f}")
        if dist.main and (time.time() - last_write >= 1.0 or state["step"] == steps):
            last_write = time.time()
            eta = (steps - state["step"]) * meter.seconds / max(state["step"], 1)
            rundir.write_progress(run, status="running", epoch=epoch, epochs=cfg.epochs, step=state["step"],
                                  steps=steps, running_loss=meter.loss, running_acc=meter.acc,
                                  images_per_sec=rate, eta_seconds=eta)
            rundir.append_step(run, {"epoch": epoch, "step": state["step"], "steps": steps, "loss": meter.loss,
                                     "acc": meter.acc})
        if stop_now and state["step"] < steps:
            state["partial"] = meter.state_dict()
            bar.close()
            return None
    bar.close()
    total = meter.summed(dist, trainer.device)
    return {"train_loss": total.loss, "train_acc": total.acc, "seconds": round(meter.seconds, 2)}


def validate_weights(trainer: Trainer) -> tuple[float, float, torch.nn.Module, dict]:
    """(val loss, val acc, the weights that scored them, extra metrics fields). With EMA on, the raw and the averaged
    weights are both validated and the better val loss wins: it drives the schedule, early stopping and best.pt."""
    val_loss, val_acc = validate(trainer)
    if trainer.ema is None:
        return val_loss, val_acc, trainer.net, {}
    ema_loss, ema_acc = validate(trainer, trainer.ema.module)
    use_ema = ema_loss < val_loss
    row = {"raw_val_loss": val_loss, "ema_val_loss": ema_loss, "val_weights": "ema" if use_ema else "raw"}
    if use_ema:
        return ema_loss, ema_acc, trainer.ema.module, row
    return val_loss, val_acc, trainer.net, row


@torch.no_grad()
def validate(trainer: Trainer, net: torch.nn.Module | None = None) -> tuple[float, float]:
    """Mean focal loss and top-1 accuracy of `net` (the raw weights by default) over the validation split (summed
    over ranks)."""
    trainer.model.eval()
    net = net or trainer.net
    net.eval()
    meter = Meter()
    for images, labels, _, _ in trainer.val_loader:
        if images is not None:
            logits, labels, loss = trainer.forward(images, labels, net)
            meter.update(loss, logits, labels)
    total = meter.summed(trainer.dist, trainer.device)
    return total.loss, total.acc


def save_last(run: Path, trainer: Trainer) -> None:
    save_checkpoint({**trainer.checkpoint(), "config": trainer.cfg.to_dict(), "labels": rundir.label_names(run)},
                    run / "last.pt")


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
