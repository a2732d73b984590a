"""The gateway's own log lines (not the access log): one JSON object per line, in every worker.

uvicorn configures logging again in each worker it spawns, from the ``log_config`` it is given, so the
same dictionary serves the parent and every worker: without it a worker has no handler, loses INFO
lines and prints bare messages. The request id comes from a context variable the Exchange sets; tasks
started for a request inherit it, so attempt and relay log lines carry it too.
"""

from __future__ import annotations

import logging
import time
from contextvars import ContextVar
from typing import Any

import orjson

REQUEST_ID: ContextVar[str | None] = ContextVar("llmgw_request_id", default=None)

# LogRecord attributes that are not caller-supplied `extra` fields.
_STANDARD = frozenset(vars(logging.LogRecord("", 0, "", 0, "", (), None))) | {
    "message",
    "asctime",
    "color_message",
}


class JsonFormatter(logging.Formatter):
    """``{"timestamp","level","logger","message","pid"[,"request_id"][,"exception"][, extra...]}``."""

    def format(self, record: logging.LogRecord) -> str:
        t = record.created
        out: dict[str, Any] = {
            "timestamp": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(t)) + f".{int(t % 1 * 1000):03d}Z",
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
            "pid": record.process,
        }
        rid = REQUEST_ID.get()
        if rid is not None:
            out["request_id"] = rid
        if record.exc_info:
            out["exception"] = self.formatException(record.exc_info)
        for k, v in record.__dict__.items():
            if k not in _STANDARD and k not in out:
                out[k] = v
        return orjson.dumps(out, default=str).decode()


# uvicorn's warning for bytes its parser refused: the gateway answers each such request itself and logs it
# in the access log (flag DPE) and in llmgw_input_limits_total, so a flood of garbage is not also a flood
# of error-log lines.
_ANSWERED_ELSEWHERE = frozenset({"Invalid HTTP request received."})


class AnsweredElsewhere(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return record.msg not in _ANSWERED_ELSEWHERE


def log_config(level: str) -> dict[str, Any]:
    """A ``logging.config.dictConfig`` for the parent and every worker: JSON lines on stderr at ``level``."""
    lvl = level.upper()
    return {
        "version": 1,
        "disable_existing_loggers": False,
        "formatters": {"json": {"()": f"{__name__}.JsonFormatter"}},
        "filters": {"answered_elsewhere": {"()": f"{__name__}.AnsweredElsewhere"}},
        "handlers": {
            "stderr": {"class": "logging.StreamHandler", "formatter": "json", "stream": "ext://sys.stderr"}
        },
        "root": {"handlers": ["stderr"], "level": lvl},
        "loggers": {
            # uvicorn's own loggers come with handlers of their own unless told otherwise: route them to ours.
            "uvicorn": {"handlers": [], "level": lvl, "propagate": True},
            "uvicorn.error": {
                "handlers": [],
                "level": lvl,
                "propagate": True,
                "filters": ["answered_elsewhere"],
            },
            "uvicorn.access": {
                "handlers": [],
                "level": "WARNING",
                "propagate": True,
            },  # the access log is ours
        },
    }
