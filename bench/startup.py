"""Start-up: seconds until `python app.py` answers HTTP 200, against `python -c "import torch, torchvision, gradio"`.

    python bench/startup.py [--runs 3]

Goal (issue 4): app start <= 1.2x the bare imports. Both are cold processes; the median of --runs is reported.
"""
from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
GOAL = 1.2


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def time_imports() -> float:
    t = time.perf_counter()
    subprocess.run([sys.executable, "-c", "import torch, torchvision, gradio"], check=True)
    return time.perf_counter() - t


def time_app() -> float:
    port = free_port()
    env = {**os.environ, "GRADIO_SERVER_PORT": str(port), "GRADIO_SERVER_NAME": "127.0.0.1"}
    t = time.perf_counter()
    proc = subprocess.Popen([sys.executable, "app.py"], cwd=ROOT, env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    try:
        while True:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/", timeout=1) as r:
                    if r.status == 200:
                        return time.perf_counter() - t
            except OSError:
                if proc.poll() is not None:
                    raise SystemExit("app.py exited before serving")
                time.sleep(0.05)
    finally:
        proc.terminate()
        proc.wait(timeout=30)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", type=int, default=3)
    args = ap.parse_args()
    imports = statistics.median(time_imports() for _ in range(args.runs))
    app = statistics.median(time_app() for _ in range(args.runs))
    print(json.dumps({"imports_s": round(imports, 2), "app_http_200_s": round(app, 2),
                      "ratio": round(app / imports, 3), "goal": GOAL}, indent=2))
    return 0 if app / imports <= GOAL else 1


if __name__ == "__main__":
    sys.exit(main())
