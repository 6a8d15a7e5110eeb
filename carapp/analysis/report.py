"""An analysis as a self-contained HTML page: report.html, drawn from the tally (carapp.analysis.summary) and
summary.csv's rows. With a period, a section over time: each top make's share per period with its 95% band, and
the changes between consecutive periods unlikely by chance, in words.
"""
from __future__ import annotations

import base64
import html
import io
from collections import Counter
from pathlib import Path

import plotly.graph_objects as go
from plotly.colors import qualitative
from plotly.subplots import make_subplots

from ..atomic import atomic_writer
from ..dataset.images import open_image
from .collection import ALL_GROUPS, READ_ERRORS, item_of
from .summary import HISTOGRAM_BINS, Tally, has_box, whole, wilson
from .trends import ALL_PERIODS, NO_TIME, compare_periods, period_label, significant, timed_periods

PALETTE = qualitative.Plotly  # one colour per group, the same in both panels
TREND_MAKES = 6               # makes drawn over time: the most frequent overall
NOT_NAMED = "(no make named)"  # over time: the answers naming no make


def write_report(out: Path, t: Tally, summary: list[dict], calibrated: bool) -> Path:
    statuses, unit, overall = t.statuses, counted(t.per_car), whole(summary)
    everything = (ALL_GROUPS, ALL_PERIODS)
    sections = [
        f"<h1>Car makes and models: {t.readable[everything]:,} cars in {t.images[everything]:,} photos</h1>"
        if t.per_car else
        f"<h1>Car makes and models in {sum(statuses.values()):,} photos</h1>",
        "<p>" + " · ".join(f"<b>{s}</b>: {statuses.get(s, 0):,}" for s in
                           ("model", "make", "unsure", "small", "no-car", "unreadable") if s != "small" or t.per_car)
        + "</p>",
        "" if calibrated else "<p><i>The model is not calibrated: probabilities are raw and no photo is told apart as "
                              "'no car'. Run <code>python -m carapp calibrate</code> on it.</i></p>",
        f"<h2>Make share per group (of {unit})</h2>",
        _html(make_share_figure(overall, unit=unit), "make-shares", first=True),
        *(_trend_section(t, unit) if t.period else []),
        *(["<h2>Photos holding each make</h2>",
           _table([s for s in overall if s["group"] == ALL_GROUPS and s["level"] == "photos"][:20], "make")]
          if t.per_car else []),
        "<h2>Top models</h2>",
        _table([s for s in overall if s["group"] == ALL_GROUPS and s["level"] == "model"][:20], "model", unit),
        "<h2>How sure the answers are</h2>", _html(confidence_figure(t, unit), "confidence"),
        f"<h2>{'Cars' if t.per_car else 'Photos'} to review (unsure)</h2>",
        _thumbnails(t.review("unsure"), statuses["unsure"]),
        "<h2>Why no car was named (no-car)</h2>",
        _reasons_table(t.refusals),
        _thumbnails(t.review("no-car"), statuses["no-car"]) if statuses["no-car"] else "",
    ]
    page = ("<!doctype html><html><head><meta charset='utf-8'><title>carapp analysis</title><style>"
            "body{font-family:sans-serif;margin:2em;max-width:1200px}table{border-collapse:collapse}"
            "td,th{padding:4px 10px;border-bottom:1px solid #ddd;text-align:left}figure{display:inline-block;"
            "margin:4px;font-size:11px;width:140px}img{max-width:140px}</style></head><body>"
            + "\n".join(sections) + "</body></html>")
    with atomic_writer(out / "report.html") as f:
        f.write(page)
    return out / "report.html"


def trend(t: Tally, top: int = TREND_MAKES) -> tuple[list[str], dict, dict, list]:
    """(the top makes overall and NOT_NAMED, name → period → count, period → cars or photos, every comparison of
    consecutive periods): what the chart and the sentences are drawn from. NOT_NAMED (unsure, no car, too small)
    is followed too: a rise of it says the photos are changing away from what the model knows."""
    makes = [name for name, _ in sorted(t.counts[(ALL_GROUPS, ALL_PERIODS)]["make"].items(),
                                        key=lambda kv: (-kv[1], kv[0]))][:top]
    periods = timed_periods(p for g, p in t.images if g == ALL_GROUPS)
    totals = {p: t.readable[(ALL_GROUPS, p)] for p in periods}
    counts = {m: {p: t.counts[(ALL_GROUPS, p)]["make"][m] for p in periods} for m in makes}
    counts[NOT_NAMED] = {p: sum(t.counts[(ALL_GROUPS, p)]["status"].values()) for p in periods}
    names = makes + [NOT_NAMED] * any(counts[NOT_NAMED].values())
    return names, counts, totals, compare_periods(counts, totals, names)


