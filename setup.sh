#!/usr/bin/env bash
# Creates .venv (if missing) and installs ivreg with its dependencies. Idempotent.
# The torch/torchvision pins are for this project's dev and CI machines (Python 3.11,
# wheels on local disk); the package itself only needs torch >= 2.4.
set -euo pipefail
cd "$(dirname "$0")"
PYTHON="${PYTHON:-python3}"
if [ ! -x .venv/bin/python ]; then
    "$PYTHON" -m venv .venv
fi
.venv/bin/python -m pip install -q --upgrade pip
.venv/bin/python -m pip install -q "torch==${TORCH_VERSION:-2.14.1}" "torchvision==${TORCHVISION_VERSION:-0.29.1}"
.venv/bin/python -m pip install -q -e ".[dev]"
