"""summary.csv and report.html from predictions rows, wherever they were made: analyze's predictions.csv, or the
Parquet files of a batch engine (Ray Data, Spark: carapp.analysis.batch), one file or many.

    python -m carapp summarize OUT/predictions.csv --out OUT [--period month]
    python -m carapp summarize ray-out/*.parquet --out report/ --period quarter

The rows are read one file at a time, one batch of a Parquet file at a time, counted as they come (the counts do
not depend on their order; a photo met twice counts once).
"""
from __future__ import annotations

import glob
from pathlib import Path

from .. import rundir, safecsv
from .collection import ALL_GROUPS, CollectionError
from .report import write_report
from .summary import Tally, cell, tally_rows, write_summary
from .trends import ALL_PERIODS, PERIODS

META = "analysis.json"  # beside the rows: the model they came from and whether it was calibrated
STATUSES = ("model", "make", "unsure", "small", "no-car", "unreadable")
PARQUET_BATCH = 8192


def prediction_files(paths: list[str]) -> list[Path]:
    """Files named, globbed, or found in folders (their .csv and .parquet files; a Ray output is a folder)."""
    found = []
    for name in paths:
        matches = sorted(glob.glob(name)) or [name]
        for match in map(Path, matches):
            if match.is_dir():
                found += sorted(p for p in match.rglob("*") if p.suffix in (".csv", ".parquet") and p.is_file()
                                and p.name not in ("summary.csv", "uploads.csv") and not p.name.startswith("."))
            elif match.is_file():
                found.append(match)
            else:
                raise CollectionError(f"{name}: no such file or folder")
    if not found:
        raise CollectionError(f"no predictions files (.csv, .parquet) in {', '.join(paths)}")
    return found


def read_rows(files: list[Path]):
    """Every row of every file as predictions.csv holds it: text cells, "" for nothing."""
    for path in files:
        if path.suffix == ".parquet":
            yield from _parquet_rows(path)
        else:
            with open(path, newline="") as f:
                reader = safecsv.DictReader(f)
                if "path" not in (reader.fieldnames or []) or "status" not in reader.fieldnames:
                    raise CollectionError(f"{path}: not a predictions file (it needs path and status columns)")
                yield from reader


def _parquet_rows(path: Path):
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise CollectionError("reading Parquet needs pyarrow: pip install pyarrow (it comes with ray[data])") from None
    for batch in pq.ParquetFile(path).iter_batches(batch_size=PARQUET_BATCH):
        for row in batch.to_pylist():
            yield {k: cell(v) for k, v in row.items()}


def write_outputs(out: Path, files: list[Path], period: str | None, calibrated: bool) -> Tally:
    """summary.csv and report.html in `out` from the rows of `files`."""
    if period not in (None, *PERIODS):
        raise ValueError(f"--period must be one of {', '.join(PERIODS)}, not {period!r}")
    counts = tally_rows(read_rows(files), period)
    if not counts.statuses:
        raise CollectionError(f"no rows in {', '.join(map(str, files))}")
    summary = write_summary(out, counts)
    write_report(out, counts, summary, calibrated)
    return counts


def summarize(paths: list[str], out: str | Path, period: str | None = None) -> dict:
    files = prediction_files(paths)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    metas = [rundir.read_json(f.parent / META, None) or rundir.read_json(f.parent.parent / META, {}) for f in files]
    calibrated = all(m.get("calibrated", True) for m in metas)  # rows from an uncalibrated model say so
    counts = write_outputs(out, files, period, calibrated)
    return {**short_summary(counts, out, calibrated), "files": len(files), "repeated_rows_skipped": counts.repeated}


def short_summary(counts: Tally, out: Path, calibrated: bool) -> dict:
    """What analyze and summarize print: photos, cars, answers, groups, the top makes (periods with --period)."""
    everything = (ALL_GROUPS, ALL_PERIODS)
    makes = counts.counts[everything]["make"]
    statuses = STATUSES if counts.per_car else tuple(s for s in STATUSES if s != "small")
    periods = sorted({p for g, p in counts.images if g == ALL_GROUPS} - {ALL_PERIODS})
    return {"out": str(out), "images": counts.total(), "calibrated": calibrated,
            **({"cars": counts.readable[everything]} if counts.per_car else {}),
            "status_counts": {s: counts.statuses[s] for s in statuses},
            "groups": sorted({g for g, _ in counts.images} - {ALL_GROUPS}),
            "top_makes": dict(sorted(makes.items(), key=lambda kv: (-kv[1], kv[0]))[:10]),
            **({"period": counts.period, "periods": {p: counts.images[(ALL_GROUPS, p)] for p in periods}}
               if counts.period else {})}
