"""The stream relay's state machine, without sockets: event sequences in, steps and outcome out.

Each row of the table feeds :class:`~clipia_proxy.relay.Relay` a sequence of events (upstream
chunks, the client leaving, the upstream ending, failing or stalling, shutdown) and asserts the
steps it returned, the bytes it gave the client, the outcome, and how the client's stream ends
(the filter's held bytes, an SSE error event with its code, or nothing once the client left).
The HTTP behaviour of the same cases is in test_streaming.py and test_hangups.py.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import msgspec
import pytest

from clipia_proxy.quotas.model import Outcome
from clipia_proxy.record import RequestInfo
from clipia_proxy.redact import KeyScanner
from clipia_proxy.relay import Relay, Step, StreamResult
from clipia_proxy.sse import UsageTap

KEY = "clipia_live_" + "k" * 40
NOW = 100.0
DRAIN = 5.0


def _event(payload: dict[str, object]) -> bytes:
    return b"data: " + msgspec.json.encode(payload) + b"\n\n"


def _content(text: str, upstream_id: str | None = "gen-1") -> bytes:
    chunk: dict[str, object] = {
        "object": "chat.completion.chunk",
        "model": "gpt-5.5",
        "choices": [{"index": 0, "delta": {"content": text}}],
    }
    if upstream_id is not None:
        chunk["id"] = upstream_id
    return _event(chunk)


HELLO = _content("Hello")
NO_ID = _content("Hello", upstream_id=None)
WORLD = _content(" world")
USAGE = _event(
    {
        "id": "gen-1",
        "object": "chat.completion.chunk",
        "choices": [],
        "usage": {"prompt_tokens": 5, "completion_tokens": 2, "total_tokens": 7, "cost": 0.01},
    }
)
DONE = b"data: [DONE]\n\n"
SECRET = _content(f"my key is {KEY}")
_AT_SECRET = SECRET.index(b"clipia_live_") + len("clipia_live_")
"""Where the key's secret part begins in ``SECRET``."""
LOOKALIKE = _content("kkkkk, and more")
_AT_PIECE = LOOKALIKE.index(b"kkkkk") + 5
"""A read ending here ends like a piece of the key's secret: the scan holds that end back."""

# Events other than a chunk (bytes).
LEFT = "client_left"
"""A write to the client failed (or the response could not start)."""
STALL = "timed_out"
BROKE = "read_failed"
EOF = "ended"
SHUTDOWN = "shutdown"
"""OpenStreams.cut_all: the flag is set, then the upstream read fails."""


@dataclass
class Case:
    events: Sequence[bytes | str]
    steps: Sequence[Step]
    outcome: Outcome
    relayed: bytes = b""
    """Everything the client was given before the end."""
    ending: str | None = "clean"
    """``clean`` (the filter's held bytes), an SSE error code, or ``None`` (client gone)."""
    options: dict[str, object] = field(default_factory=dict)


