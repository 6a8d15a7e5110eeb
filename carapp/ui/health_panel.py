"""The Dataset tab's Health section: duplicates, label conflicts, leaks of a run's split, and problem files, as a
table whose rows open their photos. The checks themselves are carapp.dataset.health's."""
from __future__ import annotations

import gradio as gr
import pandas as pd

from ..dataset.health import HealthError, check_health
from ..runs import find_run, list_runs
from .photos import SIX_WIDE, thumbnails
from .settings import AppSettings, ensure_data

COLUMNS = ["problem", "files", "detail", "paths"]
ROWS_PER_KIND = 200      # a table a person can read; the CLI's --json lists everything
NO_RUN = "(no run)"


def run_choices(settings: AppSettings) -> gr.Dropdown:
    return gr.Dropdown(choices=[NO_RUN] + [r.name for r in list_runs(settings.runs_dir, "classifier")], value=NO_RUN)


def check(root: str, run_name: str | None, settings: AppSettings, progress=gr.Progress()):
    """Summary, the findings table and each row's paths. A public app reads only what the owner's check cached."""
    if not settings.paths_editable:
        root = settings.data
    if root == settings.data:
        ensure_data(settings)
    run = find_run(settings.runs_dir, run_name) if run_name and run_name != NO_RUN else None
    try:
        report = check_health(root, run=str(run) if run else None, cached_only=not settings.training_enabled,
                              on_progress=lambda done, total: progress(done / total, desc="hashing photos"))
    except (HealthError, ValueError, OSError) as exc:
        return f"**{settings.redact(str(exc))}**", pd.DataFrame(columns=COLUMNS), []
    rows = findings(report)
    table = pd.DataFrame([{**r, "paths": " · ".join(r["paths"][:4]) + (" …" if len(r["paths"]) > 4 else "")}
                          for r in rows], columns=COLUMNS)
    return settings.redact(summary_markdown(report)), table, [r["paths"] for r in rows]


def findings(report: dict) -> list[dict]:
    """One row per duplicate group or problem file, at most ROWS_PER_KIND of each kind."""
    kinds = [("leak", [(g["paths"], " / ".join(g["splits"])) for g in report.get("leaks", [])]),
             ("label conflict", [(g["paths"], " / ".join(g["classes"])) for g in report["label_conflicts"]]),
             ("exact duplicates", [(g, "same bytes") for g in report["exact_duplicates"]]),
             ("near duplicates", [(g, "resized, recompressed or cropped copies") for g in report["near_duplicates"]]),
             ("unreadable", [([u["path"]], u["reason"]) for u in report["unreadable"]]),
             ("box outside", [([b["path"]], f"box {b['bbox']} in {b['size'][0]}x{b['size'][1]}")
                              for b in report["bbox_outside"]]),
             ("tiny", [([p], "shorter side under 64 px") for p in report["tiny"]]),
             ("extreme aspect", [([p], "one side 4x the other") for p in report["extreme_aspect"]]),
             ("greyscale", [([p], "no colour") for p in report["grayscale"]])]
    return [{"problem": kind, "files": len(paths), "detail": detail, "paths": paths}
            for kind, items in kinds for paths, detail in items[:ROWS_PER_KIND]]


def summary_markdown(r: dict) -> str:
    c = r["counts"]
    text = (f"**{r['num_images']:,}** photos checked. **{c['exact_duplicates']}** groups of exact duplicates and "
            f"**{c['near_duplicates']}** of near duplicates ({c['duplicate_files']} files are copies of another); "
            f"**{c['label_conflicts']}** groups span two classes.  \n"
            f"Unreadable **{c['unreadable']}** · tiny **{c['tiny']}** · extreme aspect **{c['extreme_aspect']}** · "
            f"greyscale **{c['grayscale']}** ({c['grayscale_share']:.1%}) · boxes outside **{c['bbox_outside']}**")
    if "leaks" in r:
        text += (f"  \n**{c['leaks']}** duplicate groups sit on two sides of the run's split (leaks)"
                 + (": train with `--group-duplicates` to keep each group in one split." if c["leaks"] else "."))
    return text


def show_row(root: str, paths: list[list[str]], settings: AppSettings, evt: gr.SelectData):
    """The photos of the clicked row, each captioned with its path."""
    if not settings.paths_editable:
        root = settings.data
    row = evt.index[0] if isinstance(evt.index, (list, tuple)) else evt.index
    if not paths or not 0 <= row < len(paths):
        return []
    return thumbnails(root, paths[row], 12)


def build(settings: AppSettings, demo: gr.Blocks, root: gr.Textbox) -> None:
    gr.Markdown("### Health\nDuplicates (exact, and resized / recompressed / slightly cropped copies), photos in two "
                "classes, leaks across a run's train/val/test, and files a run cannot use. Click a row for its photos.")
    with gr.Row():
        run = gr.Dropdown(label="Run (to list its leaks)", choices=[NO_RUN], value=NO_RUN, scale=3,
                          allow_custom_value=True)  # filled on load; a name is looked up among the runs
        button = gr.Button("Check health", scale=1)
    summary = gr.Markdown(elem_id="health-summary")
    table = gr.Dataframe(pd.DataFrame(columns=COLUMNS), interactive=False, max_height=400, elem_id="health-table",
                         label="Findings (click a row)")
    gallery = gr.Gallery(label="Photos of the row", columns=6, height=320, object_fit="contain",
                         elem_classes=SIX_WIDE,
                         elem_id="health-photos")
    paths = gr.State([])

    def on_row(r, p, evt: gr.SelectData):
        return show_row(r, p, settings, evt)

    button.click(lambda r, n, progress=gr.Progress(): check(r, n, settings, progress), [root, run],
                 [summary, table, paths], api_name="health")
    table.select(on_row, [root, paths], gallery, api_visibility="private")
    demo.load(lambda: run_choices(settings), None, run, api_visibility="private")
