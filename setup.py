"""Build fastreg and its compiled kernels (``fastreg._C``).

CPU kernels (csrc/*.cpp) are always built. CUDA kernels (csrc/*.cu) are built whenever torch is a
CUDA build and nvcc is found — never conditioned on a GPU being visible. Switches:

  FASTREG_NO_EXTENSION=1   build no compiled extension (pure Python; the reference and triton backends serve)
  FASTREG_CUDA=0|1|auto    skip / force / auto-detect the CUDA kernels (default auto)
  TORCH_CUDA_ARCH_LIST     CUDA archs (default here, when no GPU is visible: machine code for 8.0 (A100)
                           and 9.0 (H100/H200) plus PTX, tools/build_env.py DEFAULT_CUDA_ARCHS)
  MAX_JOBS                 parallel compile jobs (ninja)

The package metadata (dependencies, entry point) is in pyproject.toml. The extension is built against
the torch already installed, so install torch first and build without isolation:
``pip install --no-build-isolation .`` (a source distribution, ``python -m build --sdist``, needs no torch).
"""
import glob
import os
import sys

from setuptools import setup

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "tools"))
import build_env  # noqa: E402

# Commands that only write metadata or a source distribution: they need no torch.
METADATA_COMMANDS = {"egg_info", "sdist", "--version", "--name", "check"}


def extensions():
    if os.environ.get("FASTREG_NO_EXTENSION") == "1":
        return [], {}
    if not build_env.torch_installed():
        if set(sys.argv[1:]) & METADATA_COMMANDS:
            return [], {}
        raise SystemExit(build_env.NO_TORCH_MESSAGE)

    # torch.utils.cpp_extension reads CUDA_HOME when imported: point it at the real toolkit
    # (the nvcc on PATH may be a wrapper script outside the toolkit).
    if build_env.cuda_toolkit_root() and "CUDA_HOME" not in os.environ:
        os.environ["CUDA_HOME"] = build_env.cuda_toolkit_root()
    import torch
    from torch.utils.cpp_extension import BuildExtension, CppExtension, CUDAExtension

    mode = os.environ.get("FASTREG_CUDA", "auto")
    if mode not in ("0", "1", "auto"):
        raise SystemExit(f"FASTREG_CUDA must be 0, 1 or auto, got {mode!r}")
    have_cuda = torch.version.cuda is not None and build_env.nvcc_path() is not None
    if mode == "1" and not have_cuda:
        raise SystemExit("FASTREG_CUDA=1 but torch is not a CUDA build or nvcc was not found")
    with_cuda = have_cuda and mode != "0"

    here = os.path.dirname(os.path.abspath(__file__))
    sources = sorted(glob.glob(os.path.join("csrc", "*.cpp")))
    cxx = ["-O3", "-std=c++20", "-fopenmp", build_env.schema_define()]
    kwargs = dict(extra_link_args=["-fopenmp"], include_dirs=[os.path.join(here, "csrc")])
    if with_cuda:
        if "TORCH_CUDA_ARCH_LIST" not in os.environ and not torch.cuda.is_available():
            os.environ["TORCH_CUDA_ARCH_LIST"] = build_env.DEFAULT_CUDA_ARCHS
        sources += sorted(glob.glob(os.path.join("csrc", "*.cu")))
        kwargs["include_dirs"] += build_env.nvidia_include_dirs()
        ext = CUDAExtension(
            "fastreg._C",
            sources,
            extra_compile_args={"cxx": cxx + ["-DFASTREG_WITH_CUDA"], "nvcc": ["-O3", "-std=c++20", "-DFASTREG_WITH_CUDA"]},
            **kwargs,
        )
    else:
        ext = CppExtension("fastreg._C", sources, extra_compile_args={"cxx": cxx}, **kwargs)
    return [ext], {"build_ext": BuildExtension.with_options(use_ninja=True)}


ext_modules, cmdclass = extensions()

# Metadata (name, version, dependencies, entry point) lives in pyproject.toml.
setup(ext_modules=ext_modules, cmdclass=cmdclass)