CASES: dict[str, Case] = {
    "done": Case(
        [HELLO, WORLD, USAGE, DONE, EOF],
        [Step.READ] * 4 + [Step.END],
        Outcome.COMPLETED,
        relayed=HELLO + WORLD + USAGE + DONE,
    ),
    "the usage event the gateway asked for is dropped": Case(
        [HELLO, USAGE, DONE, EOF],
        [Step.READ] * 3 + [Step.END],
        Outcome.COMPLETED,
        relayed=HELLO + DONE,
        options={"drop_usage_chunk": True},
    ),
    "clean end without [DONE]": Case(
        [HELLO, EOF], [Step.READ, Step.END], Outcome.UPSTREAM_ERROR, HELLO, "upstream_unavailable"
    ),
    "upstream reset": Case(
        [HELLO, BROKE], [Step.READ, Step.END], Outcome.UPSTREAM_ERROR, HELLO, "upstream_unavailable"
    ),
    "upstream stalls": Case(
        [HELLO, STALL], [Step.READ, Step.CLOSE], Outcome.TIMEOUT, HELLO, "upstream_timeout"
    ),
    "shutdown cuts the stream": Case(
        [HELLO, SHUTDOWN, BROKE], [Step.READ, Step.END], Outcome.TIMEOUT, HELLO, "draining"
    ),
    "shutdown, then a clean end": Case(
        [HELLO, SHUTDOWN, EOF], [Step.READ, Step.END], Outcome.TIMEOUT, HELLO, "draining"
    ),
    "client leaves before the upstream id: read on to it, then close": Case(
        [LEFT, NO_ID, HELLO],
        [Step.READ, Step.READ, Step.CLOSE],
        Outcome.CLIENT_DISCONNECT,
        ending=None,
    ),
    "client leaves once the upstream id is known: close at once": Case(
        [HELLO, LEFT], [Step.CLOSE], Outcome.CLIENT_DISCONNECT, HELLO, None
    ),
    "drain: client leaves, the usage is still read": Case(
        [HELLO, LEFT, WORLD, USAGE, DONE, EOF],
        [Step.READ, Step.READ, Step.READ, Step.READ, Step.END],
        Outcome.CLIENT_DISCONNECT,
        HELLO,
        None,
        options={"cancel_on_disconnect": False},
    ),
    "drain deadline passes": Case(
        [HELLO, LEFT, STALL],
        [Step.READ, Step.CLOSE],
        Outcome.CLIENT_DISCONNECT,
        HELLO,
        None,
        options={"cancel_on_disconnect": False},
    ),
    "drain: the upstream breaks after the client left": Case(
        [HELLO, LEFT, BROKE],
        [Step.READ, Step.END],
        Outcome.CLIENT_DISCONNECT,
        HELLO,
        None,
        options={"cancel_on_disconnect": False},
    ),
    "past the reserved output: relayed, then cut": Case(
        [HELLO, WORLD],
        [Step.READ, Step.CLOSE],
        Outcome.UPSTREAM_ERROR,
        HELLO + WORLD,
        "output_limit_exceeded",
        options={"output_limit": 1},
    ),
    "past the reserved output, and the client's write fails": Case(
        [HELLO, WORLD, LEFT],
        [Step.READ, Step.CLOSE],
        Outcome.CLIENT_DISCONNECT,
        HELLO + WORLD,
        None,
        options={"output_limit": 1},
    ),
    "past the reserved output after the client left (drain)": Case(
        [LEFT, HELLO, WORLD],
        [Step.READ, Step.READ, Step.CLOSE],
        Outcome.CLIENT_DISCONNECT,
        ending=None,
        options={"output_limit": 1, "cancel_on_disconnect": False},
    ),
    "within the reserved output": Case(
        [HELLO, DONE, EOF],
        [Step.READ, Step.READ, Step.END],
        Outcome.COMPLETED,
        HELLO + DONE,
        options={"output_limit": 1},
    ),
    "a chunk quoting the gateway's key is withheld and the stream cut": Case(
        [HELLO, SECRET],
        [Step.READ, Step.CLOSE],
        Outcome.UPSTREAM_ERROR,
        HELLO,
        "upstream_invalid_response",
        options={"scan": True},
    ),
    "the key split across two chunks": Case(
        [HELLO, SECRET[:30], SECRET[30:]],
        [Step.READ, Step.READ, Step.CLOSE],
        Outcome.UPSTREAM_ERROR,
        HELLO + SECRET[:30],
        "upstream_invalid_response",
        options={"scan": True},
    ),
    "the key split inside itself: nothing of it is relayed": Case(
        [HELLO, SECRET[: _AT_SECRET + 6], SECRET[_AT_SECRET + 6 :]],
        [Step.READ, Step.READ, Step.CLOSE],
        Outcome.UPSTREAM_ERROR,
        HELLO + SECRET[:_AT_SECRET],
        "upstream_invalid_response",
        options={"scan": True},
    ),
}


def _relay(options: dict[str, object]) -> Relay:
    scan = KeyScanner(KEY).stream() if options.get("scan") else None
    limit = options.get("output_limit")
    return Relay(
        StreamResult(UsageTap()),
        RequestInfo(request_id="r", started=0.0, outcome=Outcome.COMPLETED),
        drop_usage_chunk=bool(options.get("drop_usage_chunk", False)),
        cancel_on_disconnect=bool(options.get("cancel_on_disconnect", True)),
        drain_timeout=DRAIN,
        output_limit=limit if isinstance(limit, int) else None,
        scan=scan,
    )


