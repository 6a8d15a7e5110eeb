"""Analyze tab: many photos or a zip (a server folder too, in a private app) → which makes and models appear, per
group, with 95% intervals. The analysis is a background job (`python -m carapp analyze`) that outlives the tab; the
view is read from its output folder every 2 s. In a public app a visitor sees only the analysis their own session
started: another visitor's photos are theirs."""
from __future__ import annotations

import contextlib
import csv
import io
import os
import shutil
import tempfile
import time
import uuid
from pathlib import Path

import gradio as gr
import pandas as pd

from .. import rundir, safecsv
from ..analysis.collection import ALL_GROUPS, READ_ERRORS, CollectionError, collect, item_of
from ..analysis.report import counted, make_share_figure, row_image
from ..analysis.summary import SUMMARY_COLUMNS, has_box, whole
from ..analysis.trends import PERIODS
from ..atomic import atomic_writer
from ..evaluation.answers import refusal_tag
from ..runs import job_status
from . import hardware, jobs
from .photos import SIX_WIDE
from .predict_tab import default_model, model_choices, resolve_model
from .settings import AppSettings
from .uploads import accepted_upload

OUTPUTS = ("predictions.csv", "summary.csv", "report.html")
UPLOADS = "uploads.csv"  # in the output folder: the uploaded photos, for the job to read
BUSY = "The app is busy with another job (one at a time): try again in a few minutes."


def analyses_dir(settings: AppSettings) -> Path:
    return Path(settings.runs_dir) / "analyses"


def start(files, folder: str | None, model: str | None, group_by: str, settings: AppSettings):
    """Start an analysis of the uploads (or, in a private app, a server folder) as a background job; returns the
    message and the analysis's name, which the session keeps (a public app shows a visitor only their own)."""
    source = resolve_model(model or default_model(settings), settings)
    if settings.public:
        expire_analyses(settings)
    out = analyses_dir(settings) / f"{time.strftime('analysis-%Y%m%d-%H%M%S')}-{uuid.uuid4().hex[:4]}"
    try:
        sources = _sources(files or [], folder, out, settings)
        jobs.start_analysis(sources, source, out, settings.runs_dir, group_by if group_by == "none" else "folder",
                            settings.detector_source)
    except (jobs.JobError, ValueError, OSError, gr.Error) as exc:
        shutil.rmtree(out, ignore_errors=True)  # the folder of an analysis that never started
        if isinstance(exc, gr.Error):
            raise
        if settings.public and isinstance(exc, jobs.JobBusy):  # which analysis, and so when, is another's business
            raise gr.Error(BUSY, print_exception=False) from None
        raise gr.Error(settings.redact(str(exc)), print_exception=False) from None
    return f"Analysing **{out.name}** in the background…", out.name


def _sources(files: list, folder: str | None, out: Path, settings: AppSettings) -> list[str]:
    """Uploaded zips are sources of their own; uploaded photos go into one list file in the output folder."""
    if folder and folder.strip():
        if not settings.paths_editable:
            raise gr.Error("This public app analyses uploads only.", print_exception=False)
        return [folder.strip()]
    paths = list(dict.fromkeys(accepted_upload(f) for f in files))  # one upload named twice is analysed once
    if not paths:
        raise gr.Error("Drop photos or a zip of photos first.", print_exception=False)
    out.mkdir(parents=True, exist_ok=True)
    zips = [p for p in paths if p.lower().endswith(".zip")]
    photos = [p for p in paths if p not in zips]
    if photos:  # a CSV with a path column, quoted: no file name (a comma, a newline, "path") changes how it reads
        with open(out / UPLOADS, "w", newline="") as f:
            csv.writer(f).writerows([["path"], *([p] for p in photos)])
    sources = zips + ([str(out / UPLOADS)] if photos else [])
    if settings.public:
        _check_caps(sources, paths, settings)
    return sources


