"""The reliability report: what a run writes where (never into a tracked file) and when docs/ gets a copy."""

from __future__ import annotations

import pytest

from tests.reliability import report as rep


def _report(outcome: str) -> rep.Report:
    r = rep.Report(ran=2)
    r.rows = [rep.Row("faults", "broker restarted", 1, "run completed", "tests/reliability/test_faults.py::t1"),
              rep.Row("fuzz", "random bytes", 50, "50 rejected", "tests/reliability/test_fuzz.py::t2")]
    r.results = {"tests/reliability/test_faults.py::t1": "passed", "tests/reliability/test_fuzz.py::t2": outcome,
                 rep.REFERENCED[0][2]: "passed", "tests/shared/test_other.py::unrelated": "failed"}
    return r


def test_render_shows_the_refresh_command_failures_and_referenced_outcomes():
    ok = rep.render(_report("passed"), commit="abc1234")
    assert rep.COMMAND in ok and "commit abc1234" in ok and "2 reliability test(s) run, 0 failed," in ok
    assert "| fuzz | random bytes | 50 | 50 rejected | `t2` |" in ok and "**FAILED**" not in ok
    assert f"`{rep.REFERENCED[0][2]}` | passed |" in ok and f"`{rep.REFERENCED[1][2]}` | not run" in ok
    assert "| faults | 1 |" in ok and "| fuzz | 50 |" in ok
    bad = rep.render(_report("failed"), commit="abc1234")
    assert "1 failed," in bad and "**FAILED** (50 rejected)" in bad  # an unrelated failure is not counted


def test_a_run_writes_under_results_never_docs(monkeypatch, tmp_path):
    monkeypatch.delenv("FEDSPINE_RELIABILITY_REPORT", raising=False)
    assert rep.output_path(True) == rep.REPO / "results" / "reliability.md"
    assert rep.output_path(False) == rep.REPO / "results" / "reliability-partial.md"
    monkeypatch.setenv("FEDSPINE_RELIABILITY_REPORT", "0")
    assert rep.output_path(True) is None
    monkeypatch.setenv("FEDSPINE_RELIABILITY_REPORT", str(tmp_path / "r.md"))
    assert rep.output_path(False) == tmp_path / "r.md"


def test_promote_copies_only_a_passing_report(tmp_path):
    source, dest = tmp_path / "reliability.md", tmp_path / "docs.md"
    with pytest.raises(SystemExit, match="does not exist"):
        rep.promote(source, dest)
    source.write_text(rep.render(_report("failed"), commit="abc1234"))
    with pytest.raises(SystemExit, match="not the report of a passing run"):
        rep.promote(source, dest)
    assert not dest.exists()
    source.write_text(rep.render(_report("passed"), commit="abc1234"))
    assert rep.promote(source, dest).startswith("Run: ") and dest.read_text() == source.read_text()
