"""JSON log lines, the redaction filter, and the access line's fields."""

from __future__ import annotations

import contextlib
import io
import logging
from collections.abc import Iterator

import msgspec
import pytest

from clipia_proxy.logs import (
    ACCESS_LOGGER,
    JsonFormatter,
    RedactingFilter,
    apply_logging,
    redact,
    setup_logging,
)

SECRETS = [
    "Bearer cpx_abcdefghijklmnopqrstuvwxyz0123456789ABCDEFG",
    "clipia_live_" + "0123456789abcdef" * 2,  # built: no key-shaped literal in the repo
    "clipia_test_" + "deadbeef" * 2,
    "cpx_abcdefghijklmnopqrstuvwxyz0123456789ABCDEFG",
    "Key cpx_zzzzzzzzzzzzzzzzzzzzzzzzzzzzzzzzzzzzzzzzzzz",
]


@pytest.mark.parametrize("secret", SECRETS)
def test_redact_scrubs_each_pattern(secret: str) -> None:
    text = redact(f"before {secret} after")
    assert "[REDACTED]" in text
    tail = secret.split()[-1]
    for start in range(len(tail) - 7):
        assert tail[start : start + 8] not in text


@pytest.mark.parametrize(
    "text",
    [
        "BEARER abcdefghijklmnop",
        "bEaReR abcdefghijklmnop",
        "KEY abcdefghijklmnop",
        "\u212aey abcdefghijklmnop",  # KELVIN SIGN: the regex's case-insensitive match takes it
        "x clipia_live_abc",
        "cpx_abc",
        "access",
        "CLIPIA_LIVE_abc",  # the key prefixes are case-sensitive: no match
        "",
    ],
)
def test_redact_is_the_regex_whatever_the_case(text: str) -> None:
    # The pre-check that spares most lines the regex never skips a line the regex changes.
    from clipia_proxy.logs import _SECRET_RE

    assert redact(text) == _SECRET_RE.sub("[REDACTED]", text)


def _logger_to(stream: io.StringIO) -> logging.Logger:
    logger = logging.getLogger(f"test.{id(stream)}")
    logger.propagate = False
    handler = logging.StreamHandler(stream)
    handler.setFormatter(JsonFormatter())
    handler.addFilter(RedactingFilter())
    logger.addHandler(handler)
    logger.setLevel(logging.DEBUG)
    return logger


def test_args_and_exceptions_are_redacted_and_lines_are_json() -> None:
    stream = io.StringIO()
    logger = _logger_to(stream)
    key = "clipia_live_" + "0123456789abcdef" * 2
    logger.warning("key is %s\nforged line", key, extra={"fields": {"event": "x"}})
    try:
        raise ValueError(f"boom with {key}")
    except ValueError:
        logger.exception("failed")
    lines = stream.getvalue().splitlines()
    assert len(lines) == 2  # the newline in the message did not forge a line
    first, second = (msgspec.json.decode(line) for line in lines)
    assert first["msg"] == "key is [REDACTED]\nforged line"
    assert first["event"] == "x"
    assert first["level"] == "warning"
    assert "ValueError" in second["exc"]
    assert key[:20] not in stream.getvalue()


@contextlib.contextmanager
def restored_logging() -> Iterator[logging.Logger]:
    """Yield the root logger; put its handlers, its level and the access log back after."""
    root = logging.getLogger()
    saved = (list(root.handlers), root.level, ACCESS_LOGGER.disabled)
    try:
        yield root
    finally:
        for existing in list(root.handlers):
            root.removeHandler(existing)
        for existing in saved[0]:
            root.addHandler(existing)
        root.setLevel(saved[1])
        ACCESS_LOGGER.disabled = saved[2]


def test_setup_logging_installs_one_redacting_json_handler() -> None:
    stream = io.StringIO()
    with restored_logging() as root:
        handler = setup_logging("DEBUG", stream=stream)
        logging.getLogger("clipia_proxy.test").info("Bearer %s", "cpx_secretsecretsecret")
        assert root.handlers == [handler]
        line = msgspec.json.decode(stream.getvalue().splitlines()[-1])
        assert line["msg"] == "[REDACTED]"


def test_apply_logging_switches_format_level_and_access_log_in_place() -> None:
    stream = io.StringIO()
    with restored_logging() as root:
        handler = setup_logging("INFO", stream=stream, fmt="json", access_log=True)
        apply_logging(handler, "warning", fmt="text", access_log=False)
        assert root.handlers == [handler]  # the same handler (and its redaction), re-formatted
        assert (root.level, ACCESS_LOGGER.disabled) == (logging.WARNING, True)
        logging.getLogger("clipia_proxy.test").info("hidden")
        logging.getLogger("clipia_proxy.test").warning("Bearer %s", "cpx_secretsecretsecret")
        assert stream.getvalue().count("\n") == 1
        assert not stream.getvalue().startswith("{")
        assert "[REDACTED]" in stream.getvalue()
        apply_logging(handler, "INFO", fmt="json", access_log=True)
        assert (root.level, ACCESS_LOGGER.disabled) == (logging.INFO, False)
        logging.getLogger("clipia_proxy.test").info("shown")
        assert msgspec.json.decode(stream.getvalue().splitlines()[-1])["msg"] == "shown"
