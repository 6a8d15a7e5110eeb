"""Checkpoints: plain types only, written atomically, read with weights_only=True."""
from __future__ import annotations

import os
import pickle
import re
import zipfile
from pathlib import Path

import torch

from .atomic import atomic_path


class CheckpointError(ValueError):
    """A checkpoint that cannot be used; the message says why."""


def save_checkpoint(state: dict, path: str | os.PathLike) -> None:
    """Write to a temp file in the same folder, fsync, then os.replace: a crash leaves the old file whole."""
    with atomic_path(path, fsync=True) as tmp, open(tmp, "wb") as f:
        torch.save(state, f)


def load_state_file(path: str | os.PathLike, map_location="cpu"):
    """torch.load with weights_only=True behind a zip check; anything unsafe or broken is a CheckpointError whose
    message says what is wrong and never suggests loading it unsafely."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint not found: {path}")
    if not zipfile.is_zipfile(path):  # torch.save writes zip archives; anything else is never unpickled
        raise CheckpointError(f"{path} is not a PyTorch checkpoint (torch.save writes zip archives)")
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as exc:
        found = re.search(r"Unsupported global: GLOBAL (\S+)", str(exc))
        raise CheckpointError(f"{path} holds objects other than tensors and plain values"
                              f"{f' ({found.group(1)})' if found else ''}: refused for safety, nothing in it "
                              f"was run. Only plain weight files can be used.") from None
    except (RuntimeError, EOFError, OSError, ValueError) as exc:
        raise CheckpointError(f"{path} is not a readable PyTorch checkpoint: {str(exc).splitlines()[0]}") from None


def load_checkpoint(path: str | os.PathLike, map_location="cpu") -> dict:
    """A carapp checkpoint (a dict with a 'model' entry), loaded without unpickling arbitrary objects."""
    state = load_state_file(path, map_location)
    if not isinstance(state, dict) or "model" not in state:
        raise CheckpointError(f"{path} is not a carapp checkpoint (no 'model' entry)")
    return state


def resolve_checkpoint(path: str | os.PathLike) -> Path:
    """A run directory means its best.pt (or last.pt before the first validation); a file means itself."""
    path = Path(path)
    if path.is_dir():
        for name in ("best.pt", "last.pt"):
            if (path / name).is_file():
                return path / name
        raise CheckpointError(f"{path} holds no best.pt or last.pt: has a run finished an epoch there?")
    return path
