"""Train tab: the recipe's settings and presets, Start / Stop / Resume of a background job, and a live view of
whichever run is training (or the one chosen), refreshed by a timer from the run directory alone."""
from __future__ import annotations

import json
from pathlib import Path

import gradio as gr
import pandas as pd

from .. import plots, rundir
from ..config import PRESETS, batch_size_value, make_config, train_options
from ..runs import active_run, find_run, list_runs, run_eta, status_of
from . import hardware, jobs
from .settings import AppSettings, ensure_data

TABLE_COLUMNS = {"epoch": "Epoch", "train_loss": "Train Loss", "train_acc": "Train Accuracy",
                 "val_loss": "Validation Loss", "val_acc": "Validation Accuracy", "lr": "LR", "seconds": "Seconds"}
FORM_GROUPS = ("basic", "advanced")  # the form's rows: the basic recipe, then the "Advanced" accordion


def form_options(group: str | None = None) -> list:
    """The training options the Train form shows (config.option's `form`), in declaration order."""
    return [f for f in train_options() if f.metadata["form"] in ((group,) if group else FORM_GROUPS)]


def form_rows() -> list[list]:
    """The form's rows of options: the basic ones; in the "Advanced" accordion, the values, then the switches (a
    tick box and its note need a row's room)."""
    switch = lambda f: isinstance(f.default, bool)  # noqa: E731
    advanced = form_options("advanced")
    return [form_options("basic"), [f for f in advanced if not switch(f)], [f for f in advanced if switch(f)]]


def form_fields() -> list[str]:
    """The names of the form's options in the form's order: the Start button's inputs after dataset and preset."""
    return [f.name for row in form_rows() for f in row]


def preset_values(preset: str) -> list:
    cfg = make_config(preset)
    return [getattr(cfg, name) for name in form_fields()]


def _is_integer(f) -> bool:
    return f.metadata["parse"] in (int, batch_size_value) or type(f.default) is int


def form_component(f, value) -> gr.components.Component:
    """The form's box for one option, from its declaration: a list for choices, a tick for a switch, a number or a
    text box."""
    how = f.metadata
    label, info = how["label"] or f.name, how["info"] or None
    if how["choices"]:
        return gr.Dropdown(list(how["choices"]), value=value, label=label, info=info)
    if isinstance(f.default, bool):
        return gr.Checkbox(value, label=label, info=info)
    if _is_integer(f):
        return gr.Number(value, label=label, precision=0, info=info)
    if isinstance(value, float):
        return gr.Number(value, label=label, info=info)
    return gr.Textbox(value, label=label, info=info)


PUBLIC_WEIGHTS = ("none", "imagenet")   # a public app never opens a file path a visitor typed
LR_FIND_STEPS = 100  # the range test's sweep: fastai's default length


def form_config(root: str, preset: str, options: dict | None, settings: AppSettings):
    """The TrainConfig of the form's options ({name: value}; a blank or missing one: the preset's value); refused
    like Start when training is off. Only the form's options: the others (server folders among them) are the
    owner's, on the command line."""
    if not settings.training_enabled:
        raise gr.Error(settings.training_off, print_exception=False)
    if not isinstance(options, dict):
        raise ValueError("the training options are one JSON object: {\"epochs\": 5, ...} (an empty {} keeps the "
                         "preset's values)")
    unknown = sorted(set(options) - set(form_fields()))
    if unknown:
        raise ValueError(f"unknown training option(s) {', '.join(map(repr, unknown))}; the form's are: "
                         + ", ".join(form_fields()))
    if not settings.paths_editable or not root:
        root = settings.data
    if root == settings.data:
        ensure_data(settings)
    fields = {k: v for k, v in options.items() if v not in (None, "")}  # blank: the preset's value
    for f in form_options():
        if f.name in fields and _is_integer(f):
            fields[f.name] = int(fields[f.name])
    if not settings.paths_editable and fields.get("weights", "none") not in PUBLIC_WEIGHTS:
        raise ValueError(f"on a public app the weights are one of: {', '.join(PUBLIC_WEIGHTS)}")
    return make_config(preset, data=root, **fields)