def _check_caps(sources: list[str], uploads: list[str], settings: AppSettings) -> None:
    """A public analysis is bounded by the photos the job will read (collect's own count: a zip by its members)
    and by the megabytes sent."""
    try:
        images = len(collect(sources)[0])
    except CollectionError as exc:  # a bad or bomb zip is refused here, named as the visitor named it
        said = str(exc)
        for upload in uploads:
            said = said.replace(upload, os.path.basename(upload))
        raise gr.Error(said, print_exception=False) from None
    size_mb = sum(os.path.getsize(p) for p in uploads) / 2**20
    if images > settings.analyze_max_files or size_mb > settings.analyze_max_mb:
        raise gr.Error(f"This public app analyses at most {settings.analyze_max_files} photos and "
                       f"{settings.analyze_max_mb} MB at a time, a zip counted by the photos in it "
                       f"({images} photos, {size_mb:.0f} MB sent).", print_exception=False)


def expire_analyses(settings: AppSettings) -> list[str]:
    """A public app's analyses, with their download copies, go when older than analyses_max_hours, then the oldest
    while all of them take more than analyses_max_mb: visitors cannot fill the disk. The running one stays.
    Returns the names deleted."""
    job = jobs.app_job(settings.runs_dir)
    running = Path(job["folder"]).name if job and job.get("folder") else None
    folders = sorted(analyses_dir(settings).glob("analysis-*"), key=rundir.mtime)
    sizes = {p: _size(p) + _size(_download_folder(p, True)) for p in folders}
    total, too_old, gone = sum(sizes.values()), time.time() - settings.analyses_max_hours * 3600, []
    for folder in folders:  # oldest first
        if folder.name == running or rundir.mtime(folder) >= too_old and total <= settings.analyses_max_mb * 2**20:
            continue
        shutil.rmtree(folder, ignore_errors=True)
        shutil.rmtree(_download_folder(folder, True), ignore_errors=True)
        total -= sizes[folder]
        gone.append(folder.name)
    return gone


def _size(folder: Path) -> int:
    """Bytes in a folder's files; one that goes while they are counted counts 0."""
    total = 0
    for dirpath, _, names in os.walk(folder):
        for name in names:
            with contextlib.suppress(OSError):
                total += os.stat(os.path.join(dirpath, name)).st_size
    return total


def newest_analysis(settings: AppSettings) -> Path | None:
    folders = [p for p in analyses_dir(settings).glob("analysis-*") if (p / "progress.json").is_file()]
    return max(folders, key=rundir.mtime, default=None)


def shown_analysis(mine: str, settings: AppSettings) -> Path | None:
    """The analysis this session shows: in a public app only the one it started; in a private app the newest."""
    if not settings.public:
        return newest_analysis(settings)
    out = analyses_dir(settings) / mine if mine else None
    return out if out and (out / "progress.json").is_file() else None


def status(mine: str, shown: str, settings: AppSettings, period: str = jobs.TREND_PERIOD):
    """Timer: the session's analysis's progress; its results once it has finished (shown: the one on screen)."""
    out = shown_analysis(mine, settings)
    unchanged = [gr.skip()] * RESULT_OUTPUTS
    if out is None:
        return "No analysis yet.", shown, *unchanged
    p = job_status(out / "progress.json")
    line = f"**{out.name}** — {p.get('status', '?')}: {p.get('done', 0)}/{p.get('total') or '?'} photos"
    if p.get("status") == "running" and p.get("images_per_sec"):
        line += f", {p['images_per_sec']:.1f} photos/s, ETA {p.get('eta_seconds', 0):.0f} s"
    if p.get("status") != "finished" or shown == str(out):
        return line, shown, *unchanged
    return line, str(out), *results(out, settings, period)


RESULT_OUTPUTS = 9  # what results() fills: shares, summary, make, models, unsure, refused, downloads, trend, changes


def results(out: Path, settings: AppSettings, period: str = jobs.TREND_PERIOD) -> tuple:
    summary = _whole_summary(out)
    rows = pd.read_csv(out / "predictions.csv", keep_default_na=False)
    makes = summary[(summary.group == ALL_GROUPS) & (summary.level == "make")].name.tolist()
    model = rundir.read_json(out / "analysis.json", {}).get("identity", {}).get("model")
    first = makes[0] if makes else None
    unit = counted("cars" in rows.columns)  # made with a detector: a row per car, and the shares are of cars
    # the models of the first make too: the same make chosen again fires no change, and left the last analysis's
    return (make_share_figure(summary.to_dict("records"), unit=unit), summary, gr.Dropdown(choices=makes, value=first),
            models_of(first, str(out)), unsure_gallery(rows, model), refused_gallery(rows),
            _downloads(out, settings.public), *trend_of(str(out), period))


