#!/usr/bin/env bash
# Install fastreg into a fresh venv that already holds an older torch, as a user with their own
# environment would, and run the op tests against that install:
#
#   bash tools/test_old_torch.sh                  # torch 2.11.0 / torchvision 0.26.0 (the oldest supported)
#   TORCH=2.12.1 TORCHVISION=0.27.1 bash tools/test_old_torch.sh
#
# Steps: a venv in $VENV with torch==$TORCH (+ its pure-Python deps, triton, the nvidia runtime wheels
# of a CUDA build: about 3 GB from PyPI, 5 GB installed); a source distribution of this checkout
# (python -m build --sdist); `pip install --no-build-isolation <sdist>`, which must keep that torch;
# then the op test files, run from outside the checkout so that the installed package is the one
# imported. The C++ kernels are built CPU-only (FASTREG_CUDA=0) unless FASTREG_CUDA says otherwise.
# Env: PYTHON (default python3.11), VENV (default /tmp/fastreg-torch-$TORCH), TORCH, TORCHVISION,
# PYTEST_ARGS (extra pytest arguments), MAX_JOBS (default 2).
set -euo pipefail
REPO="$(cd "$(dirname "$0")/.." && pwd)"
TORCH=${TORCH:-2.11.0}
TORCHVISION=${TORCHVISION:-0.26.0}
PYTHON=${PYTHON:-python3.11}
command -v "$PYTHON" >/dev/null || PYTHON=python3
VENV=${VENV:-/tmp/fastreg-torch-$TORCH}
export FASTREG_CUDA=${FASTREG_CUDA:-0} MAX_JOBS=${MAX_JOBS:-2}
# A site-wide pip constraint file may cap torch at the pinned release: this venv must not inherit it.
export PIP_CONSTRAINT=
PIP=("$VENV/bin/python" -m pip)

[ -x "$VENV/bin/python" ] || "$PYTHON" -m venv "$VENV"
"${PIP[@]}" install -q --upgrade pip "setuptools>=77" wheel ninja build
"${PIP[@]}" install -q "torch==$TORCH" "torchvision==$TORCHVISION"
"${PIP[@]}" install -q -r <(grep -vE '^(torch|torchvision)==' "$REPO/requirements.txt")
# The op tests run the Triton kernels in Triton's CPU interpreter, which before Triton 3.8 reads
# one-element arrays as scalars, an error from numpy 2.4 on (no effect on GPU runs).
if "$VENV/bin/python" -c "import sys, triton; sys.exit(tuple(map(int, triton.__version__.split('.')[:2])) >= (3, 8))"; then
  "${PIP[@]}" install -q "numpy<2.4"
fi
"$VENV/bin/python" -c "import torch; print('torch', torch.__version__, 'cuda' if torch.version.cuda else 'cpu')"

DIST=$(mktemp -d)
trap 'rm -rf "$DIST"' EXIT
"$VENV/bin/python" -m build --sdist --outdir "$DIST" "$REPO" >/dev/null
SDIST=$(ls "$DIST"/fastreg-*.tar.gz)
echo "installing $(basename "$SDIST")"
"${PIP[@]}" install -q --no-build-isolation --no-deps --force-reinstall "$SDIST"
"${PIP[@]}" check
"$VENV/bin/python" -c "
import torch, fastreg
assert torch.__version__.startswith('$TORCH'), f'the install replaced torch $TORCH by {torch.__version__}'
print('fastreg', fastreg.__version__, 'on torch', torch.__version__, 'backends:', fastreg.available_backends('gram_penalty'))
"

# The op tests (every backend on this machine against the reference, values and gradients, opcheck).
cd "$DIST"
TRITON_INTERPRET=1 "$VENV/bin/python" -I -m pytest -q -p no:cacheprovider --rootdir "$DIST" \
  "$REPO/tests/test_gram_penalty.py" "$REPO/tests/test_gram_cpp.py" "$REPO/tests/test_gram_triton.py" \
  "$REPO/tests/test_fused.py" "$REPO/tests/test_fused_triton.py" ${PYTEST_ARGS:-}
