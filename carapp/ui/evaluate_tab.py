"""Evaluate tab: where a trained run goes wrong — top-1/top-5/macro-F1, per-class accuracy, the confusion matrix
(whole, and the most-confused classes), the most-confused pairs, and misclassified test images."""
from __future__ import annotations

import os
import gradio as gr
import pandas as pd

from .. import jobs, plots
from ..images import ImageError, open_image
from .settings import AppSettings


def evaluated_runs(settings: AppSettings):
    runs = [r.name for r in jobs.list_runs(settings.runs_dir) if (r.path / "best.pt").is_file()]
    return gr.Dropdown(choices=runs, value=runs[0] if runs else None)


def evaluate(name: str | None, recompute: bool, settings: AppSettings):
    from ..evaluate import evaluate_run, read_report
    run = jobs.find_run(settings.runs_dir, name)
    if run is None or not (run / "best.pt").is_file():
        raise gr.Error("Choose a trained run (train one in the Train tab).", print_exception=False)
    report = None if recompute else read_report(run)
    if report is None:  # not evaluated yet (a stopped run) or asked again: evaluate best.pt on the test split now
        try:
            evaluate_run(run, "test", workers=0)
        except (ValueError, OSError) as exc:
            raise gr.Error(f"Cannot evaluate {name}: {exc}", print_exception=False) from None
        report = read_report(run)
    return render(report)


def render(report: dict):
    m, names, cm = report["metrics"], report["names"], report["confusion"]
    summary = (f"**top-1** {m['top1']:.2%} · **top-5** {m['top5']:.2%} · **macro-F1** {m['macro_f1']:.3f} "
               f"on {m['num_images']:,} test images")
    per_class = pd.DataFrame([{"class": r["name"], "accuracy": round(float(r["accuracy"]), 3) if r["accuracy"] else None,
                               "support": int(r["support"])} for r in report["per_class"]])
    per_class = per_class.sort_values("accuracy", na_position="last")
    focus = plots.confused_classes(cm)
    sub = plots.confusion_figure(cm[focus][:, focus], [names[i] for i in focus], "Most-confused classes") \
        if focus else None
    pairs = pd.DataFrame([{"true": names[i], "predicted as": names[j], "images": n}
                          for i, j, n in plots.most_confused(cm, 20)], columns=["true", "predicted as", "images"])
    return (summary, per_class, plots.confusion_figure(cm, names, f"Confusion matrix ({len(names)} classes)"),
            sub, pairs, misclassified(report))


def misclassified(report: dict, n: int = 24) -> list:
    names, items = report["names"], []
    wrong = [p for p in report["predictions"] if p["label"] != p["pred"]]
    for row in sorted(wrong, key=lambda p: -float(p["prob"]))[:n]:
        try:
            img = open_image(os.path.join(report["data"], row["path"]))
        except (ImageError, OSError):
            continue
        img.thumbnail((256, 256))
        items.append((img, f"{names[int(row['label'])]} → {names[int(row['pred'])]} ({float(row['prob']):.0%})"))
    return items


def build(settings: AppSettings, demo: gr.Blocks) -> None:
    with gr.Tab("Evaluate"):
        with gr.Row():
            run = gr.Dropdown(label="Run", choices=[], scale=3, allow_custom_value=True)  # filled on load
            recompute = gr.Checkbox(label="Re-evaluate now", value=False)
            button = gr.Button("Evaluate", variant="primary")
        summary = gr.Markdown()
        with gr.Row():
            per_class = gr.Dataframe(label="Per-class accuracy (click a header to sort)", interactive=False,
                                     max_height=400)
            pairs = gr.Dataframe(label="Most-confused pairs", interactive=False, max_height=400)
        full = gr.Plot(label="Confusion matrix (hover for counts)")
        sub = gr.Plot(label="Most-confused classes")
        gallery = gr.Gallery(label="Misclassified test images: true → predicted (confidence)", columns=6, height=320)
    button.click(lambda n, r: evaluate(n, r, settings), [run, recompute], [summary, per_class, full, sub, pairs, gallery],
                 api_name="evaluate")
    demo.load(lambda: evaluated_runs(settings), None, run, api_visibility="private")
