"""Multi-process training with torchrun: DistributedDataParallel over gloo on 2 CPU processes."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from carapp.checkpoint import load_checkpoint
from carapp.rundir import read_metrics
from conftest import FAST_TRAIN, ROOT


def torchrun(*args) -> dict:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                           "-m", "carapp", *map(str, args), "--json"], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout)


@pytest.mark.slow
def test_two_process_training_then_resume(demo_root, tmp_path):
    run = tmp_path / "ddp"
    first = torchrun("train", "--data", demo_root, "--run-dir", run, "--epochs", "2", "--steps-per-epoch", "3",
                     *FAST_TRAIN)
    assert first["status"] == "finished" and first["epochs"] == 2
    metrics = read_metrics(run)
    assert [m["epoch"] for m in metrics] == [1, 2]            # rank 0 alone writes: no duplicated lines
    assert "2 processes" in (run / "train.log").read_text()
    progress = json.loads((run / "progress.json").read_text())
    assert progress["status"] == "finished"
    split = (run / "split.csv").read_text()
    second = torchrun("train", "--resume", run, "--epochs", "3")
    assert second["status"] == "finished" and second["epochs"] == 3
    assert [m["epoch"] for m in read_metrics(run)] == [1, 2, 3] and read_metrics(run)[:2] == metrics
    assert (run / "split.csv").read_text() == split
    state = load_checkpoint(run / "last.pt")
    assert state["epoch"] == 3 and not any(k.startswith("module.") for k in state["model"])
