"""Packaging: metadata ranges against the pins, the default CUDA archs, building without torch, the sdist."""
from __future__ import annotations

import os
import re
import subprocess
import sys
import tarfile

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "tools"))
import build_env  # noqa: E402

tomllib = pytest.importorskip("tomllib")  # Python >= 3.11
specifiers = pytest.importorskip("packaging.specifiers")
requirements = pytest.importorskip("packaging.requirements")

# setup.py run as pip would run it in an isolated build environment: torch not importable.
WITHOUT_TORCH = (
    "import importlib.util as u, runpy, sys; find = u.find_spec; "
    "u.find_spec = lambda name, *a, **k: None if name.split('.')[0] == 'torch' else find(name, *a, **k); "
    "sys.argv = ['setup.py'] + sys.argv[1:]; runpy.run_path('setup.py', run_name='__main__')"
)


def read(path: str) -> str:
    with open(os.path.join(ROOT, path)) as f:
        return f.read()


@pytest.fixture(scope="module")
def project() -> dict:
    return tomllib.loads(read("pyproject.toml"))["project"]


def test_default_cuda_archs_have_a100_and_h100_machine_code_and_ptx():
    archs = build_env.DEFAULT_CUDA_ARCHS.split(";")
    assert [a.removesuffix("+PTX") for a in archs] == ["8.0", "9.0"] and archs[-1].endswith("+PTX")
    # every build path uses it: setup.py and tools/dev_build.py import it, cmake_build.sh asks for it,
    # and CMakeLists.txt (no Python at configure time) spells the same list
    assert "build_env.DEFAULT_CUDA_ARCHS" in read("setup.py") and "build_env.DEFAULT_CUDA_ARCHS" in read("tools/dev_build.py")
    assert "build_env.py --default-archs" in read("tools/cmake_build.sh")
    assert f'set(ENV{{TORCH_CUDA_ARCH_LIST}} "{build_env.DEFAULT_CUDA_ARCHS}")' in read("CMakeLists.txt")
    out = subprocess.run([sys.executable, "tools/build_env.py", "--default-archs"], cwd=ROOT, capture_output=True, text=True)
    assert out.stdout.strip() == build_env.DEFAULT_CUDA_ARCHS


def test_metadata(project):
    assert project["name"] == "fastreg" and project["license"] == "MIT"
    assert project["requires-python"] == ">=3.10"
    assert project["scripts"] == {"fastreg": "fastreg.cli:main"}
    assert project["urls"] and all(u.startswith("https://") for u in project["urls"].values())
    assert "torch" not in " ".join(tomllib.loads(read("pyproject.toml"))["build-system"]["requires"])
    assert os.path.exists(os.path.join(ROOT, "LICENSE")) and "MIT License" in read("LICENSE")
    import fastreg

    assert re.search(rf'__version__ = "{re.escape(fastreg.__version__)}"', read("fastreg/__init__.py"))


def test_dependency_ranges_hold_the_pins_and_are_ranges(project):
    """install_requires are ranges (never ==); requirements.txt's exact pins fall inside them."""
    ranges = {requirements.Requirement(r).name: requirements.Requirement(r).specifier for r in project["dependencies"]}
    assert {"torch", "torchvision", "torch-pruning"} <= set(ranges)
    assert all(s.operator != "==" for spec in ranges.values() for s in spec)
    assert ranges["torch-pruning"].contains("1.6.1") and not ranges["torch-pruning"].contains("2.0.0")
    pins = [requirements.Requirement(line) for line in read("requirements.txt").split() if "==" in line]
    for pin in pins:
        if pin.name in ranges:
            (version,) = [s.version for s in pin.specifier]
            assert ranges[pin.name].contains(version), (pin, ranges[pin.name])
    assert "--no-build-isolation" in read("install.sh")


def test_building_without_torch_stops_with_the_message():
    run = subprocess.run([sys.executable, "-c", WITHOUT_TORCH, "bdist_wheel"], cwd=ROOT, capture_output=True, text=True,
                         timeout=120)
    assert run.returncode != 0
    assert "Install torch first" in run.stderr and "--no-build-isolation" in run.stderr, run.stderr[-2000:]
    assert "Traceback" not in run.stderr


def test_metadata_needs_no_torch(tmp_path):
    """What an isolated build environment asks first (egg_info) works without torch."""
    run = subprocess.run([sys.executable, "-c", WITHOUT_TORCH, "-q", "egg_info", "--egg-base", str(tmp_path)], cwd=ROOT,
                         capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr[-2000:]
    pkg_info = (tmp_path / "fastreg.egg-info" / "PKG-INFO").read_text()
    assert "Requires-Dist: torch>=" in pkg_info and "Requires-Python: >=3.10" in pkg_info


def test_sdist_holds_what_a_build_needs(tmp_path):
    run = subprocess.run([sys.executable, "-c", WITHOUT_TORCH, "-q", "sdist", "--dist-dir", str(tmp_path)], cwd=ROOT,
                         capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-2000:]
    (archive,) = tmp_path.glob("fastreg-*.tar.gz")
    with tarfile.open(archive) as tar:
        names = {n.split("/", 1)[1] for n in tar.getnames() if "/" in n}
    needed = {"setup.py", "pyproject.toml", "LICENSE", "CHANGELOG.md", "README.md", "CMakeLists.txt", "requirements.txt",
              "tools/build_env.py", "fastreg/_schemas.py", "fastreg/kernels/multi_tensor.py"}
    needed |= {f"csrc/{f}" for f in os.listdir(os.path.join(ROOT, "csrc"))}
    assert needed <= names, sorted(needed - names)
    assert not any(n.endswith(".so") for n in names)
