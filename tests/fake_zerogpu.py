"""ZeroGPU's `spaces.GPU` as far as it can run off a Space: each call in a forked daemon process, its arguments and
its result pickled across, the seconds it asks for recorded. What the device API adds (scheduling, quotas, moving
tensors to the lent GPU) needs a Space. Used as `spaces` itself by the app the tests start (zerogpu_app.py)."""
from __future__ import annotations

import functools
import multiprocessing
import pickle

calls: list[tuple[str, float]] = []   # (function, seconds asked for), in the calling process
_FORK = multiprocessing.get_context("fork")


def GPU(task=None, *, duration=None, size=None):  # noqa: N802 - the package's name
    def decorate(fn):
        @functools.wraps(fn)
        def call(*args, **kwargs):
            calls.append((fn.__name__, duration(*args, **kwargs) if callable(duration) else duration))
            payload = pickle.dumps((args, kwargs))  # as ZeroGPU's worker queue does: unpicklable input fails here
            reader, writer = _FORK.Pipe(duplex=False)
            worker = _FORK.Process(target=_work, args=(fn, payload, writer), daemon=True)
            worker.start()
            writer.close()
            try:
                kind, value = pickle.loads(reader.recv_bytes())
            except EOFError:
                raise RuntimeError("GPU task aborted (the worker died)") from None
            finally:
                worker.join()
            if kind == "error":
                raise value
            return value
        return call
    return decorate if task is None else decorate(task)


def _work(fn, payload: bytes, writer) -> None:
    args, kwargs = pickle.loads(payload)
    try:
        result = ("ok", fn(*args, **kwargs))
    except Exception as exc:  # noqa: BLE001 - every failure goes back to the caller, as ZeroGPU's does
        result = ("error", exc)
    writer.send_bytes(pickle.dumps(result))


def gradio_auto_wrap(fn):
    """What Gradio asks of `spaces` for every event on a Space: off unless SPACES_GRADIO_AUTO_WRAP is set (the
    package's default), so events run in the app's process and only the decorated functions get the GPU."""
    return fn
