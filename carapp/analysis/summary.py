"""What an analysis found, counted: predictions rows (analyze's predictions.csv, or the Parquet of a batch engine)
into summary.csv.

summary.csv: `group,level,name,count,share,ci_low,ci_high` — per group and for all groups together, level `make`
(answers naming a make: status model or make) and `model` (status model), shares of the group's readable images
with 95% Wilson intervals; level `status` holds the unsure and no-car buckets (of readable images) and unreadable
(of all images). With a detector (one row per car) the levels make, model and status count cars, as shares of the
group's cars, and level `photos` counts photos holding at least one named car of each make (and `(no car)`: photos
in which the detector found none), as shares of the group's readable photos. With a period (week, month, quarter)
a `period` column: every count per period of the photos' times, `(no time)` for photos without one, and `(all)`
for the whole, so the periods' counts add up to it.

The counts do not depend on the order of the rows (a batch engine writes them in any order): ties are broken by
name and the photos kept for review are the first by path. A photo met again after other photos (a retried batch)
is counted once.
"""
from __future__ import annotations

import heapq
import math
from collections import Counter, defaultdict
from pathlib import Path

from scipy.stats import binomtest

from .. import safecsv
from ..atomic import atomic_writer
from .collection import ALL_GROUPS
from .trends import ALL_PERIODS, NO_TIME, period_of

SUMMARY_COLUMNS = ["group", "level", "name", "count", "share", "ci_low", "ci_high"]
PERIOD_COLUMN = "period"
THUMBNAILS = 48
HISTOGRAM_BINS = 20
NO_CAR_PHOTOS = "(no car)"    # level photos: photos in which the detector found no car
LEVELS = ("make", "model", "status")


def has_box(row: dict) -> bool:
    """Whether a predictions row is one car with its box (analyze --detector), not a whole photo or a photo without
    a car. A box may start at x = 0, and pandas reads the column as numbers: only an empty cell means none."""
    return row.get("x1") not in (None, "")


def wilson(count: int, n: int) -> tuple[float, float]:
    interval = binomtest(count, n).proportion_ci(confidence_level=0.95, method="wilson")
    return float(interval.low), float(interval.high)


class Tally:
    """What the summary and the report need, gathered in one pass over the rows: a million rows become a few
    counters, a histogram and the first rows to review, never a list of a million dicts. Counters are keyed by
    (group, period); the period is ALL_PERIODS unless a period is asked for."""

    def __init__(self, period: str | None = None):
        self.period = period
        self.counts: dict[tuple, dict[str, Counter]] = defaultdict(lambda: defaultdict(Counter))  # key→level→name
        self.images, self.readable, self.statuses = Counter(), Counter(), Counter()  # photos; answers; rows
        self.photos, self.unreadable = Counter(), Counter()  # readable and unreadable photos, per key
        self.per_car = False  # rows are cars (analyze --detector): photos are counted when their last row is read
        self._photo: tuple[str, set, int, set] | None = None  # (path, makes named, cars, keys) being read
        self.seen: set[str] = set()  # photos counted
        self.repeated = 0            # rows of a photo counted already, skipped
        self.confidence = defaultdict(lambda: [0] * HISTOGRAM_BINS)  # status → rows per model-probability bin
        self._review: dict[str, list] = {"unsure": [], "no-car": []}  # heaps of the first rows by (path, car)
        self.refusals = Counter()  # why photos were answered no-car: the reason's words, without its numbers

    def keys(self, row: dict) -> set[tuple[str, str]]:
        groups = {row["group"], ALL_GROUPS}
        periods = {ALL_PERIODS} if self.period is None else {period_of(row.get("time"), self.period), ALL_PERIODS}
        return {(g, p) for g in groups for p in periods}

    def add(self, row: dict) -> None:
        path = row["path"]
        if path in self.seen and (self._photo is None or self._photo[0] != path):
            self.repeated += 1
            return
        status = row["status"]
        car = row.get("cars") is not None and status != "unreadable"
        keys = self.keys(row)
        if car:
            self._add_car(row, keys)
        else:
            self.finish()
            self.seen.add(path)
        self.statuses[status] += 1
        for key in keys:
            if not car:
                self.images[key] += 1
                self.photos[key] += status != "unreadable"
                self.unreadable[key] += status == "unreadable"
            if status == "unreadable" or car and not has_box(row):
                continue
            self.readable[key] += 1
            levels = self.counts[key]
            if status in ("model", "make"):
                levels["make"][row["make"]] += 1
            if status == "model":
                levels["model"][row["model"]] += 1
            if status in ("unsure", "small", "no-car"):
                levels["status"][status] += 1
        if row["model_prob"] not in ("", None):
            self.confidence[status][min(int(float(row["model_prob"]) * HISTOGRAM_BINS), HISTOGRAM_BINS - 1)] += 1
        if status == "no-car":
            self.refusals[(row.get("reason") or "").split(" (")[0] or "far from the training cars"] += 1
        if status in self._review:
            _keep_first(self._review[status], row)

    def _add_car(self, row: dict, keys: set) -> None:
        """One car row (or a photo's no-car row): the photo is counted once its rows are all read."""
        self.per_car = True
        if self._photo is None or self._photo[0] != row["path"]:
            self.finish()
            self._photo = (row["path"], set(), 0, keys)
            self.seen.add(row["path"])
        path, makes, cars, _ = self._photo
        if row["status"] in ("model", "make"):
            makes.add(row["make"])
        self._photo = (path, makes, cars + has_box(row), keys)

    def finish(self) -> None:
        """Count the photo being read (per car: after its last row)."""
        if self._photo is None:
            return
        _, makes, cars, keys = self._photo
        for key in keys:
            self.images[key] += 1
            self.photos[key] += 1
            for make in makes or ([] if cars else [NO_CAR_PHOTOS]):
                self.counts[key]["photos"][make] += 1
        self._photo = None

    def review(self, status: str) -> list[dict]:
        """The first rows of a status (unsure, no-car) by path and car: the same whatever order the rows came in."""
        return [row for _, _, row in sorted(self._review[status])]

    def total(self, group: str = ALL_GROUPS) -> int:
        """Photos of a group, all periods."""
        return self.images[(group, ALL_PERIODS)]


