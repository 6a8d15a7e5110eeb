"""Evaluate tab: where a trained run goes wrong and how far its answers can be trusted — top-1/top-5/macro-F1 and
make-level top-1, calibration (reliability before/after), accuracy against coverage, accuracy per viewpoint,
per-class accuracy, the confusion matrix (whole, and the most-confused classes), the most-confused pairs, and
misclassified test images."""
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


PAIR_COLUMNS = ["true", "predicted as", "images"]
CLASS_COLUMNS = ["class", "accuracy", "support"]
VIEW_COLUMNS = ["viewpoint", "accuracy", "images"]
# summary, per_class, full, sub, pairs, gallery, reliability, coverage, viewpoints: nothing shown, headers kept
EMPTY = ("", pd.DataFrame(columns=CLASS_COLUMNS), None, None, pd.DataFrame(columns=PAIR_COLUMNS), [], None, None,
         pd.DataFrame(columns=VIEW_COLUMNS))


def evaluate(name: str | None, recompute: bool, settings: AppSettings):
    """Show the stored test report. Evaluating anew (asked, or never done) is a background job of the owner's: on a
    public app the reports are read-only, since one evaluation costs minutes of CPU on CompCars."""
    from ..evaluate import read_report
    run = jobs.find_run(settings.runs_dir, name)
    if run is None or not (run / "best.pt").is_file():
        raise gr.Error("Choose a trained run (train one in the Train tab).", print_exception=False)
    report = None if recompute and settings.training_enabled else read_report(run)  # public: read-only
    if report is not None:
        return *render(report), _mtime(run / "test_metrics.json")
    if not settings.training_enabled:
        raise gr.Error("This run has no test report yet, and this public app does not run evaluations.",
                       print_exception=False)
    try:
        jobs.start_evaluation(run, settings.runs_dir)
    except (jobs.JobError, ValueError, OSError) as exc:
        raise gr.Error(settings.redact(str(exc)), print_exception=False) from None
    return f"Evaluating **{run.name}** on its test split in the background…", *EMPTY[1:], _mtime(run / "test_metrics.json")


def stored(name: str | None, settings: AppSettings):
    """The chosen run's stored report, at once (no button): every run trained here has one."""
    from ..evaluate import read_report
    run = jobs.find_run(settings.runs_dir, name)
    report = read_report(run) if run is not None and (run / "best.pt").is_file() else None
    if report is None:
        hint = "" if run is None else f"**{run.name}** has no test report yet" + (
            ": press Evaluate." if settings.training_enabled else ".")
        return hint, *EMPTY[1:], 0.0
    return *render(report), _mtime(run / "test_metrics.json")


def progress(name: str | None, shown: float, settings: AppSettings):
    """Timer: the evaluation's progress line, and the new report once a job finished it (shown = its mtime)."""
    from ..evaluate import read_report
    run = jobs.find_run(settings.runs_dir, name)
    if run is None:
        return gr.skip(), shown, *[gr.skip()] * len(EMPTY)
    p = jobs.evaluation_status(run)
    line = ""
    if p.get("status") == "running":
        done, total = p.get("done", 0), p.get("total")
        line = f"Evaluating **{run.name}**: {done}/{total or '?'} test images…"
    elif p.get("status") in ("failed", "interrupted"):
        line = settings.redact(f"Evaluation of **{run.name}** {p['status']}: {p.get('error') or 'see console.log'}")
    report_time = _mtime(run / "test_metrics.json")
    if p.get("status") == "finished" and report_time > shown and (report := read_report(run)):
        return line, report_time, *render(report)
    return line, shown, *[gr.skip()] * len(EMPTY)


def _mtime(path) -> float:
    try:
        return path.stat().st_mtime
    except OSError:
        return 0.0


