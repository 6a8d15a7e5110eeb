"""Demo preset benchmark: ResNet-50 on the synthetic demo set, from scratch, on this machine's CPU.

    python bench/demo_preset.py [--seed 0] [--keep DIR]

Goal (issue 2): best validation accuracy >= 0.90 within 300 s of training wall time on a 2-core CPU.
Prints the figures and their ratios to the goals; exits 1 if a goal is missed.
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
GOAL_ACC, GOAL_SECONDS = 0.90, 300.0


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--keep", help="keep the dataset and run here instead of a temp folder")
    args = ap.parse_args()
    work = Path(args.keep or tempfile.mkdtemp(prefix="carapp-bench-"))
    data, run = work / "demo", work / f"run-seed{args.seed}"
    sys.path.insert(0, str(ROOT))
    from carapp.dataset.demo import make_demo_dataset
    t = time.perf_counter()
    summary = make_demo_dataset(data, seed=0)
    gen_seconds = time.perf_counter() - t

    t = time.perf_counter()
    out = subprocess.run([sys.executable, "-m", "carapp", "train", "--data", str(data), "--run-dir", str(run),
                          "--preset", "demo", "--seed", str(args.seed), "--json"], cwd=ROOT, check=True,
                         stdout=subprocess.PIPE, text=True).stdout
    train_seconds = time.perf_counter() - t
    result = json.loads(out)
    metrics = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    best = max(m["val_acc"] for m in metrics)
    figures = {
        "dataset_images": summary["num_images"], "dataset_seconds": round(gen_seconds, 1),
        "epochs": len(metrics), "best_val_acc": round(best, 4), "test_top1": round(result["test"]["top1"], 4),
        "train_wall_seconds": round(train_seconds, 1),
        "acc_ratio_to_goal": round(best / GOAL_ACC, 3), "time_ratio_to_goal": round(train_seconds / GOAL_SECONDS, 3),
    }
    print(json.dumps(figures, indent=2))
    return 0 if best >= GOAL_ACC and train_seconds <= GOAL_SECONDS else 1


if __name__ == "__main__":
    sys.exit(main())