def start(root: str, preset: str, options: dict | None, settings: AppSettings) -> str:
    """/start_training: the dataset folder, the preset, and the form's options as one {name: value} object."""
    try:
        run = jobs.start_training(form_config(root, preset, options, settings), settings.runs_dir)
    except (jobs.JobError, ValueError, TypeError) as exc:
        raise gr.Error(settings.redact(str(exc)), print_exception=False) from None
    return f"Started **{run.name}**."


def find_lr(root: str, preset: str, options: dict | None, settings: AppSettings):
    """The learning-rate range test on the form's settings, in this process (a minute or two; it writes no run).
    Not beside a training run: both would compete for the same cores or GPU."""
    from ..training.lrfind import lr_find
    try:
        cfg = form_config(root, preset, options, settings)
        if active_run(settings.runs_dir) is not None:
            raise jobs.JobError("a run is training: find the learning rate before or after it (one job at a time)")
        result = lr_find(cfg, steps=LR_FIND_STEPS)
    except (jobs.JobError, ValueError, TypeError, OSError) as exc:
        raise gr.Error(settings.redact(str(exc)), print_exception=False) from None
    return (f"**Suggested learning rate: {result['suggested_lr']:.1e}** (steepest descent of the smoothed loss; "
            f"lowest loss at {result['min_loss_lr']:.1e}, {result['steps']} steps). Put it in the Learning rate box."
            ), plots.lr_find_figure(result)


def stop(settings: AppSettings) -> str:
    """The owner stops any run; on a public app a visitor may stop only a job this app started, never one the
    owner started from the command line."""
    if not settings.training_enabled:
        raise gr.Error(settings.training_off, print_exception=False)
    active = active_run(settings.runs_dir)
    if active is None:
        return "No run is training."
    if settings.public and not jobs.started_by_app(settings.runs_dir, active.path):
        raise gr.Error("This run was not started from this app: only its owner can stop it.", print_exception=False)
    jobs.stop_training(active.path)
    return f"Stopping **{active.name}** after its current step…"


def resume(name: str | None, epochs: str | float | None, settings: AppSettings) -> str:
    if not settings.training_enabled:
        raise gr.Error(settings.training_off, print_exception=False)
    run = find_run(settings.runs_dir, name)
    if run is None:
        raise gr.Error("Choose a run to resume.", print_exception=False)
    try:
        more = str(epochs).strip() if epochs not in (None, "") else ""
        if more and not (more.isdigit() and int(more) > 0):
            raise ValueError(f"max epochs must be a whole number above 0 (or blank to keep the run's), not {more!r}")
        run = jobs.resume_training(run, settings.runs_dir, int(more) if more else None)
    except (jobs.JobError, ValueError) as exc:
        raise gr.Error(settings.redact(str(exc)), print_exception=False) from None
    return f"Resuming **{run.name}**: loading PyTorch and the run (a few seconds)…"


def watched_run(name: str | None, runs: list, settings: AppSettings) -> Path | None:
    """Among `runs` (list_runs, newest first): the training run if there is one (or one this app is
    starting), else the chosen run, else the newest."""
    job = jobs.app_job(settings.runs_dir)
    starting = job["run"] if job and job.get("kind") == "train" else None
    by_name = {r.name: r.path for r in runs}
    active = next((r.path for r in runs if r.status == "running"), None)
    return active or by_name.get(starting) or by_name.get(name) or (runs[0].path if runs else None)


def epoch_table(metrics: list[dict]) -> pd.DataFrame:
    return pd.DataFrame(metrics, columns=list(TABLE_COLUMNS)).rename(columns=TABLE_COLUMNS).round(4)


def status(name: str | None, settings: AppSettings, runs: list | None = None):
    run = watched_run(name, list_runs(settings.runs_dir, "classifier") if runs is None else runs, settings)
    if run is None:
        return "No runs yet: choose a preset and press Start.", None, epoch_table([]), "", "", {}
    progress = rundir.read_progress(run)
    metrics = rundir.read_metrics(run)
    table = epoch_table(metrics)
    test = progress.get("test") or rundir.read_json(run / "test_metrics.json")
    test_md = (f"**Test (best.pt):** top-1 {test['top1']:.2%}, top-5 {test['top5']:.2%}, macro-F1 "
               f"{test['macro_f1']:.3f} on {test['num_images']} images" if test else "")
    raw = json.loads(settings.redact(json.dumps({**progress, "run": run.name, "status": status_of(progress)})))
    steps = rundir.read_steps(run)
    return (settings.redact(status_markdown(run, progress, metrics)),
            plots.curves_figure(metrics, steps) if metrics or steps else None,
            table, settings.redact(log_tail(run)), test_md, raw)


