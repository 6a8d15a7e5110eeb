"""Files that appear whole or not at all: written beside their place under a temporary name, then renamed over it.

A reader never sees half a file, and a crash mid-write leaves the old one whole. The one implementation for every
file carapp replaces: checkpoints, run files, reports, caches, ONNX engines.
"""
from __future__ import annotations

import contextlib
import os
import threading
from pathlib import Path


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike, fsync: bool = False):
    """A temporary path beside `path` for a writer that takes a file name (torch.save, torch.onnx.export); renamed
    over `path` when the block ends, removed if it raises. fsync: on disk before the rename (checkpoints)."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{threading.get_ident()}.tmp")
    try:
        yield tmp
        if fsync:
            with open(tmp, "rb+") as f:
                os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


@contextlib.contextmanager
def atomic_writer(path: str | os.PathLike, newline: str | None = None):
    """A text file to write, in place when the block ends."""
    with atomic_path(path) as tmp, open(tmp, "w", newline=newline) as f:
        yield f
