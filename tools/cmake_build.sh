#!/usr/bin/env bash
# Configure and build csrc/ with CMake into build-cmake/libfastreg.so, which torch.ops.load_library
# loads:  FASTREG_LIBRARY=build-cmake/libfastreg.so python -m pytest tests/test_gram_penalty.py -k cpp
# Paths (torch's CMake prefix, CUDA toolkit, nvrtc, nvidia headers) come from tools/build_env.py.
# Env: PYTHON (default .venv/bin/python), FASTREG_CUDA=0 (no CUDA kernels), TORCH_CUDA_ARCH_LIST
# (default tools/build_env.py DEFAULT_CUDA_ARCHS: 8.0;9.0+PTX), MAX_JOBS (default 2). Holds /tmp/fastreg-build.lock while compiling.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-.venv/bin/python}
export TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-$("$PYTHON" tools/build_env.py --default-archs)}
mapfile -t ARGS < <("$PYTHON" tools/build_env.py --cmake)
GENERATOR=()
if command -v ninja >/dev/null; then GENERATOR=(-G Ninja); fi
if [ -f build-cmake/CMakeCache.txt ]; then GENERATOR=(); fi  # keep the generator of an existing build dir
cmake -S . -B build-cmake "${GENERATOR[@]}" -DCMAKE_BUILD_TYPE=Release "${ARGS[@]}"
BUILD=(cmake --build build-cmake -j "${MAX_JOBS:-2}")
if command -v flock >/dev/null; then
  flock /tmp/fastreg-build.lock "${BUILD[@]}"
else
  "${BUILD[@]}"
fi
ls build-cmake/libfastreg*.so