def status_markdown(run: Path, p: dict, metrics: list[dict]) -> str:
    state = status_of(p)
    job = jobs.app_job(run.parent)
    if state != "running" and job and job["run"] == run.name and job.get("kind") == "train":
        return f"**{run.name}** — starting (loading PyTorch and the data)…"
    line = f"**{run.name}** — {state}"
    if p.get("epoch"):
        line += f", epoch {p['epoch']}/{p.get('epochs', '?')}"
    if state == "running" and p.get("steps"):
        line += (f", step {p['step']}/{p['steps']} — loss {p['running_loss']:.4f}, acc {p['running_acc']:.3f}, "
                 f"{p['images_per_sec']:.1f} img/s, epoch ETA {_duration(p['eta_seconds'])}")
        left = run_eta(p, metrics)
        if left is not None:
            line += f", run ETA {_duration(left)} (at most: early stopping may end it sooner)"
    if state == "failed":
        line += f"  \n**Error:** {p.get('error', 'see the log')}"
    if state in ("stopped", "interrupted"):
        line += " — resumable"
    return line


def _duration(seconds: float) -> str:
    seconds = int(round(seconds))
    return f"{seconds // 60} min {seconds % 60:02d} s" if seconds >= 60 else f"{seconds} s"


def log_tail(run: Path, lines: int = 25) -> str:
    for name in ("train.log", "console.log"):
        try:
            return "\n".join((run / name).read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            continue
    return ""


def run_labels(runs: list) -> list[tuple[str, str]]:
    """A running run names the epoch it is in, as the status line does; any other the epochs it finished."""
    return [(f"{r.name} (running, epoch {r.epochs_done + 1} of {r.epochs or '?'})" if r.status == "running" else
             f"{r.name} ({r.status}, {r.epochs_done} of {r.epochs or '?'} epochs)", r.name) for r in runs]


def run_choices(settings: AppSettings):
    labels = run_labels(list_runs(settings.runs_dir, "classifier"))
    return gr.Dropdown(choices=labels, value=labels[0][1] if labels else None)


def tick(name: str | None, message: str, shown: list, settings: AppSettings):
    """The timer: the live view, the Run list's labels when they changed (the choice stays), and a 'Stopping…' or
    'Resuming…' line dropped once it has come true."""
    runs = list_runs(settings.runs_dir, "classifier")  # once per tick: the labels, the busy test and the live view share it
    labels = [list(pair) for pair in run_labels(runs)]
    # choices only: the value stays the page's own (a Start in flight may be changing it right now)
    choices = gr.Dropdown(choices=labels) if labels != shown else gr.skip()
    busy = any(r.status == "running" for r in runs)
    if message and (message.startswith("Stopping") and not busy
                    or message.startswith(("Resuming", "Started")) and busy):
        message = ""
    return (*status(name, settings, runs), choices, labels, message)


def build(settings: AppSettings, demo: gr.Blocks) -> None:
    with gr.Tab("Train"):
        device = gr.Markdown("Device: …")
        if not settings.training_enabled:
            gr.Markdown(settings.training_off, elem_id="training-off")
        with gr.Group(visible=settings.training_enabled):
            with gr.Row():
                preset = gr.Dropdown(list(PRESETS), value="demo", label="Preset",
                                     info="paper: the paper's recipe · demo: CPU in minutes · "
                                     "finetune: ImageNet start, the full fine-tuning recipe")
                root = gr.Textbox(settings.data if settings.paths_editable else "", label="Dataset folder",
                                  placeholder="the app's dataset", interactive=settings.paths_editable)
            demo_values = make_config("demo")  # the demo preset's values from the start: a box is never blank
            basic, advanced, switches = form_rows()
            with gr.Row():
                inputs = [form_component(f, getattr(demo_values, f.name)) for f in basic]
            with gr.Accordion("Advanced: fine-tuning recipe", open=False):
                for row in (advanced, switches):
                    with gr.Row():
                        inputs += [form_component(f, getattr(demo_values, f.name)) for f in row]
        # outside the Group, one row of buttons and one of the resume controls, aligned at the bottom: no grey
        # filler under buttons that are shorter than the labelled boxes beside them
        with gr.Column(visible=settings.training_enabled):
            with gr.Row():
                start_btn = gr.Button("Start", variant="primary")
                stop_btn = gr.Button("Stop", variant="stop")
                lr_btn = gr.Button("Find learning rate")
            with gr.Row(equal_height=True):
                run_pick = gr.Dropdown(label="Run", choices=[], allow_custom_value=True, scale=3, elem_id="run-pick")  # filled on load
                more_epochs = gr.Textbox(label="Max epochs on resume", placeholder="blank: keep the run's", scale=1)
                resume_btn = gr.Button("Resume", scale=1)
        message = gr.Markdown(elem_id="train-message")
        with gr.Accordion("Learning-rate range test", open=False, visible=settings.training_enabled) as lr_box:
            lr_plot = gr.Plot(label="Loss against learning rate", elem_id="lr-find")
        live = gr.Markdown(elem_id="live")
        curves = gr.Plot(label="Loss and accuracy: running within each epoch, and per epoch", elem_id="curves")
        table = gr.Dataframe(epoch_table([]), label="Per epoch (as the paper's Table 6)", interactive=False)
        test = gr.Markdown()
        with gr.Accordion("Log", open=False) as log_box:
            log = gr.Textbox(lines=14, max_lines=14, show_label=False, autoscroll=True, elem_id="train-log")
        with gr.Accordion("Raw progress", open=False):
            raw = gr.JSON()
        timer = gr.Timer(1.5)
        shown_labels = gr.State([])
        api_options = gr.JSON(visible=False)  # /start_training and /find_lr: the form's options as one object
        api_start, api_find_lr = gr.Button(visible=False), gr.Button(visible=False)

    view = [live, curves, table, log, test, raw]
    demo.load(lambda: run_choices(settings), None, run_pick, api_visibility="private")
    demo.load(_device_markdown, None, device, api_visibility="private")
    preset.change(preset_values, preset, inputs, api_visibility="private")
    names = form_fields()  # the form's boxes, in the order of `inputs`
    start_btn.click(lambda r, p, *v: start(r, p, dict(zip(names, v)), settings), [root, preset, *inputs], message,
                    api_visibility="private").then(lambda: run_choices(settings), None, run_pick,
                                                   api_visibility="private")
    # the API's own: (dataset folder, preset, {option: value}), so a new option never moves another's place
    api_start.click(lambda r, p, o: start(r, p, o, settings), [root, preset, api_options], message,
                    api_name="start_training")
    stop_btn.click(lambda: stop(settings), None, message, api_name="stop_training")
    lr_btn.click(lambda: gr.Accordion(open=True), None, lr_box, api_visibility="private").then(
        lambda r, p, *v: find_lr(r, p, dict(zip(names, v)), settings), [root, preset, *inputs], [message, lr_plot],
        api_visibility="private")
    api_find_lr.click(lambda r, p, o: find_lr(r, p, o, settings), [root, preset, api_options], [message, lr_plot],
                      api_name="find_lr")
    resume_btn.click(lambda n, e: resume(n, e, settings), [run_pick, more_epochs], message, api_name="resume_training")
    timer.tick(lambda n, m, s: tick(n, m, s, settings), [run_pick, message, shown_labels],
               [*view, run_pick, shown_labels, message], api_visibility="private")
    run_pick.change(lambda n: status(n, settings), run_pick, view, api_name="training_status")
    # the log opens at its newest lines, where a person looks first
    log_box.expand(None, None, None, js=SCROLL_LOG_TO_END)


SCROLL_LOG_TO_END = """() => { setTimeout(() => { const t = document.querySelector('#train-log textarea');
    if (t) t.scrollTop = t.scrollHeight; }, 100); }"""


def _device_markdown() -> str:
    return f"**Device:** {hardware.description()}"
