"""Where the work runs: device choice, mixed precision, a one-line description for logs and the UI."""
from __future__ import annotations

import contextlib
import os

import torch


def pick_device(name: str = "auto") -> torch.device:
    if name != "auto":
        return torch.device(name)
    if torch.cuda.is_available():
        return torch.device("cuda")
    if getattr(torch.backends, "mps", None) and torch.backends.mps.is_available():
        return torch.device("mps")
    return torch.device("cpu")


def autocast(device: torch.device, enabled: bool):
    """bf16 autocast where the GPU supports it, fp16 otherwise; nothing on CPU (slower there, no gain)."""
    if not enabled or device.type != "cuda":
        return contextlib.nullcontext()
    dtype = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return torch.autocast("cuda", dtype=dtype)


def needs_grad_scaler(device: torch.device, amp: bool) -> bool:
    return amp and device.type == "cuda" and not torch.cuda.is_bf16_supported()


def describe_device(device: torch.device | None = None) -> str:
    device = device or pick_device()
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        return f"GPU: {props.name}, {props.total_memory / 2**30:.0f} GiB"
    if device.type == "mps":
        return "Apple GPU (MPS)"
    return f"CPU: {os.cpu_count()} cores, {torch.get_num_threads()} threads"
