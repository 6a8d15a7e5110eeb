"""Trust benchmark: calibration, confident-answer coverage and "not a car" detection on the demo preset run.

    python bench/trust.py [--run DIR] [--seed 0] [--no-car 300] [--keep DIR]

Without --run it trains the demo preset (ResNet-50 from scratch, ~4 minutes on a 2-core CPU), which calibrates itself
at the end. It then measures on the test split (plain and with flip TTA): top-1, ECE before/after temperature
scaling, the share answered "model" and their accuracy; and on synthetic photos without a car (scenes, textures,
noise, shapes, gradients from carapp.dataset.demo.make_no_car_images): the share answered unsure/no-car, and the AUROC
(test cars vs non-car photos) of each candidate score: max-softmax, max-logit, energy, Mahalanobis distance of the
pooled layer3 features, and the k-nearest-neighbour distance on them that carapp uses.
Goals (issue 11): >= 85% of test images answered "model" with >= 95% of those right; ECE after <= 0.05 and not
above before; non-car photos almost all unsure/no-car. Exits 1 if a goal is missed.
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def train_demo(work: Path, seed: int) -> Path:
    from carapp.dataset.demo import make_demo_dataset
    data, run = work / "demo", work / f"run-seed{seed}"
    make_demo_dataset(data, seed=0)
    subprocess.run([sys.executable, "-m", "carapp", "train", "--data", str(data), "--run-dir", str(run),
                    "--preset", "demo", "--seed", str(seed), "--json"], cwd=ROOT, check=True, stdout=subprocess.DEVNULL)
    return run


def outputs_of(run: Path, folder: Path | None = None, split: str = "test"):
    """Logits and pooled features of a split of the run, or of every image in `folder`."""
    from carapp.dataset.loader import CarImages, build_transform, make_loader
    from carapp.evaluation.evaluate import collect_outputs, load_run_model, split_dataset
    model, cfg, _, dev = load_run_model(run)
    if folder is None:
        dataset = split_dataset(run, cfg, split)
    else:
        paths = sorted(p.name for p in folder.glob("*.jpg"))
        dataset = CarImages(str(folder), paths, [0] * len(paths), None, build_transform(cfg.image_size, False))
    return collect_outputs(model, make_loader(dataset, 64, 0), dev, cfg.amp)


def scores(calibration, density, out) -> dict[str, np.ndarray]:
    """Candidate "not a car" scores: larger means less like a car the network knows."""
    from scipy.special import logsumexp
    probs = calibration.probs(out.logits)
    return {"max_softmax": -probs.max(1), "max_logit": -out.logits.max(1),
            "energy": -logsumexp(out.logits, axis=1), "mahalanobis_layer3": density.score(out.features),
            "knn_layer3 (carapp)": calibration.ood_scores(out.features)}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--run", help="a calibrated run directory (default: train the demo preset)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--no-car", type=int, default=300, help="synthetic non-car photos to make")
    ap.add_argument("--keep", help="keep the data and run here instead of a temp folder")
    args = ap.parse_args()
    from carapp.dataset.demo import make_no_car_images
    from carapp.evaluation.answers import Calibration, class_makes_of
    from carapp.evaluation.evaluate import evaluate_run
    from carapp.evaluation.trust import FeatureDensity, auroc
    from carapp.rundir import label_names
    work = Path(args.keep or tempfile.mkdtemp(prefix="carapp-trust-"))
    run = Path(args.run) if args.run else train_demo(work, args.seed)
    calibration_file = json.loads((run / "calibration.json").read_text())
    plain, tta = evaluate_run(run, workers=0), evaluate_run(run, workers=0, tta=True)

    make_no_car_images(work / "no-car", args.no_car, seed=1)
    names = label_names(run)
    calibration = Calibration.load(run, names, class_makes_of(run, names))
    cars, others = outputs_of(run), outputs_of(run, work / "no-car")
    answers = calibration.answers(others.logits, others.features, top_k=1)
    statuses = [a.status for a in answers]
    train = outputs_of(run, split="train")
    density = FeatureDensity.fit(train.features, train.labels)
    car_scores, other_scores = scores(calibration, density, cars), scores(calibration, density, others)
    figures = {
        "run": str(run), "test_images": plain["num_images"], "temperature": round(calibration.temperature, 4),
        "val_ece_before": round(calibration_file["ece_before"], 4),
        "val_ece_after": round(calibration_file["ece_after"], 4),
        **{f"{name}_{k}": (round(v, 4) if isinstance(v, float) else v) for name, result in (("test", plain),
           ("test_tta", tta)) for k, v in result.items()
           if k in ("top1", "make_top1", "ece", "ece_uncalibrated", "coverage", "selective_accuracy")},
        "no_car_images": len(statuses),
        "no_car_answered_unsure_or_no_car": round(sum(s in ("unsure", "no-car") for s in statuses) / len(statuses), 4),
        "no_car_status_counts": {s: statuses.count(s) for s in ("model", "make", "unsure", "no-car")},
        **{f"auroc_{name}": round(auroc(car_scores[name], other_scores[name]), 4) for name in car_scores},
    }
    print(json.dumps(figures, indent=2))
    goals = (plain["coverage"] >= 0.85 and (plain["selective_accuracy"] or 0) >= 0.95 and plain["ece"] <= 0.05
             and plain["ece"] <= plain["ece_uncalibrated"] and figures["no_car_answered_unsure_or_no_car"] >= 0.9)
    return 0 if goals else 1


if __name__ == "__main__":
    sys.exit(main())
