"""Plotly figures for the app: class counts, training curves, confusion matrices. No Gradio here."""
from __future__ import annotations

import numpy as np
import plotly.graph_objects as go
from plotly.subplots import make_subplots

LAYOUT = dict(template="plotly_white", margin=dict(l=50, r=20, t=40, b=40), height=360)


def class_counts_figure(names: list[str], counts: list[int], threshold: int | None = None,
                        log_scale: bool = False) -> go.Figure:
    """Images per class, largest first; the filter threshold as a line."""
    order = np.argsort(counts)[::-1]
    fig = go.Figure(go.Bar(x=[names[i] for i in order], y=[counts[i] for i in order],
                           hovertemplate="%{x}: %{y} images<extra></extra>"))
    if threshold:
        fig.add_hline(y=threshold, line_dash="dash", line_color="firebrick",
                      annotation_text=f"kept: ≥ {threshold} images", annotation_position="top right")
    fig.update_layout(title="Images per class", yaxis_type="log" if log_scale else "linear",
                      xaxis=dict(showticklabels=len(names) <= 60), **LAYOUT)
    return fig


def bar_figure(values: dict[str, int], title: str) -> go.Figure:
    fig = go.Figure(go.Bar(x=list(values), y=list(values.values())))
    fig.update_layout(title=title, **LAYOUT)
    return fig


def sizes_figure(sizes: list[tuple[int, int]]) -> go.Figure:
    """Width against height of a sample of images; repeated sizes stack into bigger markers."""
    counts: dict[tuple[int, int], int] = {}
    for size in sizes:
        counts[size] = counts.get(size, 0) + 1
    fig = go.Figure(go.Scatter(x=[w for w, _ in counts], y=[h for _, h in counts], mode="markers",
                               marker=dict(size=[6 + 24 * (n / max(counts.values())) ** 0.5 for n in counts.values()]),
                               customdata=list(counts.values()),
                               hovertemplate="%{x}×%{y} px: %{customdata} images<extra></extra>"))
    fig.update_layout(title=f"Image sizes (sample of {len(sizes)})", xaxis_title="width (px)",
                      yaxis_title="height (px)", **LAYOUT)
    return fig


def curves_figure(metrics: list[dict], steps: list[dict] | None = None) -> go.Figure:
    """Train/val loss and accuracy per epoch, side by side; with `steps` (rundir.read_steps) also the training
    pass's running figures as they came, so the curves move from the first seconds, not from the first epoch's end."""
    fig = make_subplots(rows=1, cols=2, subplot_titles=("Loss", "Accuracy"))
    epochs = [m["epoch"] for m in metrics]
    at = [s["epoch"] - 1 + s["step"] / max(s["steps"], 1) for s in steps or []]  # epoch 1 ends at x = 1
    for col, key in ((1, "loss"), (2, "acc")):
        if steps:
            fig.add_trace(go.Scatter(x=at, y=[s[key] for s in steps], mode="lines", name=f"train {key} (running)",
                                     line=dict(width=1), opacity=0.6), row=1, col=col)
        for split, dash in (("train", "solid"), ("val", "dash")):
            fig.add_trace(go.Scatter(x=epochs, y=[m[f"{split}_{key}"] for m in metrics], mode="lines+markers",
                                     name=f"{split} {key}", line=dict(dash=dash)), row=1, col=col)
    fig.update_xaxes(title_text="epoch")
    fig.update_layout(**LAYOUT)
    return fig


def lr_find_figure(result: dict) -> go.Figure:
    """The range test: smoothed loss against the learning rate (log axis), the suggestion marked."""
    fig = go.Figure(go.Scatter(x=result["lrs"], y=result["losses"], mode="lines", name="smoothed loss"))
    fig.add_trace(go.Scatter(x=result["lrs"], y=result["raw_losses"], mode="markers", name="batch loss",
                             marker=dict(size=4, opacity=0.35)))
    fig.add_vline(x=result["suggested_lr"], line_dash="dash", line_color="firebrick",
                  annotation_text=f"suggested {result['suggested_lr']:.1e}", annotation_position="top left")
    top = max(result["losses"]) * 1.1  # the batch losses of a diverging tail would flatten the curve
    fig.update_layout(title="Learning-rate range test", xaxis=dict(type="log", title="learning rate"),
                      yaxis=dict(title="loss", range=[min(result["losses"]) * 0.9, top]), **LAYOUT)
    return fig


