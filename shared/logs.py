"""structlog setup for every process: JSON lines in services, a console renderer on a terminal."""

from __future__ import annotations

import logging
import sys
import threading
from typing import Any

import structlog

_LEVELS = {"DEBUG": logging.DEBUG, "INFO": logging.INFO, "WARNING": logging.WARNING, "ERROR": logging.ERROR,
           "CRITICAL": logging.CRITICAL}
_lock = threading.Lock()
_configured: tuple[bool, str] | None = None


class _LiveStderr:
    """Writes to whatever ``sys.stderr`` is now (test runners swap it; a stale stream may be closed)."""

    def write(self, text: str) -> int:
        return sys.stderr.write(text)

    def flush(self) -> None:
        sys.stderr.flush()


def configure_logging(json: bool | None = None, level: str = "INFO") -> None:
    """Configure structlog once per process (later calls with the same arguments are no-ops).

    ``json=None`` picks JSON lines unless stderr is a terminal.  Timestamps are ISO 8601 UTC.  Standard
    library loggers (paho, amqtt) are routed through the same renderer at the same level.
    """
    global _configured
    level_name = level.upper()
    if level_name not in _LEVELS:
        raise ValueError(f"log level {level!r} is not one of {sorted(_LEVELS)}")
    use_json = (not sys.stderr.isatty()) if json is None else bool(json)
    with _lock:
        if _configured == (use_json, level_name):
            return
        shared: list[Any] = [
            structlog.contextvars.merge_contextvars,
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
        ]
        renderer: Any
        if use_json:
            shared += [structlog.processors.format_exc_info]
            renderer = structlog.processors.JSONRenderer()
        else:
            renderer = structlog.dev.ConsoleRenderer(colors=sys.stderr.isatty())
        structlog.configure(
            processors=[*shared, renderer],
            wrapper_class=structlog.make_filtering_bound_logger(_LEVELS[level_name]),
            logger_factory=structlog.PrintLoggerFactory(file=_LiveStderr()),  # type: ignore[arg-type]
            cache_logger_on_first_use=False,
        )
        # Standard-library logging (paho, amqtt, transformers) through the same renderer.
        handler = logging.StreamHandler(_LiveStderr())  # type: ignore[arg-type]
        handler.setFormatter(structlog.stdlib.ProcessorFormatter(
            processor=renderer,
            foreign_pre_chain=[structlog.stdlib.add_logger_name, *shared],
        ))
        root = logging.getLogger()
        for h in list(root.handlers):
            if getattr(h, "_fedspine", False):
                root.removeHandler(h)
        handler._fedspine = True  # type: ignore[attr-defined]
        root.addHandler(handler)
        root.setLevel(max(_LEVELS[level_name], logging.INFO))
        _configured = (use_json, level_name)


def json_lines() -> bool:
    """Whether this process writes JSON lines (``configure_logging`` chose JSON, as it does without a terminal)."""
    return bool(_configured and _configured[0])


def get_logger(name: str | None = None, **bind: Any) -> structlog.BoundLogger:
    """A structlog logger with ``logger=name`` and ``bind`` bound once (bind node ids here, not in contextvars)."""
    log = structlog.get_logger()
    if name:
        bind = {"logger": name, **bind}
    return log.bind(**bind) if bind else log


class LiveRoundLogger:
    """A bound logger whose ``round`` field is read from ``current()`` when each line is written.

    A service binds its node id once, but its round changes: lines logged outside a round's own handler (the
    network thread, message decoding, the trainer, the transport) still say which round the process was in.
    ``bind(round=…)`` returns an ordinary logger pinned to that round (a handler that knows its round); any other
    ``bind`` stays live.
    """

    def __init__(self, log: Any, current: Any) -> None:
        self._log = log
        self._current = current

    def bind(self, **fields: Any) -> Any:
        if "round" in fields:
            return self._log.bind(**fields)
        return LiveRoundLogger(self._log.bind(**fields), self._current)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._log.bind(round=self._current()), name)


def quiet_third_party() -> None:
    """For services: every line of output a JSON line.  Python warnings go through logging (and so through the
    structlog renderer, one line each); transformers' own stderr handler is removed so that its messages (the
    load report included) propagate to the same renderer; progress bars (transformers, huggingface_hub, tqdm)
    are off.  Call after ``configure_logging``."""
    import os

    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    os.environ.setdefault("TQDM_DISABLE", "1")
    logging.captureWarnings(True)
    try:
        from transformers.utils import logging as hf_logging
    except ImportError:  # the coordinator does not need transformers
        return
    hf_logging.disable_progress_bar()
    hf_logging.disable_default_handler()
    hf_logging.enable_propagation()
    hf_logging.set_verbosity_warning()
