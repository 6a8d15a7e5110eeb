"""What an analysis found, as tables and a self-contained HTML page: summary.csv and report.html.

summary.csv: `group,level,name,count,share,ci_low,ci_high` — per group and for all groups together, level `make`
(answers naming a make: status model or make) and `model` (status model), shares of the group's readable images
with 95% Wilson intervals; level `status` holds the unsure and no-car buckets (of readable images) and unreadable
(of all images). With a detector (predictions.csv has one row per car) the levels make, model and status count cars,
as shares of the group's cars, and level `photos` counts photos holding at least one named car of each make (and
`(no car)`: photos in which the detector found none), as shares of the group's readable photos.
"""
from __future__ import annotations

import base64
import html
import io
from collections import Counter, defaultdict
from pathlib import Path

import plotly.graph_objects as go
from plotly.colors import qualitative
from plotly.subplots import make_subplots
from scipy.stats import binomtest

from .. import safecsv
from ..atomic import atomic_writer
from ..dataset.images import open_image
from .collection import ALL_GROUPS, READ_ERRORS, item_of

SUMMARY_COLUMNS = ["group", "level", "name", "count", "share", "ci_low", "ci_high"]
THUMBNAILS = 48
HISTOGRAM_BINS = 20
PALETTE = qualitative.Plotly  # one colour per group, the same in both panels
NO_CAR_PHOTOS = "(no car)"    # level photos: photos in which the detector found no car


def has_box(row: dict) -> bool:
    """Whether a predictions row is one car with its box (analyze --detector), not a whole photo or a photo without
    a car. A box may start at x = 0, and pandas reads the column as numbers: only an empty cell means none."""
    return row.get("x1") not in (None, "")


def wilson(count: int, n: int) -> tuple[float, float]:
    interval = binomtest(count, n).proportion_ci(confidence_level=0.95, method="wilson")
    return float(interval.low), float(interval.high)


class Tally:
    """What the summary and the report need, gathered in one pass over predictions.csv: a million rows become a
    few counters, a histogram and the first unsure rows, never a list of a million dicts."""

    def __init__(self):
        self.counts: dict[str, dict[str, Counter]] = defaultdict(lambda: defaultdict(Counter))  # group→level→name
        self.images, self.readable, self.statuses = Counter(), Counter(), Counter()  # photos; answers; rows
        self.photos, self.unreadable = Counter(), Counter()  # readable and unreadable photos, per group
        self.per_car = False  # rows are cars (analyze --detector): photos are counted when their last row is read
        self._photo: tuple[str, str, set, int] | None = None  # (path, group, makes named, cars) being read
        self.confidence = defaultdict(lambda: [0] * HISTOGRAM_BINS)  # status → photos per model-probability bin
        self.unsure: list[dict] = []
        self.refused: list[dict] = []
        self.refusals = Counter()  # why photos were answered no-car: the reason's words, without its numbers

    def add(self, row: dict) -> None:
        status = row["status"]
        self.statuses[status] += 1
        car = row.get("cars") is not None and status != "unreadable"
        if car:
            self._add_car(row)
        photo_without_car = car and not has_box(row)
        for group in {row["group"], ALL_GROUPS}:
            if not car:
                self.images[group] += 1
                self.photos[group] += status != "unreadable"
                self.unreadable[group] += status == "unreadable"
            if status == "unreadable" or photo_without_car:
                continue
            self.readable[group] += 1
            levels = self.counts[group]
            if status in ("model", "make"):
                levels["make"][row["make"]] += 1
            if status == "model":
                levels["model"][row["model"]] += 1
            if status in ("unsure", "small", "no-car"):
                levels["status"][status] += 1
        if row["model_prob"]:
            self.confidence[status][min(int(float(row["model_prob"]) * HISTOGRAM_BINS), HISTOGRAM_BINS - 1)] += 1
        if status == "unsure" and len(self.unsure) < THUMBNAILS:
            self.unsure.append(row)
        if status == "no-car":
            self.refusals[(row.get("reason") or "").split(" (")[0] or "far from the training cars"] += 1
            if len(self.refused) < THUMBNAILS:
                self.refused.append(row)

    def _add_car(self, row: dict) -> None:
        """One car row (or a photo's no-car row): the photo is counted once its rows are all read."""
        self.per_car = True
        if self._photo is None or self._photo[0] != row["path"]:
            self.finish()
            self._photo = (row["path"], row["group"], set(), 0)
        path, group, makes, cars = self._photo
        if row["status"] in ("model", "make"):
            makes.add(row["make"])
        self._photo = (path, group, makes, cars + has_box(row))

    def finish(self) -> None:
        """Count the photo being read (per car: after its last row)."""
        if self._photo is None:
            return
        _, group, makes, cars = self._photo
        for g in {group, ALL_GROUPS}:
            self.images[g] += 1
            self.photos[g] += 1
            for make in makes or ([] if cars else [NO_CAR_PHOTOS]):
                self.counts[g]["photos"][make] += 1
        self._photo = None


