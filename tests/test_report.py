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


def test_main_with_readme_writes_what_the_benchmark_printed(tmp_path, monkeypatch, capsys):
    report = _report()
    readme = tmp_path / "README.md"
    readme.write_text("# b\n<!-- begin bench_x -->\nold\n<!-- end bench_x -->\n")
    monkeypatch.setattr(report, "BENCH_README", str(readme))
    monkeypatch.setattr(report.write_section, "__defaults__", (str(readme),))

    def main(argv):
        print("| provider | ms |")
        return {"rows": argv}  # not an int: exit status 0

    assert report.main_with_readme("bench_x", main, ["--smoke", "--readme"]) == 0
    assert "| provider | ms |" in capsys.readouterr().out
    text = readme.read_text()
    assert "`python benchmarks/bench_x.py --smoke`:\n\n| provider | ms |" in text and "old" not in text
    assert report.main_with_readme("bench_x", lambda argv: 3, []) == 3  # without --readme nothing is written
    assert readme.read_text() == text
