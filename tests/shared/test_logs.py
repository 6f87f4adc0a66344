"""structlog setup: JSON lines with ISO timestamps, level filtering, stdlib routing, idempotence."""

from __future__ import annotations

import json
import logging
from collections.abc import Iterator

import pytest
import structlog

from shared import logs


class Err:
    def __init__(self, capsys: pytest.CaptureFixture[str]) -> None:
        self.capsys = capsys

    def getvalue(self) -> str:
        return self.capsys.readouterr().err


@pytest.fixture
def stderr(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> Iterator[Err]:
    """Logging configured inside a test writes to capsys' stderr; structlog and the root logger are restored."""
    saved = structlog.get_config()
    root_handlers, root_level = list(logging.getLogger().handlers), logging.getLogger().level
    monkeypatch.setattr(logs, "_configured", None)
    yield Err(capsys)
    structlog.configure(**saved)
    logging.getLogger().handlers[:] = root_handlers
    logging.getLogger().setLevel(root_level)


def test_json_lines_with_iso_timestamps_and_bound_context(stderr: Err) -> None:
    logs.configure_logging(json=True, level="INFO")
    log = logs.get_logger("edge_node", node_id="node-a")
    log.info("round_done", round=3, loss=0.25)
    log.debug("hidden")
    logging.getLogger("paho").warning("stdlib %s", "routed")
    lines = [json.loads(x) for x in stderr.getvalue().splitlines()]
    assert len(lines) == 2
    first = lines[0]
    assert first["event"] == "round_done" and first["node_id"] == "node-a" and first["logger"] == "edge_node"
    assert first["level"] == "info" and first["round"] == 3
    assert first["timestamp"].endswith("Z") and "T" in first["timestamp"]
    assert lines[1]["event"] == "stdlib routed" and lines[1]["logger"] == "paho"


def test_idempotent_and_level_checked(stderr: Err) -> None:
    logs.configure_logging(json=True, level="warning")
    logs.configure_logging(json=True, level="warning")
    ours = [h for h in logging.getLogger().handlers if getattr(h, "_fedspine", False)]
    assert len(ours) == 1
    logs.get_logger("x").info("filtered")
    logs.get_logger("x").warning("kept")
    assert [json.loads(x)["event"] for x in stderr.getvalue().splitlines()] == ["kept"]
    with pytest.raises(ValueError, match="log level"):
        logs.configure_logging(level="LOUD")


def test_console_renderer_when_not_json(stderr: Err) -> None:
    logs.configure_logging(json=False)
    logs.get_logger("coordinator").info("hello", n=1)
    out = stderr.getvalue()
    assert "hello" in out and "n=1" in out and not out.lstrip().startswith("{")


def test_a_service_writes_only_json_lines_third_party_output_included() -> None:
    """Python warnings, transformers' messages (its load report) and progress bars: JSON lines or nothing."""
    import subprocess
    import sys
    from pathlib import Path

    code = ("from shared.logs import configure_logging, quiet_third_party\n"
            "configure_logging(json=True); quiet_third_party()\n"
            "import warnings; warnings.warn('deprecated thing', FutureWarning)\n"
            "from transformers.utils import logging as hf\n"
            "hf.get_logger('transformers.modeling_utils').warning('Some weights were newly initialized:\\n  a table')\n"
            "from transformers.utils.logging import tqdm\n"
            "for _ in tqdm(range(3), desc='Loading weights'): pass\n")
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                       cwd=Path(__file__).resolve().parents[2])
    assert p.returncode == 0, p.stderr
    lines = [json.loads(line) for line in p.stderr.splitlines()]  # fails on any line that is not JSON
    assert [e["logger"] for e in lines] == ["py.warnings", "transformers.modeling_utils"]
    assert p.stdout == ""


@pytest.mark.parametrize("as_json", [True, False])
def test_the_reason_a_service_stops_is_a_json_line_where_it_logs_json(stderr: Err, as_json: bool) -> None:
    """``fedspine node 2>>node.log`` logs JSON lines: the line saying why it stopped (a missing data file, a broker
    that refuses it) must be one too, or ``jq`` on the log stops at it; on a terminal it stays one plain line."""
    from shared.cli import run_service
    from shared.config import ConfigError

    def fails() -> int:
        raise ConfigError("[node] data_path '/nope.csv' does not exist")

    logs.configure_logging(json=as_json)
    assert run_service("node", fails) == 2
    out = stderr.getvalue().strip()
    message = "fedspine node: configuration error: [node] data_path '/nope.csv' does not exist"
    if as_json:
        record = json.loads(out)
        assert record["event"] == "start_up_failed" and record["level"] == "error"
        assert record["error"] == message and record["exit_status"] == 2
    else:
        assert out == message


def test_a_service_that_crashes_logs_its_traceback_as_a_json_line(stderr: Err) -> None:
    """Anything no check foresaw (a model folder transformers cannot read, a bug): exit 1 as an uncaught exception
    would, with the traceback inside a JSON line at level error instead of plain text after the JSON lines."""
    from shared.cli import run_service

    def crashes() -> int:
        raise RuntimeError("boom")

    logs.configure_logging(json=True)
    assert run_service("node", crashes) == 1
    record = json.loads(stderr.getvalue().strip())
    assert record["event"] == "service_failed" and record["level"] == "error" and record["exit_status"] == 1
    assert "Traceback" in record["exception"] and "RuntimeError: boom" in record["exception"]
