"""pytest set-up for benchmarks/ (protocol: ../shared/BENCHMARKING.md).

* Collects ``bench_*.py`` files (pytest's default pattern is ``test_*.py``).
* Options: ``--bench-smoke`` (env ``FASTREG_BENCH_SMOKE=1``): tiny counts, for checking the code paths;
  ``--bench-slow`` (env ``FASTREG_BENCH_SLOW=1``): every model and pruning ratio.
* Fixtures: ``bench_settings``, ``gemm_peak`` (the machine's GEMM peak in flop/s, measured once per
  session), ``bench_record(group, row)`` — rows recorded with it are printed at the end as one
  markdown table per group, with every provider's ratio to the best peer (see common.add_ratios).
"""
from __future__ import annotations

import os
import sys

import pytest

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common  # noqa: E402

_RECORDED: dict[str, list[dict]] = {}
_PEAK: list[float] = []

SUMMARY_COLUMNS = (
    ("provider", "provider", ""),
    ("median ms", "median_ms", ".3f"),
    ("× best peer", "vs_best_peer", ".2f"),
    ("ops/step", "aten_ops", "d"),
    ("GFLOP/s", "gflops", ".1f"),
    ("roofline", "roofline", ".1%"),
    ("note", "note", ""),
)


def pytest_addoption(parser):
    group = parser.getgroup("fastreg benchmarks")
    group.addoption("--bench-smoke", action="store_true", help="tiny repetition counts (env FASTREG_BENCH_SMOKE=1)")
    group.addoption("--bench-slow", action="store_true", help="every model and ratio (env FASTREG_BENCH_SLOW=1)")


def pytest_collect_file(parent, file_path):
    if file_path.suffix == ".py" and file_path.name.startswith("bench_") and not parent.session.isinitpath(file_path):
        return pytest.Module.from_parent(parent, path=file_path)
    return None


@pytest.fixture(scope="session")
def bench_settings(pytestconfig) -> dict:
    return {
        "smoke": pytestconfig.getoption("bench_smoke") or common.smoke_mode(),
        "slow": pytestconfig.getoption("bench_slow") or os.environ.get("FASTREG_BENCH_SLOW") == "1",
    }


@pytest.fixture(scope="session")
def gemm_peak(bench_settings) -> float:
    """flop/s of a large float32 torch.mm on this machine, measured now (smaller and shorter in smoke mode)."""
    peak = common.gemm_peak_flops(n=512, reps=3) if bench_settings["smoke"] else common.gemm_peak_flops()
    _PEAK.append(peak)
    return peak


@pytest.fixture
def bench_record():
    """``bench_record(group, row)``: keep a result row (keys as in common.markdown_table columns) for the summary."""

    def record(group: str, row: dict) -> None:
        _RECORDED.setdefault(group, []).append(row)

    return record


def pytest_terminal_summary(terminalreporter):
    if not _RECORDED:
        return
    write = terminalreporter.write_line
    terminalreporter.section("fastreg benchmark summary (markdown)")
    write(f"Machine: {common.machine_description()}")
    if _PEAK:
        write(f"GEMM peak {_PEAK[0] / 1e9:.1f} GFLOP/s (float32 torch.mm, measured in this run)")
    for group, rows in _RECORDED.items():
        common.add_ratios(rows)
        write("")
        write(f"### {group}")
        write("")
        for line in common.markdown_table(rows, SUMMARY_COLUMNS).splitlines():
            write(line)
