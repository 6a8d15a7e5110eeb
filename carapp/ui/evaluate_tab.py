"""Evaluate tab: where a trained run goes wrong and how far its answers can be trusted — top-1/top-5/macro-F1 and
make-level top-1, calibration (reliability before/after), accuracy against coverage, accuracy per viewpoint,
per-class accuracy, the confusion matrix (whole, and the most-confused classes), the most-confused pairs, and
misclassified test images."""
from __future__ import annotations

import gradio as gr
import pandas as pd

from .. import exclusions, plots, rundir
from ..evaluation.answers import threshold_note
from ..runs import evaluation_status, find_run, list_runs
from . import error_analysis as errors
from . import jobs
from .photos import SIX_WIDE
from .settings import AppSettings


def evaluated_runs(settings: AppSettings):
    runs = [r.name for r in list_runs(settings.runs_dir, "classifier") if (r.path / "best.pt").is_file()]
    return gr.Dropdown(choices=runs, value=runs[0] if runs else None)


PAIR_COLUMNS = ["true", "predicted as", "images"]
CLASS_COLUMNS = ["class", "accuracy", "support"]
VIEW_COLUMNS = ["viewpoint", "accuracy", "images"]
# summary, per_class, full, sub, pairs, top losses, reliability, coverage, viewpoints, pair box, top-loss paths,
# suspects, suspect paths: nothing shown, headers kept
EMPTY = ("", pd.DataFrame(columns=CLASS_COLUMNS), None, None, pd.DataFrame(columns=PAIR_COLUMNS), [], None, None,
         pd.DataFrame(columns=VIEW_COLUMNS), gr.Dropdown(choices=[], value=None), [], [], [])


def evaluate(name: str | None, recompute: bool, settings: AppSettings):
    """Show the stored test report. Evaluating anew (asked, or never done) is a background job of the owner's: on a
    public app the reports are read-only, since one evaluation costs minutes of CPU on CompCars."""
    from ..evaluation.evaluate import read_report
    run = find_run(settings.runs_dir, name)
    if run is None or not (run / "best.pt").is_file():
        raise gr.Error("Choose a trained run (train one in the Train tab).", print_exception=False)
    report = None if recompute and settings.training_enabled else read_report(run)  # public: read-only
    if report is not None:
        return *render(report), rundir.mtime(run / "test_metrics.json")
    if not settings.training_enabled:
        raise gr.Error("This run has no test report yet, and this public app does not run evaluations.",
                       print_exception=False)
    try:
        jobs.start_evaluation(run, settings.runs_dir)
    except (jobs.JobError, ValueError, OSError) as exc:
        raise gr.Error(settings.redact(str(exc)), print_exception=False) from None
    return (f"Evaluating **{run.name}** on its test split in the background…", *EMPTY[1:],
            rundir.mtime(run / "test_metrics.json"))


def stored(name: str | None, settings: AppSettings):
    """The chosen run's stored report, at once (no button): every run trained here has one."""
    from ..evaluation.evaluate import read_report
    run = find_run(settings.runs_dir, name)
    report = read_report(run) if run is not None and (run / "best.pt").is_file() else None
    if report is None:
        hint = "" if run is None else f"**{run.name}** has no test report yet" + (
            ": press Evaluate." if settings.training_enabled else ".")
        return hint, *EMPTY[1:], 0.0
    return *render(report), rundir.mtime(run / "test_metrics.json")


