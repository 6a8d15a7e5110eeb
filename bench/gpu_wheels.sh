#!/usr/bin/env bash
# The pure-Python wheels that a lent GPU machine lacks (it has torch, torchvision, numpy, scipy, scikit-learn, pandas,
# pillow, onnx, safetensors, opencv, matplotlib, narwhals, tqdm, no gradio), into .whl/ (git-ignored):
#
#     bash bench/gpu_wheels.sh            # here, where pip reaches PyPI; then carry .whl with bench/gpu_check.sh
#
# plotly (analyze's report), grad-cam + ttach (Grad-CAM), cleanlab + termcolor (evaluate's label suspects): without
# them three of gpu_check's steps stop on an ImportError. grad-cam ships only a source archive, so its wheel is built.
# Versions: the ones the tests pass with here. About 10 MB, well inside the 64 MiB a device call carries.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-.venv/bin/python}
mkdir -p .whl
"$PY" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 -d .whl \
    plotly==7.1.0 ttach==0.0.3 cleanlab==2.9.0 termcolor==3.3.0
"$PY" -m pip wheel -q --no-deps -w .whl grad-cam==1.5.7
ls -l .whl
