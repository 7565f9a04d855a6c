#!/usr/bin/env bash
# Create .venv and install atspeed-exp with its pinned dependencies. The CPU torch 2.13.0 wheel goes in first, so
# no later requirement can pull a multi-GB CUDA build. Safe to rerun: an existing .venv is reused.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-python3}"
[ -x .venv/bin/python ] || "$PYTHON" -m venv .venv
.venv/bin/python -m pip install -q --upgrade pip
.venv/bin/python -m pip install -q torch==2.13.0
.venv/bin/python -m pip install -q -e ".[dev]"
