"""JSON logging: one object per line, a redaction filter on every handler, the access line.

Logs never carry a prompt, a completion, a header value or a secret. The redaction filter is
the second line of defence: whatever reaches a handler has ``Bearer …``, Clipia keys
(``clipia_live_…``, ``clipia_test_…``) and team keys (``cpx_…``) scrubbed from its message,
arguments and exception text.
"""

from __future__ import annotations

import logging
import re
import sys
import time
from typing import Any, Final

import msgspec

from .record import RequestInfo
from .wire import Usage

__all__ = [
    "JsonFormatter",
    "RedactingFilter",
    "TextFormatter",
    "access_fields",
    "apply_logging",
    "log_access",
    "redact",
    "setup_logging",
]

_SECRET_RE: Final = re.compile(
    r"(?i:\bbearer|\bkey)\s+[A-Za-z0-9._~+/=-]{12,}"
    r"|clipia_(?:live|test)_[A-Za-z0-9_-]*|cpx_[A-Za-z0-9_-]*"
)
_ENCODER: Final = msgspec.json.Encoder()
ACCESS_LOGGER: Final = logging.getLogger("clipia_proxy.access")
_NO_USAGE: Final = Usage()
# Times are rounded to the microsecond as ``round(x * 1e6) / 1e6``, not ``round(x, 6)``:
# rounding a float to decimal places goes through its decimal digits (~10k machine
# instructions for a Unix time, a tenth of the access line); an integer round, a few hundred.


def redact(text: str) -> str:
    """Return ``text`` with every secret-looking token replaced by ``[REDACTED]``."""
    # Every match holds one of these words, once lowered (as the regex's case-insensitive part
    # compares them): four substring searches in C spare most lines (an access line's
    # "access") the regex, which steps through every character (~5k machine instructions).
    lowered = text.lower()
    if "bearer" in lowered or "key" in lowered or "clipia_" in lowered or "cpx_" in lowered:
        return _SECRET_RE.sub("[REDACTED]", text)
    return text


class RedactingFilter(logging.Filter):
    """Scrub secrets from a record's message, arguments and exception before it is written."""

    def filter(self, record: logging.LogRecord) -> bool:
        """Rewrite the record in place; never drops it."""
        try:
            message = record.getMessage()
        except (TypeError, ValueError):
            message = str(record.msg)
        record.msg = redact(message)
        record.args = None
        if record.exc_info and record.exc_info[1] is not None:
            formatter = logging.Formatter()
            record.exc_text = redact(formatter.formatException(record.exc_info))
            record.exc_info = None
        return True


class JsonFormatter(logging.Formatter):
    """Format a record as one JSON object: time, level, logger, message, extra fields."""

    def format(self, record: logging.LogRecord) -> str:
        """Return the JSON line (escaped: no message can forge a second line)."""
        payload: dict[str, Any] = {
            "ts": round(record.created * 1e6) / 1e6,  # to the microsecond (see above)
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": record.getMessage(),
        }
        fields = getattr(record, "fields", None)
        if isinstance(fields, dict):
            payload.update(fields)
        if record.exc_text:
            payload["exc"] = record.exc_text
        elif record.exc_info:
            payload["exc"] = redact(self.formatException(record.exc_info))
        return _ENCODER.encode(payload).decode()


class TextFormatter(logging.Formatter):
    """A human-readable line: time, level, logger, message, then the extra fields as JSON."""

    def __init__(self) -> None:
        super().__init__("%(asctime)s %(levelname)s %(name)s: %(message)s")

    def format(self, record: logging.LogRecord) -> str:
        """Return the line (fields appended as one JSON object; newlines escaped)."""
        line = super().format(record).replace("\n", "\\n")
        fields = getattr(record, "fields", None)
        if isinstance(fields, dict):
            line += " " + _ENCODER.encode(fields).decode()
        return line


def setup_logging(
    level: str = "INFO", *, stream: Any = None, fmt: str = "json", access_log: bool = True
) -> logging.Handler:
    """Send every log record to ``stream`` (stderr), redacted, one line each; return the handler."""
    # No line shows a thread, process or multiprocessing name: the documented switches that
    # spare every record those look-ups (the logging HOWTO's "Optimization").
    logging.logThreads = False
    logging.logProcesses = False
    logging.logMultiprocessing = False
    handler = logging.StreamHandler(stream or sys.stderr)
    handler.addFilter(RedactingFilter())
    root = logging.getLogger()
    for existing in list(root.handlers):
        root.removeHandler(existing)
    root.addHandler(handler)
    logging.getLogger("aiohttp.access").setLevel(logging.WARNING)
    apply_logging(handler, level, fmt=fmt, access_log=access_log)
    return handler


def apply_logging(handler: logging.Handler, level: str, *, fmt: str, access_log: bool) -> None:
    """Set the level, the line format and the access log of what ``setup_logging`` installed.

    Used at start-up and by a config reload (``logging.*`` applies at once).
    """
    formatter = JsonFormatter() if fmt == "json" else TextFormatter()
    if type(handler.formatter) is not type(formatter):
        handler.setFormatter(formatter)
    logging.getLogger().setLevel(level.upper())
    ACCESS_LOGGER.disabled = not access_log


def access_fields(info: RequestInfo, *, route: str, method: str) -> dict[str, Any]:
    """Return the access line's fields (docs/architecture.md §5.7) from a ``RequestInfo``."""
    usage = info.usage or _NO_USAGE
    return {
        "event": "access",
        "request_id": info.request_id,
        "client_request_id": info.client_request_id,
        "method": method,
        "route": route,
        "team": info.team,
        "key_id": info.key_id,
        "model": info.model,
        "status": info.status,
        "stream": info.stream,
        "upstream_id": info.upstream_id,
        "prompt_tokens": usage.prompt_tokens,
        "completion_tokens": usage.completion_tokens,
        "cost": str(usage.cost) if usage.cost is not None else None,
        # StrEnum members: the formatters' JSON writes their values.
        "usage_source": info.usage_source,
        "outcome": info.outcome,
        # Milliseconds to the microsecond (see the note on times above).
        "duration_ms": round((time.perf_counter() - info.started) * 1e6) / 1e3,
        "ttft_ms": round(info.ttft * 1e6) / 1e3 if info.ttft is not None else None,
    }


def log_access(info: RequestInfo, *, route: str, method: str) -> None:
    """Write the access line of a finished request (when ``logging.access_log`` is on).

    The same record ``ACCESS_LOGGER.info("access", extra=...)`` would make, through the same
    filters and handlers, built with ``Logger.makeRecord`` and passed to ``Logger.handle``:
    that skips the caller lookup (a walk up the stack for a file and line no access line
    shows), about a fifth of the line's cost. The record names no source file (``""``: no path
    to split) and gets its ``fields`` attribute set directly, not through ``extra`` (whose
    clash checks cost more than the attribute): ~5k instructions less.
    """
    if not ACCESS_LOGGER.isEnabledFor(logging.INFO):
        return
    fields = access_fields(info, route=route, method=method)
    record = ACCESS_LOGGER.makeRecord(ACCESS_LOGGER.name, logging.INFO, "", 0, "access", (), None)
    record.fields = fields
    ACCESS_LOGGER.handle(record)
