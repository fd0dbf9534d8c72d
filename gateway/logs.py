"""Structured logs: one JSON object per line, carrying task id, decision id and agent.

Context is held in a ``contextvars`` mapping so that every line logged while handling a task
carries its ids without each call site repeating them.
"""

from __future__ import annotations

import contextvars
import json
import logging
import sys
import time
from typing import Any

# The default is never mutated: bound() and bind() always set a new dict.
_CONTEXT: contextvars.ContextVar[dict[str, Any]] = contextvars.ContextVar(
    "gateway_log_context",
    default={},  # noqa: B039
)
_RESERVED = set(logging.LogRecord("", 0, "", 0, "", None, None).__dict__) | {"message"}


class bound:
    """Attach ``fields`` (e.g. task_id, agent) to every log line inside the block.

    A class rather than a ``contextlib.contextmanager`` generator: it is entered twice per
    routed message, and the generator machinery cost more than the work.
    """

    __slots__ = ("_fields", "_token")

    def __init__(self, **fields: Any) -> None:
        self._fields = fields

    def __enter__(self) -> None:
        fields = self._fields
        self._token = _CONTEXT.set({**_CONTEXT.get(), **{k: v for k, v in fields.items() if v}})

    def __exit__(self, *exc: object) -> None:
        _CONTEXT.reset(self._token)


def bind(**fields: Any) -> None:
    """Attach ``fields`` to the rest of the current task's (or context's) log lines."""
    _CONTEXT.set({**_CONTEXT.get(), **{k: v for k, v in fields.items() if v}})


class JsonFormatter(logging.Formatter):
    """Formats a record as one JSON line: time, level, logger, message, context, extras."""

    def format(self, record: logging.LogRecord) -> str:
        line: dict[str, Any] = {
            "ts": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
            + f".{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": record.getMessage(),
        }
        line.update(_CONTEXT.get())
        for key, value in record.__dict__.items():
            if key not in _RESERVED and not key.startswith("_"):
                line[key] = value
        if record.exc_info and record.exc_info[0] is not None:
            # Operators get the exception type and message; never a multi-line stack
            # trace that breaks the one-line-per-event contract.
            exc = record.exc_info[1]
            line["error"] = f"{type(exc).__name__}: {exc}"
        return json.dumps(line, default=str, ensure_ascii=False)


def configure(level: str = "info", stream: Any = None) -> None:
    """Route the ``gateway`` and ``aiohttp`` loggers to JSON lines on ``stream``."""
    handler = logging.StreamHandler(stream or sys.stderr)
    handler.setFormatter(JsonFormatter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    # aiohttp's access log duplicates our own request log line.
    logging.getLogger("aiohttp.access").setLevel(logging.WARNING)
    logging.getLogger("docker").setLevel(logging.WARNING)
    logging.getLogger("urllib3").setLevel(logging.WARNING)


def get_logger(name: str) -> logging.Logger:
    """A logger under the ``gateway`` namespace; modules pass ``__name__``, so each logger
    is named after its module (``gateway.routers.tasks``) and can be filtered by it."""
    return logging.getLogger(name if name.startswith("gateway") else f"gateway.{name}")