def tally(predictions: Path) -> Tally:
    result = Tally()
    with open(predictions, newline="") as f:
        for row in safecsv.DictReader(f):
            result.add(row)
    result.finish()
    return result


def summary_rows(t: Tally) -> list[dict]:
    groups = sorted(t.images)
    if groups != [ALL_GROUPS]:  # every group, then all of them together
        groups = [g for g in groups if g != ALL_GROUPS] + [ALL_GROUPS]
    out = []
    for group in groups:
        for level in ("make", "model", "status"):
            for name, count in t.counts[group][level].most_common():
                out.append(_row(group, level, name, count, t.readable[group]))
        for name, count in t.counts[group]["photos"].most_common():
            out.append(_row(group, "photos", name, count, t.photos[group]))
        out.append(_row(group, "status", "unreadable", t.unreadable[group], t.images[group]))
    return out


def _row(group: str, level: str, name: str, count: int, n: int) -> dict:
    low, high = wilson(count, n) if n else (0.0, 0.0)
    return {"group": group, "level": level, "name": name, "count": count, "share": round(count / n, 6) if n else 0.0,
            "ci_low": round(low, 6), "ci_high": round(high, 6)}


def write_summary(out: Path, t: Tally) -> list[dict]:
    summary = summary_rows(t)
    with atomic_writer(out / "summary.csv", newline="") as f:
        writer = safecsv.DictWriter(f, SUMMARY_COLUMNS)
        writer.writeheader()
        writer.writerows(summary)
    return summary


def write_report(out: Path, t: Tally, summary: list[dict], calibrated: bool) -> Path:
    statuses, unit = t.statuses, "cars" if t.per_car else "photos"
    sections = [
        f"<h1>Car makes and models: {t.readable[ALL_GROUPS]:,} cars in {t.images[ALL_GROUPS]:,} photos</h1>"
        if t.per_car else
        f"<h1>Car makes and models in {sum(statuses.values()):,} photos</h1>",
        "<p>" + " · ".join(f"<b>{s}</b>: {statuses.get(s, 0):,}" for s in
                           ("model", "make", "unsure", "small", "no-car", "unreadable") if s != "small" or t.per_car)
        + "</p>",
        "" if calibrated else "<p><i>The model is not calibrated: probabilities are raw and no photo is told apart as "
                              "'no car'. Run <code>python -m carapp calibrate</code> on it.</i></p>",
        f"<h2>Make share per group (of {unit})</h2>", _html(make_share_figure(summary, unit=unit), first=True),
        *(["<h2>Photos holding each make</h2>",
           _table([s for s in summary if s["group"] == ALL_GROUPS and s["level"] == "photos"][:20], "make")]
          if t.per_car else []),
        "<h2>Top models</h2>",
        _table([s for s in summary if s["group"] == ALL_GROUPS and s["level"] == "model"][:20], "model", unit),
        "<h2>How sure the answers are</h2>", _html(confidence_figure(t, unit)),
        f"<h2>{'Cars' if t.per_car else 'Photos'} to review (unsure)</h2>", _thumbnails(t.unsure, statuses["unsure"]),
        "<h2>Why no car was named (no-car)</h2>",
        _reasons_table(t.refusals),
        _thumbnails(t.refused, statuses["no-car"]) if t.refused else "",
    ]
    page = ("<!doctype html><html><head><meta charset='utf-8'><title>carapp analysis</title><style>"
            "body{font-family:sans-serif;margin:2em;max-width:1200px}table{border-collapse:collapse}"
            "td,th{padding:4px 10px;border-bottom:1px solid #ddd;text-align:left}figure{display:inline-block;"
            "margin:4px;font-size:11px;width:140px}img{max-width:140px}</style></head><body>"
            + "\n".join(sections) + "</body></html>")
    with atomic_writer(out / "report.html") as f:
        f.write(page)
    return out / "report.html"