def progress(name: str | None, shown: float, settings: AppSettings):
    """Timer: the evaluation's progress line, and the new report once a job finished it (shown = its mtime)."""
    from ..evaluation.evaluate import read_report
    run = find_run(settings.runs_dir, name)
    if run is None:
        return gr.skip(), shown, *[gr.skip()] * len(EMPTY)
    p = evaluation_status(run)
    line = ""
    if p.get("status") == "running":
        done, total = p.get("done", 0), p.get("total")
        line = f"Evaluating **{run.name}**: {done}/{total or '?'} test images…"
    elif p.get("status") in ("failed", "interrupted"):
        line = settings.redact(f"Evaluation of **{run.name}** {p['status']}: {p.get('error') or 'see console.log'}")
    report_time = rundir.mtime(run / "test_metrics.json")
    if p.get("status") == "finished" and report_time > shown and (report := read_report(run)):
        return line, report_time, *render(report)
    return line, shown, *[gr.skip()] * len(EMPTY)


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
    losses, loss_paths = errors.top_losses(report)
    return (summary, per_class, plots.confusion_figure(cm, names, f"Confusion matrix ({len(names)} classes)"),
            sub, pairs, losses, *trust_figures(m), errors.pair_choices(report), loss_paths,
            *errors.label_suspects(report))


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
    elif note := threshold_note(m):
        line += f"  \n_{note}_"
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
            pairs = gr.Dataframe(pd.DataFrame(columns=PAIR_COLUMNS), label="Most-confused pairs (click a row)",
                                 interactive=False, elem_id="pairs",
                                 max_height=400)
        full = gr.Plot(label="Confusion matrix (hover for counts)")
        sub = gr.Plot(label="Most-confused classes")
        gr.Markdown("### Error analysis\nChoose a true → predicted pair (or click a row of the most-confused pairs) "
                    "to see those test photos with the heatmap of the predicted class.")
        pair = gr.Dropdown(label="True → predicted", choices=[], elem_id="pair")
        pair_gallery = gr.Gallery(label="Photos of the pair, over the heatmap of the predicted class", columns=6,
                                  height=320, object_fit="contain", elem_id="pair-photos", elem_classes=SIX_WIDE)
        gallery = gr.Gallery(label="Top losses: the test photos whose own label looked least likely (true → "
                             "predicted, loss)", columns=6, height="auto", elem_id="top-losses",
                             object_fit="contain", elem_classes=SIX_WIDE)
        suspects = gr.Gallery(label="Label suspects (confident learning on held-out predictions)", columns=6,
                              height="auto", elem_id="label-suspects", object_fit="contain",
                              elem_classes=SIX_WIDE)
        with gr.Row(visible=settings.training_enabled):
            reason = gr.Radio([*exclusions.REASONS, exclusions.KEEP], value="wrong label", scale=3,
                              label="Mark the photo clicked in a gallery", info="'keep' takes it off the list")
            mark_button = gr.Button("Mark", scale=1)
        selected_line = gr.Markdown(elem_id="mark-line", visible=settings.training_enabled)
        marks = gr.Dataframe(pd.DataFrame(columns=errors.MARK_COLUMNS), interactive=False, max_height=250,
                             visible=settings.training_enabled, elem_id="marks",
                             label="Exclusion list (beside the runs): new runs started here leave these out")
        shown = gr.State(0.0)
        pair_paths, loss_paths, suspect_paths, selected = gr.State([]), gr.State([]), gr.State([]), gr.State(None)
        timer = gr.Timer(2.0)
    report = [summary, per_class, full, sub, pairs, gallery, reliability, coverage, viewpoints, pair, loss_paths,
              suspects, suspect_paths]
    _wire_error_analysis(settings, run, pairs, pair, pair_gallery, pair_paths, gallery, loss_paths, suspects,
                         suspect_paths, selected, selected_line, reason, mark_button, marks)
    demo.load(lambda: errors.marks_table(settings), None, marks, api_visibility="private")
    button.click(lambda n, r: evaluate(n, r, settings), [run, recompute], [*report, shown], api_name="evaluate")
    timer.tick(lambda n, t: progress(n, t, settings), [run, shown], [job_line, shown, *report],
               api_visibility="private")
    demo.load(lambda: evaluated_runs(settings), None, run, api_visibility="private")
    run.change(lambda n: stored(n, settings), run, [*report, shown], api_visibility="private")


def _wire_error_analysis(settings, run, pairs, pair, pair_gallery, pair_paths, gallery, loss_paths, suspects,
                         suspect_paths, selected, selected_line, reason, mark_button, marks) -> None:
    def on_pair_row(name, table, evt: gr.SelectData):
        return errors.pair_from_row(settings, name, table, evt)

    pairs.select(on_pair_row, [run, pairs], pair, api_visibility="private")
    pair.change(lambda n, p: errors.pair_photos(n, p, settings), [run, pair], [pair_gallery, pair_paths],
                api_name="pair_photos")
    for shown_gallery, paths in ((pair_gallery, pair_paths), (gallery, loss_paths), (suspects, suspect_paths)):
        shown_gallery.select(errors.select_photo, paths, [selected, selected_line], api_visibility="private")
    mark_button.click(lambda p, r: errors.mark_photo(p, r, settings), [selected, reason], [selected_line, marks],
                      api_name="mark_photo")