def render(report: dict):
    m, names, cm = report["metrics"], report["names"], report["confusion"]
    summary = (f"**{report['backbone']}** at {report['image_size']} px, {len(names)} classes  \n"
               f"**top-1** {m['top1']:.2%} · **top-5** {m['top5']:.2%} · **macro-F1** {m['macro_f1']:.3f} "
               f"on {m['num_images']:,} test images  \n{trust_markdown(m)}")
    per_class = pd.DataFrame([{"class": r["name"], "accuracy": round(float(r["accuracy"]), 3) if r["accuracy"] else None,
                               "support": int(r["support"])} for r in report["per_class"]])
    per_class = per_class.sort_values("accuracy", na_position="last")
    focus = plots.confused_classes(cm)
    sub = plots.confusion_figure(cm[focus][:, focus], [names[i] for i in focus], "Most-confused classes") \
        if focus else None
    pairs = pd.DataFrame([{"true": names[i], "predicted as": names[j], "images": n}
                          for i, j, n in plots.most_confused(cm, 20)], columns=PAIR_COLUMNS)
    return (summary, per_class, plots.confusion_figure(cm, names, f"Confusion matrix ({len(names)} classes)"),
            sub, pairs, misclassified(report), *trust_figures(m))


def trust_markdown(m: dict) -> str:
    """Make-level top-1, calibration and confident-answer figures (runs evaluated before calibration lack them)."""
    if "ece" not in m:
        return "_Evaluated before answers were calibrated: re-evaluate for calibration and coverage figures._"
    line = (f"**make top-1** {m['make_top1']:.2%} · **ECE** {m['ece']:.3f} (uncalibrated {m['ece_uncalibrated']:.3f})"
            f" · **answered with a model** {m['coverage']:.1%}")
    if m.get("selective_accuracy") is not None:
        line += f", **{m['selective_accuracy']:.1%} of them right**"
    counts = m.get("status_counts", {})
    line += "  \n" + " · ".join(f"{status}: {n}" for status, n in counts.items())
    if not m.get("calibrated"):
        line += "  \n_Not calibrated: `python -m carapp calibrate --run RUN`, then re-evaluate._"
    return line


def trust_figures(m: dict):
    if "reliability_before" not in m:
        return None, None, EMPTY[-1]
    views = m.get("per_viewpoint") or {}
    return (plots.reliability_figure(m["reliability_before"], m["reliability_after"], m["ece_uncalibrated"],
                                     m["ece"]),
            plots.coverage_figure(m["coverage_curve"], m["thresholds"]["model"]),
            pd.DataFrame([{"viewpoint": v, "accuracy": round(x["accuracy"], 3), "images": x["images"]}
                          for v, x in views.items()], columns=VIEW_COLUMNS))


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
            recompute = gr.Checkbox(label="Re-evaluate now (a background job)", value=False,
                                    visible=settings.training_enabled)
            button = gr.Button("Evaluate", variant="primary")
        job_line = gr.Markdown(elem_id="evaluate-progress")
        summary = gr.Markdown(elem_id="evaluate-summary")
        with gr.Row():
            reliability = gr.Plot(label="Calibration", elem_id="reliability")
            coverage = gr.Plot(label="Accuracy against coverage", elem_id="coverage")
        viewpoints = gr.Dataframe(pd.DataFrame(columns=VIEW_COLUMNS), interactive=False,
                                  label="Accuracy per viewpoint (CompCars labels)")
        with gr.Row():
            per_class = gr.Dataframe(pd.DataFrame(columns=CLASS_COLUMNS), interactive=False,
                                     label="Per-class accuracy (click a header to sort)", max_height=400)
            pairs = gr.Dataframe(pd.DataFrame(columns=PAIR_COLUMNS), label="Most-confused pairs", interactive=False,
                                 max_height=400)
        full = gr.Plot(label="Confusion matrix (hover for counts)")
        sub = gr.Plot(label="Most-confused classes")
        gallery = gr.Gallery(label="Misclassified test images: true → predicted (confidence)", columns=6, height="auto")
        shown = gr.State(0.0)
        timer = gr.Timer(2.0)
    report = [summary, per_class, full, sub, pairs, gallery, reliability, coverage, viewpoints]
    button.click(lambda n, r: evaluate(n, r, settings), [run, recompute], [*report, shown], api_name="evaluate")
    timer.tick(lambda n, t: progress(n, t, settings), [run, shown], [job_line, shown, *report],
               api_visibility="private")
    demo.load(lambda: evaluated_runs(settings), None, run, api_visibility="private")
    run.change(lambda n: stored(n, settings), run, [*report, shown], api_visibility="private")