def make_share_figure(summary: list[dict], top: int = 12, unit: str = "photos") -> go.Figure:
    """Share of each group's photos per make (the most frequent makes overall) and, in a panel of their own, the
    photos with no make (unsure, no car, unreadable), with 95% intervals: a collection the model is unsure of shows
    as such, not as a blank. One group alone is drawn once, as the whole collection."""
    makes = [("make", s["name"]) for s in summary if s["group"] == ALL_GROUPS and s["level"] == "make"][:top]
    buckets = [("status", name) for name in ("unsure", "no-car", "unreadable")]
    groups = sorted({s["group"] for s in summary}, key=lambda g: (g == ALL_GROUPS, g))
    if len(groups) <= 2:  # a group and (all): the same photos twice
        groups = [ALL_GROUPS]
    panels = [(columns, title) for columns, title in ((makes, "makes"), (buckets, "no make named")) if columns]
    fig = make_subplots(rows=1, cols=len(panels), column_widths=[0.75, 0.25][-len(panels):], shared_yaxes=True,
                        horizontal_spacing=0.03, subplot_titles=[title for _, title in panels])
    for i, group in enumerate(groups):
        mine = {(s["level"], s["name"]): s for s in summary if s["group"] == group}
        for col, (columns, _) in enumerate(panels, start=1):
            shares = [mine.get(c, {"share": 0, "ci_low": 0, "ci_high": 0}) for c in columns]
            fig.add_trace(go.Bar(name=group, x=[name for _, name in columns], y=[s["share"] for s in shares],
                                 marker_color=PALETTE[i % len(PALETTE)], legendgroup=group, showlegend=col == 1,
                                 error_y=dict(type="data", symmetric=False,
                                              array=[s["ci_high"] - s["share"] for s in shares],
                                              arrayminus=[s["share"] - s["ci_low"] for s in shares])),
                          row=1, col=col)
    fig.update_layout(barmode="group", template="plotly_white", height=420, margin=dict(l=50, r=20, t=40, b=40))
    fig.update_yaxes(tickformat=".0%", rangemode="tozero")
    fig.update_yaxes(title_text=f"share of {unit}", row=1, col=1)
    return fig


def confidence_figure(t: Tally, unit: str = "photos") -> go.Figure:
    centres = [(i + 0.5) / HISTOGRAM_BINS for i in range(HISTOGRAM_BINS)]
    fig = go.Figure([go.Bar(x=centres, y=t.confidence[status], name=status, width=1 / HISTOGRAM_BINS)
                     for status in ("model", "make", "unsure", "small", "no-car") if status in t.confidence])
    fig.update_layout(barmode="stack", template="plotly_white", height=320, xaxis_title="top model probability",
                      yaxis_title=unit, margin=dict(l=50, r=20, t=20, b=40))
    return fig


def _html(fig: go.Figure, first: bool = False) -> str:
    # plotly.js is embedded once: the page works offline and as a single file
    return fig.to_html(full_html=False, include_plotlyjs=True if first else False)


def _table(rows: list[dict], what: str, unit: str = "photos") -> str:
    head = f"<tr><th>{what}</th><th>{unit}</th><th>share</th><th>95% interval</th></tr>"
    body = "".join(f"<tr><td>{html.escape(r['name'])}</td><td>{r['count']}</td><td>{r['share']:.1%}</td>"
                   f"<td>{r['ci_low']:.1%} – {r['ci_high']:.1%}</td></tr>" for r in rows)
    return f"<table>{head}{body}</table>"


def _reasons_table(refusals: Counter) -> str:
    if not refusals:
        return "<p>None.</p>"
    body = "".join(f"<tr><td>{html.escape(why)}</td><td>{n}</td></tr>" for why, n in refusals.most_common())
    return f"<table><tr><th>reason</th><th>photos</th></tr>{body}</table>"


def row_image(row: dict, archives: dict, draft_size: int = 256):
    """The photo of a predictions row; for a car's row, the car: its box and a little around it."""
    if not has_box(row):
        return open_image(item_of(row["path"]).open(archives), draft_size=draft_size)
    photo = open_image(item_of(row["path"]).open(archives))
    x1, y1, x2, y2 = (float(row[k]) for k in ("x1", "y1", "x2", "y2"))
    pad_x, pad_y = (x2 - x1) * 0.1, (y2 - y1) * 0.1
    return photo.crop((max(0, round(x1 - pad_x)), max(0, round(y1 - pad_y)), min(photo.width, round(x2 + pad_x)),
                       min(photo.height, round(y2 + pad_y))))


def _thumbnails(rows: list[dict], total: int) -> str:
    figures, archives = [], {}
    for r in rows:
        try:
            img = row_image(r, archives)
        except READ_ERRORS:
            continue
        img.thumbnail((140, 140))
        buf = io.BytesIO()
        img.save(buf, "JPEG", quality=80)
        guess = (f"best guess {html.escape(r['model'])} ({float(r['model_prob']):.0%})" if r["model_prob"]
                 else "no car found")
        car = f" · car {int(r['car']) + 1} of {r['cars']}" if has_box(r) else ""
        figures.append(f"<figure><img src='data:image/jpeg;base64,{base64.b64encode(buf.getvalue()).decode()}'>"
                       f"<figcaption>{html.escape(Path(r['path']).name)}{car}<br>{guess}</figcaption></figure>")
    more = f"<p>… and {total - len(rows)} more in predictions.csv</p>" if total > len(rows) else ""
    return ("".join(figures) + more) if figures else "<p>None.</p>"