def _play(relay: Relay, events: Sequence[bytes | str]) -> tuple[list[Step], bytes]:
    """Feed ``events`` as the I/O loop would; return the steps and the bytes relayed."""
    steps: list[Step] = []
    relayed = b""
    for event in events:
        if isinstance(event, bytes):
            out, step = relay.received(event)
            relayed += out
        elif event == SHUTDOWN:
            relay.result.cut_for_shutdown = True
            continue
        elif event == LEFT:
            # The loop learns it from a failed write of the last chunk's bytes (whose step
            # this replaces), or when the response could not even start.
            step = relay.client_left(NOW)
            if steps:
                steps[-1] = step
                continue
        elif event == STALL:
            step = relay.timed_out()
        elif event == BROKE:
            step = relay.read_failed()
        else:
            assert event == EOF
            step = relay.ended()
        steps.append(step)
    return steps, relayed


@pytest.mark.parametrize("case", CASES.values(), ids=CASES.keys())
def test_event_sequence(case: Case) -> None:
    relay = _relay(case.options)
    steps, relayed = _play(relay, case.events)
    assert steps == list(case.steps)
    assert relayed == case.relayed
    ending = relay.finish()
    assert relay.record.outcome is case.outcome
    if case.ending is None:
        assert ending is None
    elif case.ending == "clean":
        assert ending == b""
    else:
        assert ending is not None
        assert ending.startswith(b"\n\n")
        assert b"[DONE]" not in ending
        error = msgspec.json.decode(ending.strip().removeprefix(b"data: "))
        assert error["error"]["code"] == case.ending
        assert error["error"]["type"] == "api_error"


def test_the_tap_sees_every_byte_the_client_did_not() -> None:
    relay = _relay({"drop_usage_chunk": True})
    _play(relay, [HELLO, USAGE, DONE, EOF])
    relay.finish()
    tap = relay.tap
    assert tap.upstream_id == "gen-1"
    assert tap.usage is not None
    assert (tap.usage.prompt_tokens, tap.usage.completion_tokens) == (5, 2)


def test_drain_deadline_starts_when_the_client_leaves() -> None:
    relay = _relay({"cancel_on_disconnect": False})
    assert relay.drain_deadline is None
    assert relay.client_left(NOW) is Step.READ
    assert relay.drain_deadline == NOW + DRAIN


def test_a_cut_stream_drops_the_bytes_the_filter_held() -> None:
    relay = _relay({"drop_usage_chunk": True})
    half = len(WORLD) // 2
    out, _ = relay.received(HELLO + WORLD[:half])
    assert relay.ended() is Step.END
    ending = relay.finish()
    assert out == HELLO
    assert ending is not None
    assert WORLD[:half] not in ending
    assert b"upstream_unavailable" in ending


def test_a_failed_last_write_is_a_client_disconnect() -> None:
    relay = _relay({})
    _play(relay, [HELLO, DONE, EOF])
    assert relay.finish() == b""
    relay.finish_failed()
    assert relay.record.outcome is Outcome.CLIENT_DISCONNECT


def test_an_end_held_back_by_the_key_scan_is_relayed_at_a_clean_end() -> None:
    relay = _relay({"scan": True})
    out, _ = relay.received(LOOKALIKE[:_AT_PIECE])
    out2, _ = relay.received(LOOKALIKE[_AT_PIECE:] + DONE)
    relay.ended()
    ending = relay.finish()
    assert relay.record.outcome is Outcome.COMPLETED
    assert b"kkkkk" not in out
    assert out + out2 + (ending or b"") == LOOKALIKE + DONE


def test_the_held_back_end_of_a_stream_cut_short_is_not_relayed() -> None:
    relay = _relay({"scan": True})
    out, _ = relay.received(LOOKALIKE[:_AT_PIECE])
    relay.ended()
    ending = relay.finish()
    assert ending is not None
    assert b"kkkkk" not in out + ending