def _keep_first(heap: list, row: dict) -> None:
    """Keep the THUMBNAILS rows with the smallest (path, car) in a max-heap of negated keys."""
    key = (row["path"], _number(row.get("car")))
    entry = (_Reversed(key), id(row), row)
    if len(heap) < THUMBNAILS:
        heapq.heappush(heap, entry)
    elif key < heap[0][0].key:
        heapq.heapreplace(heap, entry)


class _Reversed:
    """Orders keys backwards, so that heapq's smallest is the largest key kept."""
    __slots__ = ("key",)

    def __init__(self, key):
        self.key = key

    def __lt__(self, other):
        return self.key > other.key

    def __eq__(self, other):
        return self.key == other.key


def _number(cell) -> float:
    return float(cell) if cell not in (None, "") else -1.0


def tally_rows(rows, period: str | None = None) -> Tally:
    result = Tally(period)
    for row in rows:
        result.add(row)
    result.finish()
    return result


def tally(predictions: Path, period: str | None = None) -> Tally:
    with open(predictions, newline="") as f:
        return tally_rows(safecsv.DictReader(f), period)


def summary_rows(t: Tally) -> list[dict]:
    """Every group, then all of them together; with a period, each group's periods in order, then (all)."""
    keys = sorted(t.images, key=lambda k: (k[0] == ALL_GROUPS, k[0], k[1] == ALL_PERIODS, k[1] == NO_TIME, k[1]))
    if {g for g, _ in keys} != {ALL_GROUPS}:
        keys = [k for k in keys if k[0] != ALL_GROUPS] + [k for k in keys if k[0] == ALL_GROUPS]
    out = []
    for key in keys:
        for level in LEVELS:
            for name, count in _most_common(t.counts[key][level]):
                out.append(_row(key, level, name, count, t.readable[key], t.period))
        for name, count in _most_common(t.counts[key]["photos"]):
            out.append(_row(key, "photos", name, count, t.photos[key], t.period))
        out.append(_row(key, "status", "unreadable", t.unreadable[key], t.images[key], t.period))
    return out


def _most_common(counter: Counter) -> list[tuple[str, int]]:
    """Largest count first, ties by name: the same summary whatever order the rows came in."""
    return sorted(counter.items(), key=lambda kv: (-kv[1], kv[0]))


def _row(key: tuple[str, str], level: str, name: str, count: int, n: int, period: str | None) -> dict:
    low, high = wilson(count, n) if n else (0.0, 0.0)
    row = {"group": key[0], "level": level, "name": name, "count": count, "share": round(count / n, 6) if n else 0.0,
           "ci_low": round(low, 6), "ci_high": round(high, 6)}
    return {**row, PERIOD_COLUMN: key[1]} if period else row


def whole(summary: list[dict]) -> list[dict]:
    """The rows about the whole time (all of them when there is no period column)."""
    return [s for s in summary if s.get(PERIOD_COLUMN, ALL_PERIODS) == ALL_PERIODS]


def write_summary(out: Path, t: Tally) -> list[dict]:
    summary = summary_rows(t)
    with atomic_writer(out / "summary.csv", newline="") as f:
        writer = safecsv.DictWriter(f, SUMMARY_COLUMNS + ([PERIOD_COLUMN] if t.period else []))
        writer.writeheader()
        writer.writerows(summary)
    return summary


def cell(value) -> str:
    """A value of a typed table (Parquet: numbers, nulls) as predictions.csv writes it."""
    if value is None or isinstance(value, float) and math.isnan(value):
        return ""
    if hasattr(value, "item"):  # a numpy scalar
        value = value.item()
    if isinstance(value, float) and value.is_integer() and abs(value) < 2**53:
        return str(int(value))
    return str(value)
