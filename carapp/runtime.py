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


class Dist:
    """torch.distributed as the trainer needs it; with one process every call is a no-op."""

    def __init__(self, rank: int = 0, world: int = 1, local_rank: int = 0):
        self.rank, self.world, self.local_rank = rank, world, local_rank

    @property
    def main(self) -> bool:
        return self.rank == 0

    def _reduce(self, values: list[float], device: torch.device, op: str) -> list[float]:
        if self.world == 1:
            return values
        import torch.distributed as dist
        t = torch.tensor(values, dtype=torch.float64, device=device)
        dist.all_reduce(t, op=getattr(dist.ReduceOp, op))
        return t.tolist()

    def sum(self, values: list[float], device: torch.device) -> list[float]:
        return self._reduce(values, device, "SUM")

    def max(self, values: list[float], device: torch.device) -> list[float]:
        return self._reduce(values, device, "MAX")

    def barrier(self) -> None:
        if self.world > 1:
            import torch.distributed as dist
            dist.barrier()

    def close(self) -> None:
        if self.world > 1:
            import torch.distributed as dist
            dist.destroy_process_group()


def init_distributed() -> Dist:
    """Join the process group torchrun set up (nccl on GPUs, gloo on CPUs); a plain run is a world of one."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world == 1:
        return Dist()
    import torch.distributed as dist
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if torch.cuda.is_available():
        torch.cuda.set_device(local_rank)
    dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    return Dist(dist.get_rank(), world, local_rank)
