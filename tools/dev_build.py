"""Developer build of a subset of csrc/ into its own folder, for iterating on one op family.

    python tools/dev_build.py NAME csrc/a.cpp csrc/a_cuda.cu ...   # prints the library path
                                                                  # (csrc/schema_digest.cpp is always added)
    FASTREG_LIBRARY=<that path> python -m pytest tests/...

Builds with the same flags as setup.py (CUDA sources compiled with nvcc when given); holds
/tmp/fastreg-build.lock so that concurrent builds on our 2 cores run one at a time."""
from __future__ import annotations

import fcntl
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import build_env  # noqa: E402

if build_env.cuda_toolkit_root() and "CUDA_HOME" not in os.environ:
    os.environ["CUDA_HOME"] = build_env.cuda_toolkit_root()
os.environ.setdefault("TORCH_CUDA_ARCH_LIST", build_env.DEFAULT_CUDA_ARCHS)
os.environ.setdefault("MAX_JOBS", "2")

from torch.utils.cpp_extension import load  # noqa: E402


def main() -> None:
    name, sources = sys.argv[1], sys.argv[2:]
    # The schema stamp fastreg checks before loading a library (csrc/schema_digest.cpp), always built in.
    stamp = os.path.join("csrc", "schema_digest.cpp")
    if not any(os.path.normpath(s).endswith(stamp) for s in sources):
        sources.append(stamp)
    here = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    build_dir = os.path.join("/tmp/fastreg-dev", name)
    os.makedirs(build_dir, exist_ok=True)
    with_cuda = any(s.endswith(".cu") for s in sources)
    flags = ["-O3", "-std=c++20", "-fopenmp", build_env.schema_define()] + (["-DFASTREG_WITH_CUDA"] if with_cuda else [])
    with open("/tmp/fastreg-build.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        load(
            name=name,
            sources=[os.path.join(here, s) for s in sources],
            extra_cflags=flags,
            extra_cuda_cflags=["-O3", "-std=c++20"] + (["-DFASTREG_WITH_CUDA"] if with_cuda else []),
            extra_ldflags=["-fopenmp"],
            extra_include_paths=[os.path.join(here, "csrc")] + (build_env.nvidia_include_dirs() if with_cuda else []),
            build_directory=build_dir,
            is_python_module=False,
            verbose=False,
        )
    print(os.path.join(build_dir, f"{name}.so"))


if __name__ == "__main__":
    main()