def confusion_figure(cm: np.ndarray, names: list[str], title: str) -> go.Figure:
    """Row-normalised confusion matrix as a heatmap; counts on hover. Readable at hundreds of classes."""
    rows = cm.sum(1, keepdims=True)
    norm = np.divide(cm, rows, out=np.zeros_like(cm, dtype=float), where=rows > 0)
    fig = go.Figure(go.Heatmap(z=norm, x=names, y=names, customdata=cm, colorscale="Blues", zmin=0, zmax=1,
                               hovertemplate="true %{y}<br>predicted %{x}<br>%{customdata} images "
                                             "(%{z:.0%} of the row)<extra></extra>"))
    small = len(names) <= 40
    fig.update_layout(title=title, xaxis=dict(title="predicted", showticklabels=small),
                      yaxis=dict(title="true", showticklabels=small, autorange="reversed"),
                      **{**LAYOUT, "height": 560})
    return fig


def most_confused(cm: np.ndarray, k: int = 10) -> list[tuple[int, int, int]]:
    """The k largest off-diagonal cells as (true, predicted, count), largest first."""
    off = cm.copy()
    np.fill_diagonal(off, 0)
    flat = np.argsort(off, axis=None)[::-1][:k]
    return [(int(i), int(j), int(off[i, j])) for i, j in zip(*np.unravel_index(flat, off.shape)) if off[i, j] > 0]


def confused_classes(cm: np.ndarray, k: int = 15) -> list[int]:
    """The classes involved in the most confusions: the rows/columns of a readable sub-matrix."""
    off = cm.copy()
    np.fill_diagonal(off, 0)
    weight = off.sum(0) + off.sum(1)
    return [int(i) for i in np.argsort(weight)[::-1][:k] if weight[i] > 0]


def reliability_figure(before: list[dict], after: list[dict], ece_before: float, ece_after: float) -> go.Figure:
    """Accuracy against confidence per bin, before and after calibration; the diagonal is perfect calibration."""
    fig = go.Figure(go.Scatter(x=[0, 1], y=[0, 1], mode="lines", line=dict(dash="dot", color="grey"),
                               name="perfectly calibrated"))
    for bins, name in ((before, f"before (ECE {ece_before:.3f})"), (after, f"after (ECE {ece_after:.3f})")):
        filled = [b for b in bins if b["count"]]
        fig.add_trace(go.Scatter(x=[b["confidence"] for b in filled], y=[b["accuracy"] for b in filled],
                                 mode="lines+markers", name=name, customdata=[b["count"] for b in filled],
                                 hovertemplate="confidence %{x:.2f}: accuracy %{y:.2f} (%{customdata} images)"))
    fig.update_layout(title="Reliability: is a 90% answer right 90% of the time?", xaxis_title="confidence",
                      yaxis_title="accuracy", xaxis_range=[0, 1], yaxis_range=[0, 1.02], **LAYOUT)
    return fig


def coverage_figure(curve: list[dict], threshold: float) -> go.Figure:
    """Accuracy of the answers given against the share answered, as the threshold moves; the chosen one marked."""
    points = [c for c in curve if c["accuracy"] is not None]
    fig = go.Figure(go.Scatter(x=[c["coverage"] for c in points], y=[c["accuracy"] for c in points],
                               mode="lines", name="all thresholds", customdata=[c["threshold"] for c in points],
                               hovertemplate="threshold %{customdata:.2f}: %{x:.0%} answered, %{y:.1%} right"))
    chosen = min(points, key=lambda c: abs(c["threshold"] - threshold), default=None)
    if chosen:
        fig.add_trace(go.Scatter(x=[chosen["coverage"]], y=[chosen["accuracy"]], mode="markers",
                                 marker=dict(size=12, color="firebrick"), name=f"chosen threshold {threshold:.2f}"))
    accuracies = [c["accuracy"] for c in points]
    narrow = bool(accuracies) and max(accuracies) - min(accuracies) < 0.1  # whole percents would repeat: 99%, 99%
    fig.update_layout(title="Accuracy against coverage", xaxis_title="share of images answered with a model",
                      yaxis_title="accuracy of those answers", xaxis_tickformat=".0%",
                      yaxis_tickformat=".1%" if narrow else ".0%", **LAYOUT)
    return fig
