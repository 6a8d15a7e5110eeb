"""Assemble the tabs into one Blocks app and launch it with the settings' safety rules."""
from __future__ import annotations

import gradio as gr
from starlette.middleware import Middleware

from . import analyze_tab, dataset_tab, evaluate_tab, first_model, limits, predict_tab, train_tab
from .settings import REPO, AppSettings

MAX_UPLOAD = "10mb"
INTRO = ("# carapp — what car is that?\n"
         "A ResNet trained with focal loss on CompCars names the make and model of a car, and Grad-CAM shows "
         "what it looked at — or says it is not sure.  \nDrop a photo on **Predict**, a whole collection on "
         "**Analyze**; look at the data, train, and evaluate in the other tabs.")


def build_app(settings: AppSettings) -> gr.Blocks:
    # delete_cache: uploads and answers older than two hours go, so a public Space's disk does not fill up
    with gr.Blocks(title="carapp — car make and model",
                   delete_cache=(3600, 7200) if settings.clean_cache else None) as demo:
        gr.Markdown(INTRO, elem_id="intro")
        if settings.is_demo_data:
            gr.Markdown("Running on the built-in **synthetic** demo dataset (drawn cars, not photos). "
                        "Point `--data` or `CARAPP_DATA` at CompCars for the real thing.", elem_id="demo-note")
        predict_tab.build(settings, demo)
        analyze_tab.build(settings, demo)
        dataset_tab.build(settings, demo)
        train_tab.build(settings, demo)
        evaluate_tab.build(settings, demo)
    # a bounded queue: a flood of requests is refused at once instead of making every later visitor wait;
    # the limit holds per event (Gradio's rule), predictions share one pool of 2 (predict_tab)
    # api_open off: every request goes through the queue and its limits (open, /gradio_api/run/ bypasses them)
    demo.queue(default_concurrency_limit=4, max_size=settings.queue_size, api_open=False)
    return demo


def shares(settings: AppSettings) -> list[Middleware]:
    """A public app's limits per visitor (see limits): a fair share of the queue, and uploads no larger than an
    analysis may send (plus room for the form around the files)."""
    if not settings.public:
        return []
    return [Middleware(limits.UploadLimit, max_bytes=(settings.analyze_max_mb + 1) * 2**20),
            Middleware(limits.FairQueue, per_client=settings.queue_per_client, per_pool=settings.queue_per_pool,
                       behind_proxy=settings.behind_proxy)]


def launch(demo: gr.Blocks, settings: AppSettings, share: bool = False, **kwargs):
    """Uploads are capped; files are served only from the assets folder (examples) and Gradio's own cache. A public
    app with no model starts training its first one (see first_model)."""
    first_model.start_in_background(settings)
    return demo.launch(share=share, auth=settings.auth, max_file_size=MAX_UPLOAD,
                       app_kwargs={"middleware": shares(settings)},
                       allowed_paths=[str(REPO / "assets")], theme=gr.themes.Soft(),
                       css_paths=[str(REPO / "assets" / "style.css")], footer_links=["api"], **kwargs)
