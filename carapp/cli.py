"""Command line: python -m carapp {demo-data,stats,health,train,train-detector,lr-find,evaluate,calibrate,predict,
analyze,analyze-ray,summarize,export,runs,push,cache,sweep} --help

Human-readable progress goes to stderr; with --json, stdout holds exactly one JSON document.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import sys
from pathlib import Path

from .analysis.trends import PERIODS, TIME_SOURCES
from .cli_text import HUMAN
from .config import PRESETS, TrainConfig, make_config, option_flag, train_options

log = logging.getLogger("carapp")

# train options lr-find has no use for: it runs its own number of steps, once, and logs nowhere
LR_FIND_SKIPS = ("steps_per_epoch", "epochs", "patience", "lr_patience", "lr_factor", "log")


def add_train_options(p: argparse.ArgumentParser, skip: tuple[str, ...] = ()) -> None:
    """One flag per training option (config.train_options: TrainConfig's declaration), all defaulting to None so
    that presets and resumes can tell "not given"; `skip` names fields."""
    p.add_argument("--preset", default="paper", choices=list(PRESETS), help="recipe preset (default paper)")
    for f in train_options():
        if f.name in skip:
            continue
        how, default = f.metadata, f.default
        if isinstance(default, bool):  # a switch: --compile turns on what is off, --no-amp off what is on
            p.add_argument(option_flag(f), dest=f.name, action="store_false" if default else "store_true",
                           default=None, help=how["help"])
            continue
        text = how["help"] if "(default" in how["help"] else f"{how['help']} (default {default:g})" \
            if isinstance(default, float) else f"{how['help']} (default {default if default != '' else 'none'})"
        alone = {"nargs": "?", "const": how["const"]} if how["const"] is not None else {}  # --ema alone
        p.add_argument(option_flag(f), dest=f.name, type=how["parse"] or type(default), default=None,
                       metavar=how["metavar"], help=text, **alone)


def given_options(args, skip: tuple[str, ...] = ()) -> dict:
    """The training options given on the command line (None: not given), less those named in skip."""
    names = [f.name for f in train_options()] + ["data"]
    return {n: getattr(args, n) for n in names if n not in skip and getattr(args, n, None) is not None}


def config_from_args(args, skip: tuple[str, ...] = ()) -> TrainConfig:
    return make_config(args.preset, **given_options(args, skip))


def add_period(p: argparse.ArgumentParser) -> None:
    p.add_argument("--period", default=None, choices=list(PERIODS), help="count per week, month or quarter of the "
                   "photos' times too (a period column in summary.csv; a trend section in the report)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m carapp", description="Car make/model classification "
                                     "with ResNet and focal loss (CompCars).")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("demo-data", help="write the synthetic demo dataset (CompCars layout)")
    p.add_argument("--out", required=True, help="folder to write (new or empty; --force replaces an earlier demo)")
    p.add_argument("--seed", type=int, default=0, help="seed of the drawings (default 0)")
    p.add_argument("--scale", type=float, default=1.0, help="multiply the per-class image counts (default 1)")
    p.add_argument("--force", action="store_true", help="replace a demo dataset written there before")
    p.add_argument("--scenes", type=int, default=0, help="also write this many multi-car scenes (0-4 demo cars "
                   "each, with their true boxes and classes in scenes/scenes.json; default 0)")

    p = sub.add_parser("stats", help="dataset statistics")
    p.add_argument("--data", required=True, help="dataset root")
    p.add_argument("--format", default="auto", help="dataset format: auto | compcars | sv | stanford | folder "
                   "(default auto)")
    p.add_argument("--min-images", type=int, default=None,
                   help="keep classes with at least N images (default floor(mean); 0 keeps all)")
    p.add_argument("--seed", type=int, default=0, help="seed of the split (default 0)")
    p.add_argument("--verify", action="store_true", help="also open every image to find unreadable ones")
    p.add_argument("--split", default="paper", choices=["paper", "official"], help="paper (default): the paper's "
                   "70/15/15 of the kept classes | official: the dataset's own train/test lists, val carved from train")
    p.add_argument("--group-duplicates", action="store_true",
                   help="show the split train --group-duplicates makes: duplicate groups kept together (hashes the "
                   "dataset once, cached)")

    p = sub.add_parser("health", help="duplicates, leaks, unreadable, tiny and greyscale photos, boxes outside")
    p.add_argument("--data", required=True, help="dataset root")
    p.add_argument("--format", default="auto", help="dataset format: auto | compcars | sv | folder (default auto)")
    p.add_argument("--run", help="a run of this dataset: also list the duplicate groups its split puts on both "
                   "sides (leaks)")
    p.add_argument("--near-bits", type=int, default=6, help="pHash bits (of 64) two near duplicates may differ "
                   "in, 0..6 (default 6)")
    p.add_argument("--workers", type=int, default=None, help="hashing processes (default: all cores, up to 8)")

    p = sub.add_parser("train", help="train a run, or resume one")
    p.add_argument("--data", help="dataset root")
    p.add_argument("--run-dir", help="run directory to create (e.g. checkpoints/run1)")
    p.add_argument("--resume", metavar="DIR", help="continue the run in DIR")
    p.add_argument("--config", metavar="FILE", help="a JSON file of the run's configuration (every field of "
                   "TrainConfig, as config.json holds it): how the app hands a run over; options given too override it")
    add_train_options(p)

    p = sub.add_parser("evaluate", help="evaluate a run's best checkpoint")
    p.add_argument("--run", required=True, help="run directory")
    p.add_argument("--split", default="test", choices=["train", "val", "test"], help="split to evaluate (default test)")
    p.add_argument("--tta", action="store_true", help="average with the mirrored photo (flip test-time augmentation)")
    p.add_argument("--workers", type=int, default=2, help="data loader worker processes (default 2)")
    p.add_argument("--device", default="auto", help="auto | cpu | cuda | mps (default auto)")
    p.add_argument("--detector", default=None, help="find each car first: a detector run (train-detector), its "
                   "checkpoint, coco, or none (default: CARAPP_DETECTOR, else none: the whole photo)")
    p.add_argument("--vehicles", action="store_true", help="with --detector coco: buses and trucks count as cars")
    p.add_argument("--scenes", help="with --detector: a folder of scenes with true boxes (demo-data --scenes; "
                   "default: the run's dataset's scenes/)")

    p = sub.add_parser("calibrate", help="fit the temperature, answer thresholds and 'not a car' score on val")
    p.add_argument("--run", required=True, help="run directory with best.pt")
    p.add_argument("--target-accuracy", type=float, default=0.95,
                   help="accuracy the confident answers must reach on the validation split (default 0.95)")
    p.add_argument("--workers", type=int, default=2, help="data loader worker processes (default 2)")
    p.add_argument("--device", default="auto", help="auto | cpu | cuda | mps (default auto)")

    p = sub.add_parser("predict", help="classify images")
    p.add_argument("images", nargs="+", metavar="IMAGE", help="image files (JPEG, PNG, WebP, ...)")
    p.add_argument("--run", required=True, help="run directory, checkpoint file, exported folder, or hf://owner/name")
    p.add_argument("--top-k", type=int, default=5, help="how many classes and makes to list (default 5)")
    p.add_argument("--tta", action="store_true", help="average with the mirrored photo (flip test-time augmentation)")
    p.add_argument("--cam", metavar="OUT_DIR", help="write one Grad-CAM heatmap PNG per image here")
    p.add_argument("--cam-method", default="gradcam", help="gradcam (one forward pass) | gradcam++ | scorecam | "
                   "eigencam | layercam")
    p.add_argument("--batch-size", type=int, default=32, help="images per forward pass (default 32)")
    p.add_argument("--device", default="auto", help="auto | cpu | cuda | mps (default auto)")
    p.add_argument("--detector", default=None, help="find each car first: a detector run (train-detector), its "
                   "checkpoint, coco, or none (default: CARAPP_DETECTOR, else none: the whole photo)")
    p.add_argument("--vehicles", action="store_true", help="with --detector coco: buses and trucks count as cars")

    p = sub.add_parser("analyze", help="analyse a photo collection: makes and models per group, with intervals")
    p.add_argument("sources", nargs="+", metavar="SOURCE", help="a folder (recursive), a .zip, or a list of paths")
    # --model too: under torchrun, whose parser takes --run for its own --run-path
    p.add_argument("--run", "--model", dest="run", required=True,
                   help="run directory, checkpoint file, exported folder, or hf://owner/name (alias --model)")
    p.add_argument("--out", required=True, help="folder for predictions.csv, summary.csv and report.html; rerun "
                   "with the same folder to resume")
    p.add_argument("--group-by", default="folder", help="folder (first-level sub-folder; default) | none | a CSV "
                   "file with path,group")
    p.add_argument("--batch-size", type=int, default=32, help="images per forward pass (default 32)")
    p.add_argument("--workers", type=int, default=2, help="decoding processes (default 2)")
    p.add_argument("--device", default="auto", help="auto | cpu | cuda | mps (default auto)")
    p.add_argument("--engine", default="auto", choices=["auto", "torch", "onnx", "int8"],
                   help="auto: ONNX Runtime on a CPU, PyTorch on a GPU; int8: quantised ONNX (CPU, fastest)")
    p.add_argument("--force", action="store_true", help="replace the results of another model in --out")
    p.add_argument("--detector", default=None, help="one row per car: a detector run (train-detector), its "
                   "checkpoint, coco, or none (default: CARAPP_DETECTOR, else none: one row per photo)")
    p.add_argument("--vehicles", action="store_true", help="with --detector coco: buses and trucks count as cars")
    p.add_argument("--time", default="list", choices=list(TIME_SOURCES), help="when each photo was taken: list (a "
                   "list CSV's time column; default) | exif (that, else the photo's EXIF DateTimeOriginal)")
    add_period(p)

    p = sub.add_parser("analyze-ray", help='analyze on a Ray cluster (pip install "ray[data]"): Parquet rows, then '
                       "summary.csv and report.html")
    p.add_argument("sources", nargs="+", metavar="SOURCE", help="a folder (recursive), a .zip, or a list of paths")
    p.add_argument("--run", "--model", dest="run", required=True, help="run directory, checkpoint file or export")
    p.add_argument("--out", required=True, help="folder: predictions/*.parquet, summary.csv, report.html")
    p.add_argument("--detector", default=None, help="one row per car: a detector run, its checkpoint, or coco")
    p.add_argument("--group-by", default="folder", help="folder (default) | none | a CSV file with path,group")
    p.add_argument("--time", default="list", choices=list(TIME_SOURCES), help="list (default) | exif")
    add_period(p)
    p.add_argument("--concurrency", type=int, default=2, help="model replicas (Ray actors; default 2)")
    p.add_argument("--num-gpus", type=float, default=0, help="GPUs per replica (default 0: CPUs)")
    p.add_argument("--batch-size", type=int, default=32, help="photos per call of a replica (default 32)")
    p.add_argument("--engine", default="auto", choices=["auto", "torch", "onnx"], help="auto: ONNX on CPUs")
    p.add_argument("--address", default=None, help="a running Ray cluster (default: start a local one)")
    p.add_argument("--force", action="store_true", help="replace OUT/predictions")

    p = sub.add_parser("summarize", help="summary.csv and report.html from predictions rows (CSV or Parquet)")
    p.add_argument("predictions", nargs="+", metavar="PREDICTIONS", help="predictions.csv or Parquet files, globs, "
                   "or folders holding them (a Ray Data output folder)")
    p.add_argument("--out", required=True, help="folder for summary.csv and report.html")
    add_period(p)

    p = sub.add_parser("export", help="export a run as safetensors or ONNX with config, labels and a model card")
    p.add_argument("--run", required=True, help="run directory (its best.pt is exported)")
    p.add_argument("--format", required=True, choices=["safetensors", "onnx"],
                   help="safetensors: weights for PyTorch; onnx: a graph for ONNX Runtime and other engines")
    p.add_argument("--out", required=True, help="folder to write (model, config.json, labels.json, README.md)")

    p = sub.add_parser("push", help="export a run and upload it to the Hugging Face Hub (HF_TOKEN)")
    p.add_argument("--run", required=True, help="run directory (its best.pt is uploaded)")
    p.add_argument("--repo", required=True, help="Hub model repository, owner/name (created if missing)")
    p.add_argument("--private", action="store_true", help="create the repository as private")

    p = sub.add_parser("cache", help="write a pre-resized copy of a dataset that training then reads")
    p.add_argument("--data", required=True, help="dataset root")
    p.add_argument("--short-side", type=int, default=256, help="short side of the copies in pixels (default 256)")
    p.add_argument("--workers", type=int, default=None, help="processes (default: all cores)")

    p = sub.add_parser("train-detector", help="train a car detector from the dataset's own boxes (the demo set's, "
                       "CompCars label files)")
    p.add_argument("--data", help="dataset root (not with --resume)")
    p.add_argument("--format", default=None, help="dataset format: auto | compcars | sv (default auto)")
    p.add_argument("--run-dir", required=True, help="the detector's run directory")
    p.add_argument("--resume", action="store_true", help="go on with the run in --run-dir where it stopped")
    p.add_argument("--preset", default="", choices=["", "demo"], help="demo: the demo set on a CPU in minutes")
    p.add_argument("--epochs", type=int, default=None, help="epochs (default 30; demo 6)")
    p.add_argument("--steps-per-epoch", type=int, default=None, help="steps per epoch (default 100; demo 40)")
    p.add_argument("--batch-size", type=int, default=None, help="mosaics per step (default 8)")
    p.add_argument("--lr", type=float, default=None, help="AdamW learning rate (default 2e-3)")
    p.add_argument("--seed", type=int, default=None, help="seed of the held-out photos and the mosaics (default 0)")
    p.add_argument("--negatives", default=None, help="photos without a car for a quarter of the mosaic cells: a "
                   "folder, generated (default), or '' for none")

    p = sub.add_parser("runs", help="list the runs of a runs folder, as the app does: status, epochs, best val acc")
    p.add_argument("--dir", default="checkpoints", help="the runs folder (default checkpoints; the app's "
                   "CARAPP_RUNS_DIR)")

    p = sub.add_parser("sweep", help="the paper's lr x dropout grid (Table 7)")
    p.add_argument("--data", required=True, help="dataset root")
    p.add_argument("--out", required=True, help="folder for one run per cell, results.csv and results.md")
    p.add_argument("--lr", required=True, help="comma-separated learning rates, e.g. 1e-4,1e-3,1e-2")
    p.add_argument("--dropout", required=True, help="comma-separated dropout rates, e.g. 0.2,0.3,0.4")
    add_train_options(p, skip=("lr", "dropout"))

    p = sub.add_parser("lr-find", help="learning-rate range test on the configured data and model (writes no run)")
    p.add_argument("--data", required=True, help="dataset root")
    p.add_argument("--steps", type=int, default=100, help="steps of the exponential sweep at most (default 100)")
    p.add_argument("--start-lr", type=float, default=1e-7, help="first learning rate of the sweep (default 1e-07)")
    p.add_argument("--end-lr", type=float, default=10.0, help="last learning rate of the sweep (default 10)")
    add_train_options(p, skip=LR_FIND_SKIPS)

    for p in sub.choices.values():
        p.add_argument("--json", action="store_true", help="print one JSON object on stdout")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    # carapp's own progress at INFO; libraries only warn (the ONNX exporter's optimiser logs its passes at INFO)
    logging.basicConfig(level=logging.WARNING, format="%(message)s", stream=sys.stderr)
    log.setLevel(logging.INFO)
    try:
        with _stdout_to_stderr(args.json):  # --json: nothing but the JSON value reaches stdout
            check_paths(args)
            result, code = COMMANDS[args.command](args)
    except Exception as exc:  # known failures carry their own message: show it without a traceback
        if not isinstance(exc, (ValueError, OSError)) and not _known_failure(exc):
            raise
        log.error("error: %s", exc)
        result, code = {"error": str(exc)}, 2
        if not args.json:
            return code
    if os.environ.get("RANK", "0") != "0":  # under torchrun, rank 0 speaks for the run
        return code
    if args.json:
        print(json.dumps(result, indent=2, default=str), flush=True)
    elif result is not None and args.command in HUMAN:
        print(HUMAN[args.command](result), flush=True)
    return code


def _known_failure(exc: Exception) -> bool:
    """Imported only when needed: the training modules import PyTorch (seconds), which a bad path never needs."""
    from .rundir import RunLocked
    from .training.tracking import TrackerMissing
    from .training.train import TrainingError
    return isinstance(exc, (TrainingError, RunLocked, TrackerMissing))


# what a missing path given to an option is called; the commands that read it say the same when they open it
MISSING = {"data": "dataset folder not found: {}", "run": "checkpoint not found: {}",
           "resume": "run directory {} does not exist: nothing to resume"}


def check_paths(args: argparse.Namespace) -> None:
    """A path that does not exist is refused before PyTorch is imported: a typo costs a tenth of a second, not ten."""
    for name, message in MISSING.items():
        value = getattr(args, name, None)
        if isinstance(value, str) and value and "://" not in value and not Path(value).exists():
            raise FileNotFoundError(message.format(value))


@contextlib.contextmanager
def _stdout_to_stderr(active: bool):
    """Point file descriptor 1 at stderr for the command's duration: library prints and C-level output (torch.onnx,
    onnxruntime) then cannot land before the JSON value."""
    if not active:
        yield
        return
    sys.stdout.flush()
    saved = os.dup(1)
    os.dup2(2, 1)
    try:
        with contextlib.redirect_stdout(sys.stderr):
            yield
    finally:
        sys.stdout.flush()
        os.dup2(saved, 1)
        os.close(saved)


def cmd_demo_data(args):
    from .dataset.demo import make_demo_dataset
    from .dataset.scenes import make_demo_scenes
    if args.scenes < 0:
        raise ValueError(f"--scenes must be 0 or more, not {args.scenes}")
    result = make_demo_dataset(args.out, seed=args.seed, scale=args.scale, replace=args.force)
    if args.scenes:
        scenes = make_demo_scenes(Path(args.out) / "scenes", args.scenes, seed=args.seed)
        result |= {"scenes": len(scenes), "scene_cars": sum(len(s["cars"]) for s in scenes),
                   "scenes_dir": str(Path(args.out) / "scenes")}
    return result, 0


def cmd_stats(args):
    from .dataset.index import index_dataset
    from .dataset.split import dataset_stats
    index = index_dataset(args.data, args.format)
    groups = None
    if args.group_duplicates:
        from .dataset.health import duplicate_groups
        groups = duplicate_groups(index)
    stats = dataset_stats(index, args.min_images, seed=args.seed, groups=groups, split=args.split)
    if args.verify:
        from .dataset.images import find_unreadable
        bad = find_unreadable(index)
        stats["unreadable"] = {"count": len(bad), "examples": bad[:5]}
    return stats, 0


def cmd_health(args):
    from .dataset.health import check_health
    return check_health(args.data, args.format, args.run, args.workers, args.near_bits), 0


def cmd_train(args):
    from .training.train import train
    if args.resume:
        result = train(TrainConfig(), args.resume, resume=True, epochs=args.epochs)
    elif args.config and args.run_dir:
        cfg = TrainConfig.from_dict({**json.loads(Path(args.config).read_text()), **given_options(args)})
        result = train(cfg, args.run_dir)
    elif args.data and args.run_dir:
        result = train(config_from_args(args), args.run_dir)
    else:
        raise SystemExit("train needs --data ROOT --run-dir DIR, --config FILE --run-dir DIR, or --resume DIR")
    return result, 0


def detector_of(args):
    """The --detector of a command (or CARAPP_DETECTOR), loaded; None for the whole-photo answer."""
    from .detection.model import load_detector
    return load_detector(args.detector if args.detector is not None else os.environ.get("CARAPP_DETECTOR"),
                         vehicles=args.vehicles, device=getattr(args, "device", "auto"))


def cmd_evaluate(args):
    detector = detector_of(args)
    if detector is None:
        from .evaluation.evaluate import evaluate_run
        return evaluate_run(args.run, args.split, workers=args.workers, device=args.device, tta=args.tta), 0
    from .detection.evaluate import evaluate_detector
    from .predict import Predictor
    predictor = Predictor.load(args.run, device=args.device)
    scenes = args.scenes or Path(predictor.config.get("data", ".")) / "scenes"
    return evaluate_detector(detector, scenes, predictor), 0


def cmd_calibrate(args):
    from .evaluation.calibrate import calibrate_run
    return calibrate_run(args.run, args.target_accuracy, workers=args.workers, device=args.device), 0


def cmd_predict(args):
    from .dataset.images import PHOTO_DRAFT_SIZE, ImageError, open_image
    from .evaluation.answers import UNCALIBRATED_NOTE
    from .predict import Predictor
    predictor = Predictor.load(args.run, device=args.device)
    detector = detector_of(args)
    if not predictor.calibration.calibrated:
        log.warning("note: %s", UNCALIBRATED_NOTE)
    if args.cam:
        Path(args.cam).mkdir(parents=True, exist_ok=True)
    results: list[dict] = []
    for start in range(0, len(args.images), args.batch_size):
        batch = []  # (position in results, path, image): a bad file gets its error entry, the rest go on
        for path in args.images[start:start + args.batch_size]:
            try:
                batch.append((len(results), path, open_image(path, draft_size=PHOTO_DRAFT_SIZE)))
                results.append({"image": path})
            except (ImageError, OSError) as exc:
                log.error("%s", exc)
                results.append({"image": path, "error": str(exc)})
        if not batch:
            continue
        photos = [im for _, _, im in batch]
        preds = (predictor.predict_cars(photos, detector, args.top_k, bool(args.cam), args.cam_method, args.tta)
                 if detector else predictor.predict_many(photos, args.top_k, bool(args.cam), args.cam_method,
                                                         tta=args.tta))
        for (i, path, _), pred in zip(batch, preds):
            results[i] |= pred.to_json()
            if pred.cam is not None:
                results[i]["cam"] = str(Path(args.cam) / f"{i:04d}_{Path(path).stem}_cam.png")
                pred.cam.save(results[i]["cam"])
            if not args.json:
                print(f"{path}: {pred.status} — " + ", ".join(f"{label} {prob:.3f}" for label, prob in pred.top)
                      + f" (make: {pred.make[0]} {pred.make[1]:.3f})" + (f"\n  why: {pred.reason}" if pred.reason
                                                                         else ""), flush=True)
                for k, car in enumerate(pred.cars or [], start=1):
                    print(f"  car {k} at {car.box} (detector {car.det_score:.2f}): {car.status} — "
                          f"{car.top[0][0]} {car.top[0][1]:.3f}", flush=True)
    return results, 1 if any("error" in r for r in results) else 0


def cmd_analyze(args):
    from .analysis.analyze import analyze
    result = analyze(args.sources, args.run, args.out, args.group_by, args.batch_size, args.workers, args.device,
                     args.force, args.engine, detector_of(args), args.time, args.period)
    if result and not args.json:
        print_summary(result)
    return result, 0


def cmd_analyze_ray(args):
    from .analysis.batch import analyze_with_ray
    result = analyze_with_ray(args.sources, args.run, args.out, args.detector, args.group_by, args.time,
                              args.period, args.concurrency, args.num_gpus, args.batch_size, args.engine,
                              args.address, args.force)
    if not args.json:
        print_summary(result)
    return result, 0


def cmd_summarize(args):
    from .analysis.summarize import summarize
    result = summarize(args.predictions, args.out, args.period)
    if not args.json:
        print_summary(result)
    return result, 0


def print_summary(result: dict) -> None:
    counts = ", ".join(f"{k} {v}" for k, v in result["status_counts"].items())
    cars = f", {result['cars']} cars" if "cars" in result else ""
    periods = "".join(f"\n  {p}: {n} photos" for p, n in result.get("periods", {}).items())
    print(f"{result['images']} photos{cars}: {counts}. Top makes: "
          + ", ".join(f"{m} {n}" for m, n in result["top_makes"].items()) + periods
          + f"\nReport: {Path(result['out']) / 'report.html'}")


def cmd_export(args):
    from .export import export_run
    out = export_run(args.run, args.format, args.out)
    return {"out": str(out), "files": sorted(p.name for p in out.iterdir())}, 0


def cmd_push(args):
    from .export import push
    return {"repo": args.repo, "url": push(args.run, args.repo, args.private)}, 0


def cmd_train_detector(args):
    from .detection.train import detector_config, train_detector
    if args.resume:
        return train_detector(None, args.run_dir, resume=True, epochs=args.epochs), 0
    if not args.data:
        raise ValueError("train-detector needs --data ROOT (or --resume to go on with a run)")
    cfg = detector_config(args.preset, data=args.data, format=args.format, epochs=args.epochs,
                          steps_per_epoch=args.steps_per_epoch, batch_size=args.batch_size, lr=args.lr, seed=args.seed,
                          negatives=args.negatives)
    return train_detector(cfg, args.run_dir), 0


def cmd_runs(args):
    from .runs import list_runs
    if not Path(args.dir).is_dir():
        raise FileNotFoundError(f"runs folder not found: {args.dir}")
    return [r.to_json() for r in list_runs(args.dir)], 0


def cmd_cache(args):
    from .dataset.resized import build_resized_cache
    return build_resized_cache(args.data, args.short_side, args.workers), 0


def cmd_sweep(args):
    from .training.sweep import sweep
    lrs = [float(v) for v in args.lr.split(",")]
    dropouts = [float(v) for v in args.dropout.split(",")]
    return sweep(config_from_args(args, skip=("lr", "dropout")), args.out, lrs, dropouts), 0  # the grid's own lists


def cmd_lr_find(args):
    from .training.lrfind import lr_find
    return lr_find(config_from_args(args, LR_FIND_SKIPS), args.start_lr, args.end_lr, args.steps), 0


COMMANDS = {"demo-data": cmd_demo_data, "lr-find": cmd_lr_find, "stats": cmd_stats, "health": cmd_health,
            "train": cmd_train, "evaluate": cmd_evaluate,
            "calibrate": cmd_calibrate, "analyze": cmd_analyze, "summarize": cmd_summarize,
            "analyze-ray": cmd_analyze_ray,
            "predict": cmd_predict, "export": cmd_export, "push": cmd_push, "cache": cmd_cache, "sweep": cmd_sweep,
            "runs": cmd_runs, "train-detector": cmd_train_detector}
