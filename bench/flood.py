"""One client's flood against another's predictions, on a public app, with and without the per-client share.

    python bench/flood.py [--run RUN] [--seconds 40] [--threads 8]

Two flooding addresses (127.0.0.2, 127.0.0.3) keep `--threads` /predict calls each in flight for `--seconds`; a
third (127.0.0.4) sends one prediction after another meanwhile. Printed per setting: the share of the third
client's predictions that were answered, their median and longest wait, and how the flooders were answered.
The app is `python app.py` as a Space runs it (SPACE_ID set), in a process of its own; without --run a one-epoch
ResNet-18 is trained on a small demo set first (~30 s).
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]

from conftest import FAST_TRAIN, cli_json, fn_index, free_port, raw_call, raw_upload  # noqa: E402

EXAMPLE = ROOT / "assets/examples/aurora_sprint.jpg"


def tiny_model(work: Path) -> tuple[Path, Path]:
    from carapp.dataset.demo import make_demo_dataset
    make_demo_dataset(work / "demo", seed=0, scale=0.25)
    cli_json("train", "--data", work / "demo", "--run-dir", work / "runs" / "tiny", "--epochs", "1", *FAST_TRAIN)
    return work / "demo", work / "runs"


def flood(url: str, seconds: float, threads: int) -> dict:
    upload = raw_upload(url, EXAMPLE)
    from carapp.ui.predict_tab import TOP1
    inputs = [{"path": upload}, None, "gradcam", TOP1, False, None, None]
    predict = fn_index(url, "/predict")  # once: a flood of joins, not of /config downloads
    stop = time.time() + seconds
    answers = Counter()

    def flooder(source: str) -> None:
        for _ in range(1000):
            if time.time() > stop:
                return
            ok, said = raw_call(url, predict, inputs, source=source, timeout=120)
            answers["served" if ok else str(said)[:40]] += 1
            if not ok:
                time.sleep(0.2)

    pool = [threading.Thread(target=flooder, args=(s,)) for s in ("127.0.0.2", "127.0.0.3") for _ in range(threads)]
    for t in pool:
        t.start()
    time.sleep(3)
    waits, served, sent = [], 0, 0
    while time.time() < stop - 1:
        t0 = time.time()
        ok, _ = raw_call(url, predict, inputs, source="127.0.0.4", timeout=120)
        sent, served = sent + 1, served + ok
        waits.append(time.time() - t0)
    for t in pool:
        t.join()
    return {"other_served": f"{served}/{sent}", "other_median_s": round(statistics.median(waits), 2),
            "other_max_s": round(max(waits), 2), "flooders": dict(answers)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--run", help="a run directory to serve (default: train a tiny one)")
    parser.add_argument("--seconds", type=float, default=40)
    parser.add_argument("--threads", type=int, default=8)
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="carapp-flood-"))
    if args.run:
        data, runs = Path(json.loads((Path(args.run) / "config.json").read_text())["data"]), Path(args.run).parent
    else:
        data, runs = tiny_model(work)
    for label, (per_client, per_pool) in (("per-client share (default: 8, 2 per pool)", ("8", "2")),
                                          ("no per-client share", ("1000000", "1000000"))):
        proc, url = serve(data, runs, {"CARAPP_QUEUE_PER_CLIENT": per_client, "CARAPP_QUEUE_PER_POOL": per_pool})
        try:
            print(label, json.dumps(flood(url, args.seconds, args.threads)), flush=True)
        finally:
            proc.terminate()
            proc.wait(timeout=60)


def serve(data: Path, runs: Path, env: dict) -> tuple[subprocess.Popen, str]:
    """`python app.py` as on a Space, on a free port; returns once it answers."""
    port = free_port()
    proc = subprocess.Popen([sys.executable, "app.py"], cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            env={**os.environ, **env, "SPACE_ID": "bench/flood", "CARAPP_DATA": str(data),
                                 "CARAPP_RUNS_DIR": str(runs), "CARAPP_FIRST_MODEL": "0",
                                 "GRADIO_SERVER_NAME": "127.0.0.1", "GRADIO_SERVER_PORT": str(port)})
    url = f"http://127.0.0.1:{port}/"
    for _ in range(240):
        try:
            urllib.request.urlopen(url, timeout=5).read()
            return proc, url
        except OSError:
            time.sleep(0.5)
    proc.kill()
    raise SystemExit("the app did not start")


if __name__ == "__main__":
    main()
