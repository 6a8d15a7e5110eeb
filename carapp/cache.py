"""Where carapp keeps what it can make again: dataset indexes, resized copies, health hashes, ONNX engines.

CARAPP_CACHE names the folder; by default ~/.cache/carapp.
"""
from __future__ import annotations

import os
from pathlib import Path


def cache_dir(kind: str) -> Path:
    """The cache folder of one kind of thing ("index", "resized", "health", "engines"); not created here."""
    return Path(os.environ.get("CARAPP_CACHE") or Path.home() / ".cache" / "carapp") / kind
