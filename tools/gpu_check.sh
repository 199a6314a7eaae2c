#!/usr/bin/env bash
# One-command validation of fastreg on an NVIDIA GPU (no network needed); writes a markdown report.
#   bash tools/gpu_check.sh [--wheels DIR] [--report PATH] [--budget SECONDS] [--only STAGE ...]
# Runs with $PYTHON (default: .venv/bin/python when present, else python3); see tools/gpu_check.py.
set -euo pipefail
cd "$(dirname "$0")/.."
if [ -z "${PYTHON:-}" ]; then
  if [ -x .venv/bin/python ]; then PYTHON=.venv/bin/python; else PYTHON=python3; fi
fi
exec "$PYTHON" tools/gpu_check.py "$@"
