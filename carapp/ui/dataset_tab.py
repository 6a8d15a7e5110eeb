"""Dataset tab: what is in the dataset — classes before/after the filter, split sizes, imbalance, makes, viewpoints,
image sizes, sample images of a class — and its health (duplicates, leaks, problem files)."""
from __future__ import annotations

import os

import gradio as gr

from .. import plots
from ..dataset.images import sample_sizes
from ..dataset.index import DatasetError, index_dataset
from ..dataset.split import dataset_stats, kept_classes
from . import health_panel
from .photos import SIX_WIDE, thumbnails
from .settings import AppSettings, ensure_data


def _index(root: str, settings: AppSettings):
    if not settings.paths_editable:
        root = settings.data  # public mode: only the configured dataset
    if root == settings.data:
        ensure_data(settings)
    try:
        return index_dataset(root)
    except DatasetError as exc:
        raise gr.Error(settings.redact(str(exc)), print_exception=False) from None


def scan(root: str, log_scale: bool, settings: AppSettings):
    """The whole tab for one dataset; a folder that is not one clears the tab and says why, in the summary."""
    try:
        index = _index(root, settings)
    except gr.Error as exc:
        return f"**{exc.message}**", None, None, None, None, gr.Dropdown(choices=[], value=None)
    stats = dataset_stats(index)
    counts = index.class_counts()
    makes: dict[str, int] = {}
    for k, n in counts.items():
        makes[index.classes[k]["make"]] = makes.get(index.classes[k]["make"], 0) + n
    top_makes = dict(sorted(makes.items(), key=lambda kv: -kv[1])[:30])
    sizes = sample_sizes(index.root, index.paths)
    kept, _ = kept_classes(index)
    choices = [(f"{index.classes[k]['name']} ({counts[k]})", k) for k in kept]
    official = _official_line(index)
    return (settings.redact(summary_markdown(stats) + official), _counts_figure(index, stats["min_images"], log_scale),
            plots.bar_figure(top_makes, "Images per make" + (" (top 30)" if len(makes) > 30 else "")),
            plots.bar_figure(stats["viewpoints"], "Viewpoints (CompCars labels)") if stats["viewpoints"] else None,
            plots.sizes_figure(sizes),
            gr.Dropdown(choices=choices, value=choices[0][1] if choices else None))


def _official_line(index) -> str:
    """The sizes of the dataset's own train/test split (train --split official), where it has lists."""
    if not index.official_lists:
        return ""
    try:
        s = dataset_stats(index, split="official")
    except DatasetError as exc:
        return f"  \nOfficial split: {exc}"
    missing = sum(info["missing"] for info in index.official_lists.values())
    return (f"  \n**Official split** (the dataset's own lists, `--split official`): **{s['num_classes_kept']:,}** "
            f"classes, train **{s['splits']['train']:,}**, val **{s['splits']['val']:,}** (carved from train), "
            f"test **{s['splits']['test']:,}**" + (f"; {missing:,} listed photos are missing" if missing else "") + ".")


def _counts_figure(index, min_images: int, log_scale: bool):
    counts = index.class_counts()
    return plots.class_counts_figure([index.classes[k]["name"] for k in counts], list(counts.values()), min_images,
                                     log_scale)


def counts_only(root: str, log_scale: bool, settings: AppSettings):
    """Log scale ticked: the class-count chart again, from the cached index (no statistics, no image sizes)."""
    try:
        index = _index(root, settings)
    except gr.Error:
        return gr.skip()
    return _counts_figure(index, kept_classes(index)[1], log_scale)


def summary_markdown(s: dict) -> str:
    imb = s["imbalance"]
    return (f"**{s['format']}** dataset at `{s['root']}`  \n"
            f"**{s['num_images']:,}** images in **{s['num_classes']:,}** classes of **{s['num_makes']}** makes. "
            f"Classes with at least **{s['min_images']}** images (the mean, as in the paper) are kept: "
            f"**{s['num_classes_kept']:,}** classes, **{s['num_images_kept']:,}** images.  \n"
            f"Split 70/15/15: train **{s['splits']['train']:,}**, val **{s['splits']['val']:,}**, "
            f"test **{s['splits']['test']:,}**.  \n"
            f"Imbalance among kept classes: largest {imb['largest_class']}, smallest {imb['smallest_class']} "
            f"(ratio {imb['ratio']}).")


def samples(root: str, key: str | None, settings: AppSettings, n: int = 12):
    if not key:
        return []
    index = _index(root, settings)
    of_class = (rel for rel, k in zip(index.paths, index.keys) if k == key)
    return [(img, os.path.basename(rel)) for img, rel in thumbnails(index.root, of_class, n)]


def build(settings: AppSettings, demo: gr.Blocks) -> None:
    """Lay out the tab and wire it; the dataset is scanned when the page opens."""
    with gr.Tab("Dataset"):
        with gr.Row():
            root = gr.Textbox(settings.data if settings.paths_editable else "", label="Dataset folder", scale=4,
                              interactive=settings.paths_editable, placeholder="the app's dataset",
                              info="CompCars root (or its data/), sv_data, or one folder per class")
            scan_btn = gr.Button("Scan", variant="primary", scale=1)
        summary = gr.Markdown()
        log_scale = gr.Checkbox(label="Log scale", value=False)
        counts_plot = gr.Plot(label="Class counts")
        with gr.Row():
            makes_plot = gr.Plot(label="Makes")
            views_plot = gr.Plot(label="Viewpoints")
        sizes_plot = gr.Plot(label="Image sizes")
        with gr.Row():
            cls = gr.Dropdown(label="Sample images of class", choices=[], scale=2)
        gallery = gr.Gallery(label="Samples", columns=6, rows=2, height="auto", elem_id="samples",
                             object_fit="contain", elem_classes=SIX_WIDE)
        health_panel.build(settings, demo, root)
    outputs = [summary, counts_plot, makes_plot, views_plot, sizes_plot, cls]
    scan_fn = lambda r, log: scan(r, log, settings)
    scan_btn.click(scan_fn, [root, log_scale], outputs, api_visibility="private")
    log_scale.change(lambda r, log: counts_only(r, log, settings), [root, log_scale], counts_plot,
                     api_visibility="private")
    cls.change(lambda r, k: samples(r, k, settings), [root, cls], gallery, api_visibility="private")  # [] clears
    demo.load(scan_fn, [root, log_scale], outputs, api_visibility="private")
