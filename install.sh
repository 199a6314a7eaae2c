#!/usr/bin/env bash
# Set up fastreg on a fresh machine: a venv in .venv with pinned torch, the package and its
# compiled kernels (CPU always; CUDA whenever torch is a CUDA build and nvcc is on PATH).
# Switches (see README): PYTHON, FASTREG_NO_EXTENSION, FASTREG_CUDA, TORCH_CUDA_ARCH_LIST, MAX_JOBS.
set -euo pipefail
cd "$(dirname "$0")"
PYTHON=${PYTHON:-python3.11}
command -v "$PYTHON" >/dev/null || PYTHON=python3
[ -x .venv/bin/python ] || "$PYTHON" -m venv .venv
.venv/bin/python -m pip install -q --upgrade pip setuptools wheel ninja
.venv/bin/python -m pip install -q -r requirements.txt
# --no-build-isolation: build against the pinned torch just installed (no second 5 GB download).
.venv/bin/python -m pip install -q --no-build-isolation -e ".[test]"
.venv/bin/python -c "import fastreg, sys; print('fastreg', fastreg.__version__, 'backends on CPU:', fastreg.available_backends('gram_penalty'))"
