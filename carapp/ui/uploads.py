"""Files a visitor sent: only those Gradio itself accepted (its upload cache, the examples) are ever opened."""
from __future__ import annotations

import os

import gradio as gr
from gradio.utils import get_upload_folder

from .settings import REPO

EXAMPLES = REPO / "assets" / "examples"
NOT_AN_UPLOAD = "Upload a photo (drop, paste or choose a file): only files sent through the app can be classified."


def accepted_upload(file) -> str:
    """The real path of a file Gradio itself accepted: an upload in its cache, or one of the examples.

    A client can send any {"path": ...}; a made-up path (a server file, a missing one) gets one and the same answer,
    before anything is opened, so a stranger learns nothing about the server's files.
    """
    path = file.get("path") if isinstance(file, dict) else file
    if not path or not isinstance(path, str):
        raise gr.Error("Drop a photo of a car first.", print_exception=False)
    real = os.path.realpath(path)
    roots = (os.path.realpath(get_upload_folder()), os.path.realpath(EXAMPLES))
    if not any(real.startswith(root + os.sep) for root in roots) or not os.path.isfile(real):
        raise gr.Error(NOT_AN_UPLOAD, print_exception=False)
    return real
