"""Predict tab: a photo in (drop, upload, paste, webcam), the top-5 and a Grad-CAM heatmap out.

The event is the app's stable API endpoint `/predict`: the image first, every other input with a default; outputs
the label confidences and the heatmap. The upload reaches carapp's own decoder (preprocess=False), so a broken file
gets a message that names the problem.
"""
from __future__ import annotations

import uuid
from pathlib import Path

import gradio as gr

from .. import jobs, rundir
from ..images import PHOTO_DRAFT_SIZE, ImageError, open_image
from ..config import CAM_METHODS
from .settings import REPO, AppSettings

TOP1 = "top-1 prediction"
EXAMPLES = REPO / "assets" / "examples"


def model_choices(settings: AppSettings) -> list[tuple[str, str]]:
    choices = [(f"{r.name} (best val acc {r.best_val_acc:.1%})" if r.best_val_acc is not None else r.name, r.name)
               for r in jobs.list_runs(settings.runs_dir) if (r.path / "best.pt").is_file()]
    if settings.checkpoint:
        choices.insert(0, (f"configured: {settings.checkpoint}", settings.checkpoint))
    return choices


def default_model(settings: AppSettings) -> str | None:
    choices = model_choices(settings)
    return choices[0][1] if choices else None


def resolve_model(source: str | None, settings: AppSettings) -> str:
    if not source:
        raise gr.Error("No trained model yet: train one in the Train tab (the demo preset takes ~5 minutes on a "
                       "CPU) or start the app with --checkpoint.", print_exception=False)
    if source == settings.checkpoint or (source.startswith("hf://") and settings.paths_editable):
        return source
    run = jobs.find_run(settings.runs_dir, source)
    if run is not None:
        return str(run)
    if settings.paths_editable and Path(source).exists():
        return source
    raise gr.Error(f"Unknown model {source!r}.", print_exception=False)


def predict(image, model: str | None = None, method: str = "gradcam", target: str | None = TOP1, *,
            settings: AppSettings):
    from ..checkpoint import CheckpointError
    from ..predict import cached_predictor
    path = image.get("path") if isinstance(image, dict) else image
    if not path:
        raise gr.Error("Drop a photo of a car first.", print_exception=False)
    name = image.get("orig_name") if isinstance(image, dict) else None
    try:
        photo = open_image(path, draft_size=PHOTO_DRAFT_SIZE)
    except ImageError as exc:
        raise gr.Error(f"{name or 'This file'}: {exc.reason}", print_exception=False) from None
    source = resolve_model(model or default_model(settings), settings)  # raises its own clear gr.Error
    try:
        predictor = cached_predictor(source)
    except (CheckpointError, ValueError, OSError) as exc:
        raise gr.Error(f"Cannot load the model: {exc}", print_exception=False) from None
    method = method if method in CAM_METHODS or method == "none" else "gradcam"
    explain = None if target in (None, "", TOP1) else target
    try:
        result = predictor.predict(photo, top_k=5, cam=method != "none", method=method, target=explain)
    except ValueError as exc:
        raise gr.Error(str(exc), print_exception=False) from None
    if result.cam is not None:
        # Gradio caches output images by content and rewrites the file each time: two visitors getting the same
        # heatmap at once (the same example) would share a file that is rewritten while it is sent. A per-answer
        # id in the PNG's text makes each answer its own file.
        result.cam.info["carapp-answer"] = uuid.uuid4().hex
    return {label: prob for label, prob in result.top}, result.cam


def target_choices(model: str | None, settings: AppSettings):
    """The classes of the chosen model, to pick which one the heatmap explains."""
    labels: list[str] = []
    try:
        source = Path(resolve_model(model, settings)) if model else None
        if source and source.is_dir():
            labels = rundir.label_names(source)
        elif source:
            from ..predict import cached_predictor
            labels = cached_predictor(source).labels
    except Exception:  # a model that cannot load shows its error on Predict; here it only means no class list
        labels = []
    return gr.Dropdown(choices=[TOP1, *labels], value=TOP1)


def build(settings: AppSettings, demo: gr.Blocks) -> None:
    with gr.Tab("Predict"):
        with gr.Row():
            with gr.Column():
                image = gr.Image(type="filepath", image_mode=None, sources=["upload", "clipboard", "webcam"],
                                 label="Photo of a car", elem_id="input-image", height=360)
                with gr.Row():
                    # choices are filled on page load; values are checked by resolve_model
                    model = gr.Dropdown(label="Model (run, checkpoint, export or hf://owner/name)", choices=[],
                                        allow_custom_value=True)
                    method = gr.Dropdown([*CAM_METHODS, "none"], value="gradcam", label="Heatmap method")
                    target = gr.Dropdown([TOP1], value=TOP1, label="Explain class", allow_custom_value=True)
                button = gr.Button("Classify", variant="primary")
                examples = sorted(EXAMPLES.glob("*.jpg"))
                if examples:
                    gr.Examples([[str(p)] for p in examples], inputs=[image],
                                label="Examples (synthetic demo cars, not photos)")
            with gr.Column():
                label = gr.Label(num_top_classes=5, label="Top 5", elem_id="top5")
                cam = gr.Image(label="What the network looked at (Grad-CAM)", format="png", elem_id="cam",
                               interactive=False, height=360)
    fn = lambda img, m=None, meth="gradcam", t=TOP1: predict(img, m, meth, t, settings=settings)
    button.click(fn, [image, model, method, target], [label, cam], api_name="predict", preprocess=False,
                 concurrency_limit=2)
    demo.load(lambda: gr.Dropdown(choices=model_choices(settings), value=default_model(settings)), None, model,
              api_visibility="private")
    model.change(lambda m: target_choices(m, settings), model, target, api_visibility="private")
