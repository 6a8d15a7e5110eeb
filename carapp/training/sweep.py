"""The paper's Table 7 grid: one run per (learning rate, dropout) on one shared split, and a results table.

    python -m carapp sweep --data ROOT --out checkpoints/sweep --lr 1e-4,1e-3,1e-2 --dropout 0.2,0.3,0.4
"""
from __future__ import annotations

import csv
import logging
from pathlib import Path

from .. import rundir
from ..config import TrainConfig
from .tracking import check_trackers
from .train import make_run_split, train

log = logging.getLogger("carapp")

COLUMNS = ["run", "lr", "dropout", "weight_decay", "status", "epochs", "best_val_acc", "best_val_loss", "test_top1"]


def sweep(base: TrainConfig, out: str | Path, lrs: list[float], dropouts: list[float]) -> list[dict]:
    check_trackers(base.log)  # once, before the shared split: not one failure per cell
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    split, _ = make_run_split(base)
    rundir.write_split(out, split)  # the shared split, also kept beside the runs
    rows = []
    for lr in lrs:
        for dropout in dropouts:
            name = f"lr{lr:g}_dropout{dropout:g}"
            cfg = TrainConfig.from_dict({**base.to_dict(), "lr": lr, "dropout": dropout})
            log.info("sweep: %s", name)
            try:
                result = train(cfg, out / name, split=split)
            except Exception as exc:  # one failed cell must not lose the rest of the grid
                log.error("sweep run %s failed: %s", name, exc)
                result = {"status": f"failed: {exc}"}
            rows.append(_row(out / name, cfg, result))
            write_table(out, rows)
    return rows


def _row(run: Path, cfg: TrainConfig, result: dict) -> dict:
    metrics = rundir.read_metrics(run)
    best = max(metrics, key=lambda r: r["val_acc"]) if metrics else {}
    return {"run": run.name, "lr": cfg.lr, "dropout": cfg.dropout, "weight_decay": cfg.weight_decay,
            "status": result["status"], "epochs": len(metrics), "best_val_acc": best.get("val_acc"),
            "best_val_loss": min((r["val_loss"] for r in metrics), default=None),
            "test_top1": (result.get("test") or {}).get("top1")}


def write_table(out: Path, rows: list[dict]) -> None:
    """results.csv and results.md, best validation accuracy first."""
    rows = sorted(rows, key=lambda r: -(r["best_val_acc"] if r["best_val_acc"] is not None else -1))
    with open(out / "results.csv", "w", newline="") as f:
        w = csv.DictWriter(f, COLUMNS)
        w.writeheader()
        w.writerows(rows)
    fmt = lambda v: "" if v is None else (f"{v:.4g}" if isinstance(v, float) else str(v))  # 1e-05, 0.9591
    lines = ["| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    lines += ["| " + " | ".join(fmt(r[c]) for c in COLUMNS) + " |" for r in rows]
    (out / "results.md").write_text("\n".join(lines) + "\n")