def trend_figure(t: Tally, unit: str = "photos") -> go.Figure:
    """Each top make's share per period with its 95% Wilson band."""
    makes, counts, totals, _ = trend(t)
    periods = [p for p in totals if totals[p]]
    fig = go.Figure()
    for i, make in enumerate(makes):
        colour = "#888888" if make == NOT_NAMED else PALETTE[i % len(PALETTE)]
        shares = [counts[make][p] / totals[p] for p in periods]
        bands = [wilson(counts[make][p], totals[p]) for p in periods]
        labels = [period_label(p) for p in periods]
        fig.add_trace(go.Scatter(x=labels + labels[::-1], y=[b[1] for b in bands] + [b[0] for b in bands][::-1],
                                 fill="toself", fillcolor=colour, opacity=0.15, line=dict(width=0),
                                 hoverinfo="skip", showlegend=False, legendgroup=make))
        fig.add_trace(go.Scatter(x=labels, y=shares, name=make, mode="lines+markers", legendgroup=make,
                                 line=dict(color=colour, dash="dot" if make == NOT_NAMED else "solid"),
                                 customdata=[[counts[make][p], totals[p]] for p in periods],
                                 hovertemplate=f"{html.escape(make)}: %{{y:.1%}} (%{{customdata[0]}} of "
                                               f"%{{customdata[1]}} {unit})<extra></extra>"))
    fig.update_layout(template="plotly_white", height=380, margin=dict(l=50, r=20, t=20, b=40),
                      yaxis_title=f"share of {unit}", xaxis_title=f"{t.period}")
    fig.update_yaxes(tickformat=".0%", rangemode="tozero")
    return fig


def trend_sentences(t: Tally) -> list[str]:
    """The changes between consecutive periods that chance is unlikely to explain, in words; or why there are none."""
    _, _, totals, changes = trend(t)
    untimed = t.images[(ALL_GROUPS, NO_TIME)]
    notes = [f"{untimed:,} photos carry no time: they count in the bucket {NO_TIME}, not in any {t.period}."] \
        if untimed else []
    if len([p for p in totals if totals[p]]) < 2:
        return [f"Fewer than two {t.period}s hold photos: nothing to compare over time.", *notes]
    found = significant(changes)
    if not changes:
        return [f"Every {t.period} has the same answers in the same shares (all of one kind): nothing to compare.",
                *notes]
    if not found:
        return [f"No change between consecutive {t.period}s is unlikely by chance ({len(changes)} compared, "
                f"false-discovery rate 5%).", *notes]
    return [c.words() for c in found] + [f"({len(found)} of {len(changes)} comparisons of consecutive {t.period}s; "
                                         f"p adjusted for all of them, Benjamini–Hochberg)", *notes]


def counted(per_car: bool) -> str:
    """What an analysis's shares are of: cars when it was made with a detector (a row per car), else photos."""
    return "cars" if per_car else "photos"


def trend_view(predictions: Path, period: str) -> tuple[go.Figure | None, list[str]]:
    """The trend chart and its sentences for an analysis's rows, per `period` (the Analyze tab's choice); no chart
    when it would have no point (no make named, or no photo with a time): the sentences say why."""
    from .summary import tally
    t = tally(predictions, period)
    figure = trend_figure(t, counted(t.per_car))
    return (figure if _has_points(figure) else None), trend_sentences(t)


def _has_points(figure: go.Figure) -> bool:
    return any(len(trace.x) for trace in figure.data)


def _trend_section(t: Tally, unit: str) -> list[str]:
    counts = "".join(f"<tr><td>{html.escape(period_label(p))}</td><td>{t.images[(ALL_GROUPS, p)]:,}</td></tr>"
                     for p in sorted({p for g, p in t.images if g == ALL_GROUPS and p != ALL_PERIODS},
                                     key=lambda p: (p == NO_TIME, p)))
    figure = trend_figure(t, unit)
    chart = _html(figure, "trend") if _has_points(figure) else ""  # no axes of nothing when no photo has a time
    return [f"<h2>Over time (per {t.period}, of {unit}, 95% bands)</h2>", chart,
            "<ul>" + "".join(f"<li>{html.escape(line)}</li>" for line in trend_sentences(t)) + "</ul>",
            f"<table><tr><th>{t.period}</th><th>photos</th></tr>{counts}</table>"]


def make_share_figure(summary: list[dict], top: int = 12, unit: str = "photos") -> go.Figure:
    """Share of each group's photos per make (the most frequent makes overall) and, in a panel of their own, the
    photos with no make (unsure, no car, unreadable), with 95% intervals: a collection the model is unsure of shows
    as such, not as a blank. One group alone is drawn once, as the whole collection."""
    summary = whole(summary)
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


def _html(fig: go.Figure, name: str, first: bool = False) -> str:
    # plotly.js is embedded once: the page works offline and as a single file; a fixed div id keeps the page the
    # same for the same rows (summarize rebuilds analyze's report exactly)
    return fig.to_html(full_html=False, include_plotlyjs=True if first else False, div_id=f"carapp-{name}")


def _table(rows: list[dict], what: str, unit: str = "photos") -> str:
    head = f"<tr><th>{what}</th><th>{unit}</th><th>share</th><th>95% interval</th></tr>"
    body = "".join(f"<tr><td>{html.escape(r['name'])}</td><td>{r['count']}</td><td>{r['share']:.1%}</td>"
                   f"<td>{r['ci_low']:.1%} – {r['ci_high']:.1%}</td></tr>" for r in rows)
    return f"<table>{head}{body}</table>"


def _reasons_table(refusals: Counter) -> str:
    if not refusals:
        return "<p>None.</p>"
    body = "".join(f"<tr><td>{html.escape(why)}</td><td>{n}</td></tr>" for why, n in
                   sorted(refusals.items(), key=lambda kv: (-kv[1], kv[0])))
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
