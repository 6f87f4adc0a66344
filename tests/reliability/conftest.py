"""Reliability suite plumbing: tests record (area, case, count, outcome) rows; the session writes the report.

Each test calls ``reliability.add(...)`` for every class of fault or bad input it tried, once its assertions
passed; rows of a test that failed are still written, marked FAILED.  The markdown (``report.render``) is
written at the end of any session in which at least one test of this folder ran: results/reliability.md when
every test file of this folder ran with nothing deselected, results/reliability-partial.md otherwise
(``FEDSPINE_RELIABILITY_REPORT`` overrides the path; ``0`` disables writing).  The tracked docs/reliability.md
is refreshed only by ``python -m tests.reliability.report``.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.reliability.report import Report, Row, output_path, render

_REPORT = Report()


class Recorder:
    """Per-test handle: ``add(area, case, count, outcome)`` appends one row of the generated table."""

    def __init__(self, nodeid: str) -> None:
        self.nodeid = nodeid

    def add(self, area: str, case: str, count: int, outcome: str) -> None:
        if count < 0:
            raise ValueError("count must be >= 0")
        _REPORT.rows.append(Row(area, case, int(count), outcome, self.nodeid))


@pytest.fixture
def reliability(request: pytest.FixtureRequest) -> Recorder:
    return Recorder(request.node.nodeid)


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo):  # type: ignore[no-untyped-def]
    outcome = yield
    rep = outcome.get_result()
    nodeid = item.nodeid
    if rep.when == "call" or (rep.when == "setup" and rep.outcome != "passed"):
        _REPORT.results[nodeid] = rep.outcome
        if "tests/reliability/" in nodeid.replace("\\", "/"):
            _REPORT.ran += 1


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    # Outcomes of tests outside this folder (the referenced ones): this conftest's runtest hooks only see its own.
    reporter = session.config.pluginmanager.get_plugin("terminalreporter")
    stats = getattr(reporter, "stats", None) or {}
    for reports in stats.values():
        for rep in reports:
            if getattr(rep, "when", None) == "call" and rep.nodeid not in _REPORT.results:
                _REPORT.results[rep.nodeid] = rep.outcome
    if _REPORT.ran == 0:
        return
    here = Path(__file__).parent
    ran_files = {Path(str(item.fspath)).name for item in session.items if Path(str(item.fspath)).parent == here}
    whole = ran_files == {f.name for f in here.glob("test_*.py")} and not stats.get("deselected")
    out = output_path(whole)
    if out is not None:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(render(_REPORT))