def _whole_summary(out: Path) -> pd.DataFrame:
    """summary.csv's rows about the whole time (an analysis with a period holds each period's rows too)."""
    summary = pd.read_csv(out / "summary.csv", keep_default_na=False, dtype={"name": str, "group": str})
    return pd.DataFrame(whole(summary.to_dict("records")), columns=summary.columns)


def trend_of(folder: str | None, period: str):
    """The chosen analysis's makes over time, per `period`, and the changes chance is unlikely to explain."""
    from ..analysis.report import trend_view
    if not folder or not (Path(folder) / "predictions.csv").is_file() or period not in PERIODS:
        return None, ""
    figure, sentences = trend_view(Path(folder) / "predictions.csv", period)
    return figure, "\n".join(f"- {line}" for line in sentences)


def models_of(make: str | None, folder: str | None) -> pd.DataFrame:
    """The models of one make in the chosen analysis, all groups together."""
    if not make or not folder or not (Path(folder) / "summary.csv").is_file():
        return pd.DataFrame(columns=SUMMARY_COLUMNS)  # an empty table with its headers (None showed "1 2 3")
    summary = _whole_summary(Path(folder))
    rows = pd.read_csv(Path(folder) / "predictions.csv", keep_default_na=False)
    names = set(rows[(rows.make == make) & (rows.status == "model")].model)
    return summary[(summary.level == "model") & summary.name.isin(names)]


def unsure_gallery(rows: pd.DataFrame, model: str | None, n: int = 12) -> list:
    """The photos the model was unsure of, with heatmaps of its best guess, to review by eye."""
    unsure = rows[rows.status == "unsure"].head(n)
    if unsure.empty or not model:
        return []
    photos, names, archives = [], [], {}
    for row in unsure.to_dict("records"):
        try:
            photos.append(row_image(row, archives, draft_size=512))  # with a detector: the car's crop
        except READ_ERRORS:
            continue
        names.append(_name(row))
    answers = hardware.answer_photos(model, photos, {"top_k": 1}) if photos else []
    return [(a.cam, f"{name}: {a.top[0][0]}? ({a.top[0][1]:.0%})") for a, name in zip(answers, names)]


def _name(row: dict) -> str:
    """A row's photo by its file name (a zip member's own), and which car of the photo it is."""
    item = item_of(row["path"])
    car = f" (car {int(row['car']) + 1} of {row['cars']})" if has_box(row) else ""
    return Path(item.member or item.path).name + car


def refused_gallery(rows: pd.DataFrame, n: int = 12) -> list:
    """The photos answered "no car", each with why (the reason's words, its numbers are in predictions.csv)."""
    items, archives = [], {}
    for row in rows[rows.status == "no-car"].head(n).to_dict("records"):
        try:
            photo = row_image(row, archives)
        except READ_ERRORS:
            continue
        photo.thumbnail((256, 256))
        items.append((photo, f"{refusal_tag(row['reason'])} · {_name(row)}"))
    return items


def _downloads(out: Path, public: bool) -> list[str]:
    """The outputs, copied once per analysis into a temp folder, from where Gradio serves files. A public app's
    predictions.csv names each upload by its file name: the server's upload folders are no one's business."""
    folder = _download_folder(out, public)
    folder.mkdir(parents=True, exist_ok=True)
    for name in OUTPUTS:
        if rundir.mtime(out / name) > rundir.mtime(folder / name):  # new, or rewritten by a rerun (--force)
            with atomic_writer(folder / name, newline="") as f:
                f.write(_public_predictions(out / name) if public and name == "predictions.csv"
                        else (out / name).read_text())
    return [str(folder / name) for name in OUTPUTS if (folder / name).is_file()]


def _download_folder(out: Path, public: bool) -> Path:
    return Path(tempfile.gettempdir()) / "carapp-downloads" / (out.name + ("-public" if public else ""))


