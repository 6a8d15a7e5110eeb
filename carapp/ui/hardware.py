"""Which hardware the app runs on, and the GPU calls of a ZeroGPU Space.

A ZeroGPU Space (its environment says SPACES_ZERO_GPU=true) lends a GPU only inside functions decorated with
`@spaces.GPU`: each call asks for a number of seconds, runs in a forked worker process (arguments and results are
pickled across) and gives the GPU back. So there, prediction and heatmaps run inside `gpu(...)` calls, an analysis runs
as a chain of calls of ANALYSIS_CALL_SECONDS each (analyze's `limit`, resumed call after call), and training, evaluation
and the first model are off: they are subprocesses, which never get the GPU. The app's own process never touches CUDA
there (host_device). On a dedicated GPU or a CPU, `spaces.GPU` is a no-op (the package's own rule) and everything runs
as it does anywhere else.
"""
from __future__ import annotations

import logging
import os
import time
from pathlib import Path

log = logging.getLogger("carapp")

ZEROGPU_ENV = "SPACES_ZERO_GPU"   # set by Hugging Face on a ZeroGPU Space
PREDICT_SECONDS = 20              # one photo: decode, detector, classifier, Grad-CAM (a cold worker loads the model)
SLOW_CAM_SECONDS = 60             # ScoreCAM and friends: many forward passes
ANALYSIS_CALL_SECONDS = 60        # one call of an analysis; ZeroGPU's default, inside every visitor's quota
FIRST_CHUNK = 64                  # photos in an analysis's first call, before its speed is known
CHUNK_SHARE = 0.6                 # of a call's seconds the next chunk is sized to fill (room for a slower batch)
TRAINING_OFF = ("Training is off on a ZeroGPU Space: its GPU exists only inside short calls, and training needs it "
                "for minutes to hours. Train elsewhere (`python -m carapp train` on a GPU machine, or a Space with a "
                "dedicated GPU), push the run to the Hub (`python -m carapp push --run RUN --repo you/name`) and set "
                "`CARAPP_CHECKPOINT=hf://you/name` in this Space's settings.")


def on_zerogpu() -> bool:
    """The spaces package's own reading of its variable."""
    return os.environ.get(ZEROGPU_ENV, "").lower() in ("1", "t", "true")


def host_device() -> str:
    """Where the app's own process may run a model: the CPU on ZeroGPU (CUDA is for GPU calls only), else the best."""
    return "cpu" if on_zerogpu() else "auto"


def gpu(seconds):
    """Decorate a function that should run on the GPU: `spaces.GPU(duration=seconds)` where the package is installed
    (seconds may be a function of the call's arguments), else the function as it is. Decorate at import time: ZeroGPU
    looks for its functions when the app starts."""
    def decorate(fn):
        try:
            import spaces
        except ImportError:
            if on_zerogpu():
                log.warning("a ZeroGPU Space without the spaces package: %s runs on the CPU", fn.__name__)
            return fn
        return spaces.GPU(duration=seconds)(fn)
    return decorate


def description() -> str:
    """The hardware in a few words, for the Train tab."""
    if on_zerogpu():
        return "ZeroGPU: a GPU inside each prediction and analysis call; none for training"
    from ..runtime import describe_device  # imports torch: on page load, not at start-up
    return describe_device()


def _forked_worker_threads() -> None:
    """A ZeroGPU call runs in a process forked from the app's: the CPU thread pool the app's process may have started
    is not there, and torch's CPU kernels would wait on it for ever. One thread, as DataLoader's forked workers do
    (the call's heavy work is on the GPU)."""
    if on_zerogpu():
        import torch
        torch.set_num_threads(1)


def _answer_seconds(source, photos, options, detector=None) -> int:
    return SLOW_CAM_SECONDS if options.get("cam") and options.get("method", "gradcam") != "gradcam" else \
        PREDICT_SECONDS


@gpu(_answer_seconds)
def answer_photos(source: str, photos: list, options: dict, detector: str | None = None) -> list:
    """Predictor.predict_many's answers (`options` its keywords); with a detector, predict_cars' (every car). The
    model and detector are loaded once per process: on ZeroGPU once per worker, on the GPU it lends."""
    import gradio as gr

    from ..checkpoint import CheckpointError
    from ..detection.model import cached_detector
    from ..predict import cached_predictor
    _forked_worker_threads()
    loading = "model"
    try:
        predictor = cached_predictor(source)
        loading = "car detector"
        finder = cached_detector(detector) if detector else None
    except (CheckpointError, ValueError, OSError) as exc:
        raise gr.Error(f"Cannot load the {loading}: {exc}", print_exception=False) from None
    try:
        return predictor.predict_cars(photos, finder, **options) if finder else \
            predictor.predict_many(photos, **options)
    except ValueError as exc:
        raise gr.Error(str(exc), print_exception=False) from None


@gpu(ANALYSIS_CALL_SECONDS)
def analysis_call(sources: list[str], model: str, out: str, group_by: str, detector: str | None, limit: int,
                  options: dict) -> dict:
    """Up to `limit` more photos of an analysis, resumed from what OUT holds (the rows are on disk: a call's worker
    process may go, the work stays). Failures come back as gr.Error, whose message crosses the worker boundary."""
    import gradio as gr

    from ..analysis.analyze import analyze
    from ..detection.model import cached_detector
    _forked_worker_threads()
    try:
        # workers=0: a ZeroGPU worker is a daemon process, which may not start loader processes of its own
        return analyze(sources, model, out, group_by, workers=0, detector=cached_detector(detector or "none"),
                       limit=limit, **options)
    except (ValueError, OSError, RuntimeError) as exc:
        raise gr.Error(str(exc), print_exception=False) from None


def next_chunk(photos: int, seconds: float, budget: float = ANALYSIS_CALL_SECONDS) -> int:
    """How many photos the next call may take: the last call's pace, filling CHUNK_SHARE of a call."""
    pace = photos / max(seconds, 1e-3)
    return max(8, min(int(pace * budget * CHUNK_SHARE), 100_000))


def analyze_in_calls(sources: list[str], model: str, out: Path, group_by: str, detector: str | None,
                     options: dict, call=analysis_call) -> dict:
    """An analysis as a chain of GPU calls, each sized by the last one's pace, until every photo is done."""
    from .. import rundir
    limit = FIRST_CHUNK
    while True:
        started = time.monotonic()
        before = rundir.read_json(out / "progress.json", {}).get("done", 0)
        # progress.json names this process, not the call's worker: the job lives on here, between calls too
        result = call(sources, model, str(out), group_by, detector, limit, {**options, "owner_pid": os.getpid()})
        if result.get("finished", True):
            return result
        limit = next_chunk(max(result["done"] - before, 1), time.monotonic() - started)
