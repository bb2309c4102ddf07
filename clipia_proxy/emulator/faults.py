"""Scripted misbehaviour of the emulated Clipia, and Clipia's error envelope.

A :class:`Fault` describes how *one* chat request goes wrong; the state keeps a FIFO of them
(see ``EmulatorState.push_fault``). All fields default to "no fault", so ``Fault()`` is a
normal answer and a JSON object with only the fields a test needs decodes into a full Fault.
This module is pure: it decides shapes and bytes, ``app.py`` does the I/O.
"""

from __future__ import annotations

from typing import Final, Literal

import msgspec

from clipia_proxy.wire import encode_json

__all__ = ["ERROR_CODES", "Fault", "error_body", "error_code"]


class Fault(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """How one ``POST /v1/chat/completions`` request misbehaves; defaults mean "no fault".

    Faults apply in this order: ``first_byte_delay``, ``redirect_to``, ``status``, then (for a
    request that passes auth, validation and limits) the stream faults. A fault with a
    ``status`` or ``redirect_to`` answers before auth and is never billed.
    """

    status: int | None = None
    """Answer with this HTTP status and Clipia's envelope for it (see :data:`ERROR_CODES`)."""
    retry_after: str | None = None
    """``Retry-After`` header value sent with ``status`` (seconds or an HTTP date)."""
    body_quotes_key: bool = False
    """The error message echoes the received key and ``Authorization`` header (status 500 if unset)."""
    non_json_body: bool = False
    """The error body is an HTML page, not JSON (status 502 if ``status`` is unset)."""
    redirect_to: str | None = None
    """Answer ``307 Temporary Redirect`` with this ``Location``."""
    first_byte_delay: float = 0.0
    """Seconds to wait before sending the response headers."""
    chunk_gap: float = 0.0
    """Seconds to wait between stream events (between writes)."""
    reset_after_chunks: int | None = None
    """Abort the TCP connection after this many stream events: no ``[DONE]``, no chunked end."""
    stall_after_chunks: int | None = None
    """Stop sending after this many events, keep the socket open ``stall_seconds``, then abort."""
    stall_seconds: float = 3600.0
    """How long a stall lasts (ends early when the client leaves)."""
    close_before_usage: bool = False
    """Abort the connection right after the ``finish_reason`` chunk: no usage, no ``[DONE]``."""
    no_usage: bool = False
    """Never send usage: no usage chunk even if asked (``[DONE]`` still sent); no ``usage`` in a
    non-stream body either."""
    usage_without_cost: bool = False
    """``usage`` lacks ``cost`` (stream and non-stream)."""
    usage_unasked: bool = False
    """Send the usage chunk even without ``stream_options.include_usage``."""
    crlf: bool = False
    """Use ``\\r\\n`` line endings in the stream."""
    tiny_writes: bool = False
    """Write the stream one byte per ``write()``."""
    events_per_write: int = 1
    """Coalesce this many stream events into one ``write()``."""
    comments: bool = False
    """Interleave ``: keep-alive`` comments and ``event:``/``id:`` fields in the stream."""
    generation_lag: int = 0
    """The first N ``/v1/generation`` lookups of this request's id answer 404."""
    completion_tokens: int | None = None
    """Each choice's prose is this many tokens (instead of 8 to 60), still cut by
    ``max_tokens``/``max_completion_tokens`` unless ``ignore_max_tokens``: a long answer."""
    ignore_max_tokens: bool = False
    """Write the whole answer even past ``max_tokens`` (an upstream that does not honour it)."""
    reported_cost: str | None = None
    """``usage.cost`` says this many credits (e.g. ``"1e9"``) instead of the bill, which stays
    true (and is what ``/v1/generation`` answers): an implausible upstream cost."""
    quote_key: Literal["whole", "json_escaped", "partial", "percent"] | None = None
    """Quote the received key in the form named (``json_escaped``: every ``_`` as ``\\u005f``;
    ``partial``: the prefix and the first 10 secret characters; ``percent``: URL-encoded)
    where ``quote_key_in`` says."""
    quote_key_in: Literal["error_body", "retry_after", "answer", "stream"] = "error_body"
    """Where ``quote_key`` goes: an error message (status 500 if unset), a ``Retry-After``
    header of an error (status 429 if unset), a 200 answer's content, or a stream's content."""
    invalid_answer: Literal["not_json", "sse"] | None = None
    """Answer 200 (billed) with a body that is not a chat completion: ``not_json`` (an HTML page
    labelled ``application/json``) or ``sse`` (an event stream, whatever ``stream`` says)."""
    split_key_at: tuple[int, ...] = ()
    """With ``quote_key_in="stream"``: write the stream in parts cut at these byte offsets
    from the start of the quoted key (``chunk_gap`` apart), so the key crosses reads there."""
    times: int = 1
    """How many consecutive chat requests this fault applies to."""


ERROR_CODES: Final[dict[int, tuple[str, str]]] = {
    400: ("invalid_request", "invalid_request_error"),
    401: ("invalid_api_key", "authentication_error"),
    402: ("insufficient_credits", "billing_error"),
    403: ("insufficient_scope", "permission_error"),
    404: ("not_found", "not_found_error"),
    422: ("model_input_invalid", "invalid_request_error"),
    429: ("rate_limit_exceeded", "rate_limit_error"),
    500: ("internal_error", "api_error"),
    503: ("service_unavailable", "api_error"),
}
"""HTTP status → (Clipia ``code``, OpenAI-style ``type``); any other status is ``internal_error``."""

_MESSAGES: Final[dict[str, str]] = {
    "invalid_request": "Invalid request.",
    "invalid_api_key": "Invalid or missing API key.",
    "insufficient_credits": "Insufficient credits.",
    "insufficient_scope": "The API key lacks the required scope.",
    "not_found": "Not found.",
    "model_input_invalid": "The model rejected the input.",
    "rate_limit_exceeded": "Rate limit exceeded. Try again later.",
    "internal_error": "Internal server error.",
    "service_unavailable": "Service temporarily unavailable.",
}


def error_code(status: int) -> tuple[str, str]:
    """Return Clipia's ``(code, type)`` for an HTTP ``status``."""
    return ERROR_CODES.get(status, ERROR_CODES[500])


def error_body(status: int, message: str | None = None) -> bytes:
    """Return Clipia's JSON error envelope for ``status``, with a default message."""
    code, kind = error_code(status)
    return encode_json(
        {
            "error": {
                "message": message if message is not None else _MESSAGES[code],
                "type": kind,
                "param": None,
                "code": code,
            }
        }
    )