def _public_predictions(path: Path) -> str:
    """predictions.csv with each path cut to the upload's file name ("photo.jpg", "city.zip!paris/photo.jpg")."""
    with open(path, newline="") as f:
        rows = list(safecsv.DictReader(f))
    for row in rows:
        archive, sep, member = row["path"].partition(".zip!")
        row["path"] = os.path.basename(archive) + sep + member
    text = io.StringIO()
    writer = safecsv.DictWriter(text, fieldnames=list(rows[0]) if rows else ["path"], lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    return text.getvalue()


def build(settings: AppSettings, demo: gr.Blocks) -> None:
    with gr.Tab("Analyze"):
        gr.Markdown("Drop many photos or a zip (its top-level folders become groups: cities, months, campaigns). "
                    "Every photo is answered with a model, a make only, *unsure*, *no car* or *unreadable*; the "
                    "shares come with 95% intervals." + ("" if settings.paths_editable else
                                                         f" Up to {settings.analyze_max_files} photos and "
                                                         f"{settings.analyze_max_mb} MB at a time (a zip counts "
                                                         f"by the photos in it); you see only your own analysis."))
        with gr.Row():
            files = gr.File(file_count="multiple", file_types=["image", ".zip"], label="Photos or a zip",
                            elem_id="analyze-files", type="filepath")
            with gr.Column():
                folder = gr.Textbox(label="…or a folder on the server", visible=settings.paths_editable,
                                    placeholder="/data/photos")
                model = gr.Dropdown(label="Model", choices=[], allow_custom_value=True)
                group_by = gr.Radio(["folder", "none"], value="folder", label="Groups",
                                    info="folder: the first-level sub-folders (in a zip: its top-level folders)")
                button = gr.Button("Analyze", variant="primary")
        message = gr.Markdown()
        progress = gr.Markdown(elem_id="analyze-progress")
        shares = gr.Plot(label="Make share per group (95% intervals)", elem_id="analyze-shares")
        with gr.Row():
            make = gr.Dropdown(label="Models of make", choices=[])
            models = gr.Dataframe(pd.DataFrame(columns=SUMMARY_COLUMNS), label="Models of the chosen make",
                                  interactive=False, max_height=300)
        table = gr.Dataframe(pd.DataFrame(columns=SUMMARY_COLUMNS), label="summary.csv", interactive=False,
                             max_height=400)
        gallery = gr.Gallery(label="Unsure photos to review (heatmap of the best guess)", columns=6, height=300,
                             object_fit="contain", elem_classes=SIX_WIDE, elem_id="analyze-unsure")
        refused = gr.Gallery(label="Photos answered 'no car', and why", columns=6, height=260, object_fit="contain",
                             elem_classes=SIX_WIDE, elem_id="analyze-refused")
        with gr.Row():
            trend = gr.Plot(label="Makes over time (photos' EXIF dates; 95% bands)", elem_id="analyze-trend",
                            scale=3)
            with gr.Column(scale=1):
                period = gr.Radio(list(PERIODS), value=jobs.TREND_PERIOD, label="Per", elem_id="analyze-period")
                changes = gr.Markdown(elem_id="analyze-changes")
        downloads = gr.File(label="Downloads: predictions.csv, summary.csv, report.html", file_count="multiple")
        mine = gr.State("")  # the analysis this session started (server-side: a client cannot name another's)
        shown = gr.State("")
        timer = gr.Timer(2.0)
    button.click(lambda f, d, m, g: start(f, d, m, g, settings), [files, folder, model, group_by], [message, mine],
                 api_name="analyze")
    timer.tick(lambda m, s, p: status(m, s, settings, p), [mine, shown, period],
               [progress, shown, shares, table, make, models, gallery, refused, downloads, trend, changes],
               api_visibility="private")
    period.change(trend_of, [shown, period], [trend, changes], api_visibility="private")
    make.change(models_of, [make, shown], models, api_visibility="private")
    demo.load(lambda: gr.Dropdown(choices=model_choices(settings), value=default_model(settings)), None, model,
              api_visibility="private")
