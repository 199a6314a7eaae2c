"""Where the build finds CUDA pieces, resolved from the installed packages (nothing hard-coded).

Used by setup.py and by the CMake configure step (``python tools/build_env.py --cmake``)."""
from __future__ import annotations

import glob
import importlib.util
import os
import shutil
import sys

# CUDA archs built when TORCH_CUDA_ARCH_LIST is unset and no GPU is visible (setup.py, CMakeLists.txt,
# tools/cmake_build.sh, tools/dev_build.py): machine code for A100 (8.0) and H100/H200 (9.0), plus PTX
# for newer GPUs. Machine code matters: a driver older than the toolkit cannot JIT-compile its PTX.
DEFAULT_CUDA_ARCHS = "8.0;9.0+PTX"

NO_TORCH_MESSAGE = """\
fastreg's compiled kernels are built against the installed PyTorch, and none was found.
Install torch first, then build without an isolated build environment (a second, different torch):

    pip install torch            # any version fastreg supports (see pyproject.toml)
    pip install --no-build-isolation fastreg   # or: pip install --no-build-isolation -e .

(FASTREG_NO_EXTENSION=1 builds a pure-Python package instead.)"""


def torch_installed() -> bool:
    """Whether ``import torch`` would find a torch (without importing it)."""
    return importlib.util.find_spec("torch") is not None


def nvidia_include_dirs() -> list[str]:
    """Header folders of the ``nvidia`` wheels installed next to torch (cuBLAS, cuSPARSE, ...)."""
    try:
        import nvidia
    except ImportError:
        return []
    dirs = []
    for root in list(nvidia.__path__):
        dirs += sorted(d for d in glob.glob(os.path.join(root, "*", "include")) if os.path.isdir(d))
    return dirs


def nvidia_library(name: str) -> str | None:
    """Path of a shared library (e.g. ``libnvrtc.so``) from the ``nvidia`` wheels."""
    try:
        import nvidia
    except ImportError:
        return None
    for root in list(nvidia.__path__):
        hits = sorted(glob.glob(os.path.join(root, "*", "lib", name + "*")))
        if hits:
            return hits[0]
    return None


def nvcc_path() -> str | None:
    """The real nvcc (the one on PATH may be a wrapper script that execs it)."""
    cand = os.environ.get("CUDA_HOME") and os.path.join(os.environ["CUDA_HOME"], "bin", "nvcc")
    nvcc = cand if cand and os.path.exists(cand) else shutil.which("nvcc")
    if nvcc is None:
        return None
    with open(nvcc, "rb") as f:
        head = f.read(4096)
    if head.startswith(b"#!"):
        for tok in head.decode(errors="ignore").split():
            if tok.endswith("/nvcc") and os.path.exists(tok):
                return os.path.realpath(tok)
    return os.path.realpath(nvcc)


def cuda_toolkit_root() -> str | None:
    nvcc = nvcc_path()
    return os.path.dirname(os.path.dirname(nvcc)) if nvcc else None


def schema_digest() -> str:
    """The digest of fastreg/_schemas.py's op schemas (read from the file: no torch, no fastreg import)."""
    import importlib.util

    path = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "fastreg", "_schemas.py")
    spec = importlib.util.spec_from_file_location("fastreg_schemas", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.schema_digest()


def schema_define() -> str:
    """The compiler flag that stamps the library with the schemas' digest (csrc/schema_digest.cpp)."""
    return f"-DFASTREG_SCHEMA_DIGEST={schema_digest()}"  # hex digits, unquoted (the C++ makes it a string)


def cmake_args() -> list[str]:
    """CMake configure arguments for CMakeLists.txt, resolved from the installed torch and toolkit.

    FASTREG_CUDA=0 turns the CUDA kernels off (-DFASTREG_CUDA=OFF); list values are ';'-joined
    (one argument each, so print them one per line)."""
    import torch.utils

    args = [f"-DCMAKE_PREFIX_PATH={torch.utils.cmake_prefix_path}", schema_define()]
    root = cuda_toolkit_root()
    if os.environ.get("FASTREG_CUDA") == "0":
        args.append("-DFASTREG_CUDA=OFF")
    if root and torch.version.cuda:
        args.append(f"-DCUDA_TOOLKIT_ROOT_DIR={root}")
        args.append(f"-DCMAKE_CUDA_COMPILER={nvcc_path()}")
        nvrtc = nvidia_library("libnvrtc.so")
        if nvrtc:
            args.append(f"-DCUDA_nvrtc_LIBRARY={nvrtc}")
        args.append("-DFASTREG_NVIDIA_INCLUDES=" + ";".join(nvidia_include_dirs()))
    return args


if __name__ == "__main__":
    if "--default-archs" in sys.argv:
        print(DEFAULT_CUDA_ARCHS)
    if "--cmake" in sys.argv:  # one argument per line (values may contain ';' and spaces)
        print("\n".join(cmake_args()))
