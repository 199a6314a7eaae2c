"""Write a benchmark's markdown output into a marked section of a README, so that the figures there
come from the scripts, not from typing.

A section is the text between ``<!-- begin NAME -->`` and ``<!-- end NAME -->``; the markers stay, the
text between them is replaced. ``python benchmarks/bench_x.py --readme`` calls :func:`write_section`.
"""
from __future__ import annotations

import contextlib
import io
import os
import re
import sys
from typing import Callable, Sequence

HERE = os.path.dirname(os.path.abspath(__file__))
BENCH_README = os.path.join(HERE, "README.md")
TOP_README = os.path.join(os.path.dirname(HERE), "README.md")


def markers(name: str) -> tuple[str, str]:
    return f"<!-- begin {name} -->", f"<!-- end {name} -->"


def replace_section(text: str, name: str, body: str) -> str:
    """``text`` with the section ``name`` holding ``body``; ValueError if the markers are missing."""
    begin, end = markers(name)
    pattern = re.compile(re.escape(begin) + r".*?" + re.escape(end), re.S)
    if not pattern.search(text):
        raise ValueError(f"no section {name!r}: add the lines {begin!r} and {end!r} where it belongs")
    return pattern.sub(lambda _: f"{begin}\n{body.strip()}\n{end}", text, count=1)


def write_section(name: str, body: str, path: str = BENCH_README) -> None:
    """Replace the section ``name`` of ``path`` (benchmarks/README.md by default) with ``body``."""
    with open(path, encoding="utf-8") as f:
        text = f.read()
    with open(path, "w", encoding="utf-8") as f:
        f.write(replace_section(text, name, body))


class _Tee(io.StringIO):
    """Collects what is printed and passes it on."""

    def __init__(self, out):
        super().__init__()
        self.out = out

    def write(self, text: str) -> int:
        self.out.write(text)
        return super().write(text)


def main_with_readme(name: str, main: Callable[[list[str]], object], argv: Sequence[str] | None = None) -> int:
    """Run ``main(argv)`` (an int it returns is the exit status, anything else means 0). With ``--readme`` among
    the arguments (removed before the call), also write what it printed into the section ``name`` of
    benchmarks/README.md, under the command that produced it."""
    argv = list(sys.argv[1:] if argv is None else argv)
    readme = "--readme" in argv
    if readme:
        argv.remove("--readme")
    tee = _Tee(sys.stdout)
    with contextlib.redirect_stdout(tee) if readme else contextlib.nullcontext():
        rc = main(argv)
    rc = rc if isinstance(rc, int) else 0
    if not readme:
        return rc
    command = " ".join(["python", f"benchmarks/{name}.py", *argv])
    write_section(name, f"`{command}`:\n\n{tee.getvalue()}")
    return rc
