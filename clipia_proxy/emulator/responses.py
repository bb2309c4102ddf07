"""The bytes of Clipia's chat answers: the non-stream body and the SSE events of a stream.

Pure: given the generated choices, usage and the request's fault, it returns bytes; writing
them (in how many writes, with what gaps, and where to break the connection) is ``app.py``'s
job. Chunks follow OpenAI's ``chat.completion.chunk`` shape; with ``include_usage`` every
non-usage chunk carries ``"usage": null`` and a last chunk with ``"choices": []`` carries usage.
"""

from __future__ import annotations

from dataclasses import dataclass
from decimal import Decimal

from clipia_proxy.emulator.faults import Fault
from clipia_proxy.emulator.text import GeneratedChoice
from clipia_proxy.wire import encode_json

__all__ = ["StreamPlan", "completion_body", "stream_plan", "usage_object"]


def usage_object(
    prompt_tokens: int, completion_tokens: int, cost: Decimal, *, with_cost: bool = True
) -> dict[str, object]:
    """Return a ``usage`` object; ``cost`` (credits) is omitted when ``with_cost`` is false."""
    usage: dict[str, object] = {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
    }
    if with_cost:
        usage["cost"] = cost
    return usage


def _message(choice: GeneratedChoice) -> dict[str, object]:
    if choice.tool_call is None:
        return {"role": "assistant", "content": choice.content}
    call = choice.tool_call
    return {
        "role": "assistant",
        "content": None,
        "tool_calls": [
            {
                "id": call.id,
                "type": "function",
                "function": {"name": call.name, "arguments": call.arguments},
            }
        ],
    }


def completion_body(
    *,
    generation_id: str,
    created: int,
    model: str,
    choices: list[GeneratedChoice],
    usage: dict[str, object] | None,
) -> bytes:
    """Return the JSON body of a non-stream completion (no ``usage`` key if ``usage`` is None)."""
    body: dict[str, object] = {
        "id": generation_id,
        "object": "chat.completion",
        "created": created,
        "model": model,
        "provider": "Clipia",
        "choices": [
            {"index": c.index, "message": _message(c), "finish_reason": c.finish_reason}
            for c in choices
        ],
    }
    if usage is not None:
        body["usage"] = usage
    return encode_json(body)


@dataclass(frozen=True, slots=True, kw_only=True)
class StreamPlan:
    """The events of one stream, each already framed as SSE bytes, in order."""

    events: tuple[bytes, ...]
    finish_end: int
    """How many events there are up to and including the last ``finish_reason`` chunk."""


def _frame(data: bytes, number: int, fault: Fault) -> bytes:
    newline = b"\r\n" if fault.crlf else b"\n"
    prefix = b""
    if fault.comments:
        if number % 2 == 0:
            prefix += b": keep-alive" + newline + newline
        prefix += b"event: message" + newline + b"id: " + str(number).encode() + newline
    return prefix + b"data: " + data + newline + newline


def _first_delta(choice: GeneratedChoice) -> dict[str, object]:
    if choice.tool_call is None:
        return {"role": "assistant", "content": ""}
    call = choice.tool_call
    return {
        "role": "assistant",
        "content": None,
        "tool_calls": [
            {
                "index": 0,
                "id": call.id,
                "type": "function",
                "function": {"name": call.name, "arguments": ""},
            }
        ],
    }


def _piece_delta(choice: GeneratedChoice, piece: str) -> dict[str, object]:
    if choice.tool_call is None:
        return {"content": piece}
    return {"tool_calls": [{"index": 0, "function": {"arguments": piece}}]}


def stream_plan(
    *,
    generation_id: str,
    created: int,
    model: str,
    choices: list[GeneratedChoice],
    usage: dict[str, object] | None,
    include_usage: bool,
    fault: Fault,
) -> StreamPlan:
    """Return the SSE events of a stream.

    Order: a role chunk per choice, content (or tool-call argument) pieces round-robin over the
    choices, a ``finish_reason`` chunk per choice, the usage chunk (only if ``usage`` is given),
    then ``data: [DONE]``. ``include_usage`` adds ``"usage": null`` to the other chunks.
    """

    def chunk(chunk_choices: list[dict[str, object]], **extra: object) -> bytes:
        body: dict[str, object] = {
            "id": generation_id,
            "object": "chat.completion.chunk",
            "created": created,
            "model": model,
            "choices": chunk_choices,
        }
        if include_usage:
            body["usage"] = None
        body.update(extra)
        return encode_json(body)

    def one(choice: GeneratedChoice, delta: dict[str, object], finish: str | None) -> bytes:
        return chunk([{"index": choice.index, "delta": delta, "finish_reason": finish}])

    payloads: list[bytes] = [one(c, _first_delta(c), None) for c in choices]
    longest = max((len(c.pieces) for c in choices), default=0)
    for position in range(longest):
        payloads.extend(
            one(c, _piece_delta(c, c.pieces[position]), None)
            for c in choices
            if position < len(c.pieces)
        )
    payloads.extend(one(c, {}, c.finish_reason) for c in choices)
    finish_end = len(payloads)
    if usage is not None:
        payloads.append(chunk([], usage=usage))
    payloads.append(b"[DONE]")
    events = tuple(_frame(data, number, fault) for number, data in enumerate(payloads, start=1))
    return StreamPlan(events=events, finish_end=finish_end)
