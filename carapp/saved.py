"""A trained model in any form carapp keeps one, and the one way to load it:

    model, config, labels, folder = load_model("checkpoints/run1")   # or a checkpoint file, an exported folder
    load_model("hf://owner/name@revision")                            # a Hub repo (HF_TOKEN, HF_HUB_OFFLINE)

`folder` holds what travels beside the weights (labels.json, calibration.json, feature_bank.npz, feature_stats.npz).
Checkpoints are read with weights_only=True, exports from safetensors: nothing a stranger sent is unpickled.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import NamedTuple

import torch

from . import rundir
from .checkpoint import CheckpointError, load_checkpoint, resolve_checkpoint
from .model import build_model

EXPORT_TAG = "carapp-export"  # config.json "format" of an exported folder


class SavedModel(NamedTuple):
    model: torch.nn.Module   # in eval mode, on the CPU
    config: dict             # the training config (TrainConfig fields)
    labels: list[str]        # class names in output order
    folder: Path | None      # what lies beside the weights


def load_model(source: str | Path) -> SavedModel:
    """A run directory (its best.pt, else last.pt), a checkpoint file, an exported folder, or hf://owner/name."""
    if str(source).startswith("hf://"):
        folder = hub_snapshot(str(source))
        return SavedModel(*_from_export(folder), folder)
    if is_export(Path(source)):
        return SavedModel(*_from_export(Path(source)), Path(source))
    checkpoint = resolve_checkpoint(source)
    state = load_checkpoint(checkpoint)
    config, labels = state.get("config") or {}, state.get("labels") or []
    return SavedModel(model_from_weights(state["model"], config, labels, checkpoint), config, labels,
                      checkpoint.parent)


def model_version(source: str | Path) -> tuple[str, float]:
    """What changes when the model behind `source` is rewritten (its weights file and mtime): a cache key."""
    if str(source).startswith("hf://"):
        return str(source), 0.0  # a Hub revision does not change under us within a session
    version = Path(source) / "config.json" if is_export(Path(source)) else resolve_checkpoint(source)
    return str(version.resolve()), version.stat().st_mtime


def model_from_weights(weights: dict, config: dict, labels: list[str], where: Path) -> torch.nn.Module:
    """The network of `config` with these weights, in eval mode; refused when its outputs and labels disagree."""
    fc = weights.get("fc.weight")
    if fc is None or fc.shape[0] != len(labels):
        raise CheckpointError(f"{where}: the model has {None if fc is None else fc.shape[0]} outputs but "
                              f"{len(labels)} class names: refusing a model whose classes do not match its labels")
    model = build_model(config.get("backbone", "resnet50"), len(labels), config.get("dropout", 0.0))
    model.load_state_dict(weights)
    return model.eval()


def onnx_export(source: str | Path) -> Path | None:
    """The folder of a carapp ONNX export (model.onnx beside config.json and labels.json), or None: it runs in ONNX
    Runtime, not in PyTorch (see Predictor.load)."""
    folder = hub_snapshot(str(source)) if str(source).startswith("hf://") else Path(source)
    config = rundir.read_json(folder / "config.json") if folder.is_dir() else None
    if not config or config.get("format") != EXPORT_TAG or not (folder / "model.onnx").is_file():
        return None
    return folder if not (folder / "model.safetensors").is_file() else None


def is_export(path: Path) -> bool:
    return path.is_dir() and ((path / "model.safetensors").is_file() or (path / "model.onnx").is_file())


def _from_export(folder: Path) -> tuple[torch.nn.Module, dict, list[str]]:
    from safetensors.torch import load_file
    config = rundir.read_json(folder / "config.json") or {}
    if config.get("format") != EXPORT_TAG or not (folder / "model.safetensors").is_file():
        raise CheckpointError(f"{folder} is not a carapp export with model.safetensors (an ONNX export runs in ONNX "
                              f"Runtime: Predictor.load and predict take it; training code needs safetensors)")
    labels = [c["name"] for c in rundir.read_json(folder / "labels.json", [])]
    training = config.get("training", {})
    return model_from_weights(load_file(str(folder / "model.safetensors")), training, labels, folder), training, \
        labels


def hub_snapshot(source: str) -> Path:
    """hf://owner/name[@revision] → a local folder from the Hugging Face cache, downloaded if needed.

    Honours HF_TOKEN and HF_HUB_OFFLINE (then only the cache is used, with a clear message when it lacks the model).
    """
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import LocalEntryNotFoundError
    repo, _, revision = source.removeprefix("hf://").partition("@")
    try:
        return Path(snapshot_download(repo, revision=revision or None, token=os.environ.get("HF_TOKEN"),
                                      allow_patterns=["*.json", "*.safetensors", "*.md", "*.npz"]))
    except LocalEntryNotFoundError:
        offline = os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes", "on")
        raise CheckpointError(f"model {repo}{'@' + revision if revision else ''} is not in the local Hugging Face "
                              f"cache{' and HF_HUB_OFFLINE is set' if offline else ' and the Hub cannot be reached'}"
                              f": download it once online (or unset HF_HUB_OFFLINE)") from None
    except Exception as exc:  # repository not found, no access, ...: the Hub's own message is the clearest
        raise CheckpointError(f"cannot fetch {repo} from the Hugging Face Hub: {exc}") from None
