"""benchmarks/report.py: a benchmark's markdown replaces a marked README section."""
import importlib.util
import pathlib

import pytest

REPORT = pathlib.Path(__file__).resolve().parents[1] / "benchmarks" / "report.py"


def _report():
    spec = importlib.util.spec_from_file_location("bench_report", REPORT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_readme_section_replaced_between_markers():
    replace_section = _report().replace_section
    text = "intro\n<!-- begin t -->\nold\nfigures\n<!-- end t -->\noutro\n"
    out = replace_section(text, "t", "| a |\n")
    assert out == "intro\n<!-- begin t -->\n| a |\n<!-- end t -->\noutro\n"
    with pytest.raises(ValueError, match="no section 'u'"):
        replace_section(text, "u", "x")
