#!/usr/bin/env bash
# Create .venv and install atspeed-exp with its pinned dependencies. The CPU torch 2.13.0 wheel goes in first, so
# no later requirement can pull a multi-GB CUDA build. Safe to rerun: an existing .venv is reused, and when neither
# pyproject.toml nor this script changed since the last successful install, nothing is installed again.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-python3}"
[ -x .venv/bin/python ] || "$PYTHON" -m venv .venv
stamp=".venv/.installed-$(cat pyproject.toml scripts/setup.sh | sha256sum | cut -c1-16)"
if [ -f "$stamp" ] && .venv/bin/python -c "import atspeed_exp, torch" 2>/dev/null; then
  echo "setup: .venv is up to date (pyproject.toml unchanged)"
  exit 0
fi
.venv/bin/python -m pip install -q --upgrade pip
.venv/bin/python -m pip install -q torch==2.13.0
.venv/bin/python -m pip install -q -e ".[dev]"
rm -f .venv/.installed-*
touch "$stamp"
