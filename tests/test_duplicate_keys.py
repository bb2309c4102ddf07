r"""The duplicate-key rule: a body that names a key twice in one object is refused, every form.

Plain, with ``\u`` escapes anywhere, nested at any depth, and with the key itself spelled with
escapes (``"tem\u0070erature"`` is ``"temperature"``). The property test writes JSON text by
hand from a tree of key/value pairs (so an object may repeat a key, which no JSON library writes),
choosing for every character a literal, a short or a ``\u`` escape, and random whitespace; the
oracle is the pair lists themselves, not another parser.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from decimal import Decimal
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from clipia_proxy.errors import InvalidRequest
from clipia_proxy.wire import decode_json, has_duplicate_keys, parse_chat_request
from tests.harness import Stack
from tests.http_client import Reply, bearer, raw_http, raw_request

Draw = Callable[[st.SearchStrategy[Any]], Any]
MESSAGES = b'"messages":[{"role":"user","content":"hi"}]'


# ----------------------------------------------------------------- a JSON writer with choices


@dataclass(frozen=True)
class Obj:
    """A JSON object as written: its pairs in order, duplicates allowed."""

    pairs: tuple[tuple[str, object], ...]


@dataclass(frozen=True)
class Arr:
    items: tuple[object, ...]


SHORT = {'"': '\\"', "\\": "\\\\", "/": "\\/", "\b": "\\b", "\f": "\\f", "\n": "\\n", "\r": "\\r"}
SHORT["\t"] = "\\t"


def u_escape(char: str, upper: bool) -> str:
    code = ord(char)
    if code > 0xFFFF:
        code -= 0x10000
        units = [0xD800 + (code >> 10), 0xDC00 + (code & 0x3FF)]
    else:
        units = [code]
    return "".join(f"\\u{u:04X}" if upper else f"\\u{u:04x}" for u in units)


def write_string(text: str, draw: Draw) -> str:
    out = ['"']
    for char in text:
        must_escape = char in '"\\' or ord(char) < 0x20
        how = draw(st.sampled_from(["literal", "short", "u", "U"]))
        if how == "literal" and not must_escape:
            out.append(char)
        elif how == "short" and char in SHORT:
            out.append(SHORT[char])
        else:
            out.append(u_escape(char, upper=how == "U"))
    out.append('"')
    return "".join(out)


def space(draw: Draw) -> str:
    chosen: str = draw(st.sampled_from(["", "", " ", "\n  ", "\t", "\r\n"]))
    return chosen


def write(node: object, draw: Draw) -> str:
    if isinstance(node, Obj):
        pairs = [
            f"{space(draw)}{write_string(k, draw)}{space(draw)}:{space(draw)}{write(v, draw)}"
            for k, v in node.pairs
        ]
        return "{" + ",".join(pairs) + space(draw) + "}"
    if isinstance(node, Arr):
        return "[" + ",".join(space(draw) + write(item, draw) for item in node.items) + "]"
    if isinstance(node, str):
        return write_string(node, draw)
    if node is None:
        return "null"
    if isinstance(node, bool):
        return "true" if node else "false"
    return str(node)


def repeats_a_key(node: object) -> bool:
    if isinstance(node, Obj):
        keys = [k for k, _ in node.pairs]
        return len(set(keys)) < len(keys) or any(repeats_a_key(v) for _, v in node.pairs)
    if isinstance(node, Arr):
        return any(repeats_a_key(item) for item in node.items)
    return False


# Keys from a small alphabet (so repeats are common) that holds the characters that matter:
# a colon, a quote, a backslash, a control character, a non-BMP and a non-ASCII letter.
KEYS = st.text(alphabet='ab:"\\\n\u0439\U0001f600', max_size=3)
SCALARS = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-(2**63), 2**64 - 1),
    st.sampled_from([Decimal("0.70"), Decimal("1E+3"), Decimal("-2.5e-7")]),
    st.text(alphabet=st.characters(codec="utf-8", exclude_categories=["Cs"]), max_size=8),
    KEYS,
)
TREES = st.recursive(
    SCALARS,
    lambda children: st.one_of(
        st.lists(children, max_size=4).map(lambda items: Arr(tuple(items))),
        st.lists(st.tuples(KEYS, children), max_size=4).map(lambda pairs: Obj(tuple(pairs))),
    ),
    max_leaves=20,
)


@settings(max_examples=400, deadline=None)
@given(tree=TREES, data=st.data())
def test_duplicate_keys_found_in_any_spelling_and_depth(tree: object, data: st.DataObject) -> None:
    text = write(tree, data.draw).encode()
    decoded = decode_json(text)
    assert has_duplicate_keys(text, decoded) is repeats_a_key(tree)


@settings(max_examples=200)
@given(tree=TREES, data=st.data())
def test_chat_body_with_any_repeat_is_refused(tree: object, data: st.DataObject) -> None:
    raw = b'{"model":"gpt-5.5",' + MESSAGES + b',"metadata":' + write(tree, data.draw).encode()
    raw += b"}"
    if repeats_a_key(tree):
        with pytest.raises(InvalidRequest):
            parse_chat_request(raw)
    else:
        assert parse_chat_request(raw).requested_model == "gpt-5.5"


BODIES = [
    ("plain", b'{"model":"gpt-5.5","temperature":1,"temperature":0,' + MESSAGES + b"}"),
    (
        "escape_elsewhere",
        b'{"model":"gpt-5.5","temperature":1,"temperature":0,'
        b'"messages":[{"role":"user","content":"\\u043f\\u0440\\u0438\\u0432\\u0435\\u0442"}]}',
    ),
    (
        "escaped_name",
        b'{"model":"gpt-5.5","tem\\u0070erature":1,"temperature":0,' + MESSAGES + b"}",
    ),
    (
        "nested",
        b'{"model":"gpt-5.5","messages":[{"role":"user","content":"hi","role":"system"}]}',
    ),
    (
        "deep",
        b'{"model":"gpt-5.5",' + MESSAGES + b',"metadata":{"a":[{"b":{"c":1,"c":2}}]}}',
    ),
    ("colon_in_key", b'{"model":"gpt-5.5","a:b":1,"a\\u003ab":2,' + MESSAGES + b"}"),
    (
        "escaped_backslash_then_escaped_colon",
        b'{"model":"gpt-5.5","\\\\:":1,"\\\\\\u003a":2,' + MESSAGES + b"}",
    ),
]

NOT_DUPLICATES = [
    ("same_key_two_objects", b'{"model":"gpt-5.5",' + MESSAGES + b',"a":{"k":1},"b":{"k":1}}'),
    (
        "colons_in_strings",
        b'{"model":"gpt-5.5",' + MESSAGES + b',"user":"a:\\u003a\\\\u003a:","k\\u003a":"::"}',
    ),
    ("similar_names", b'{"model":"gpt-5.5",' + MESSAGES + b',"tem\\u0070":1,"tem\\\\u0070":2}'),
]


@pytest.mark.parametrize("raw", [b for _, b in BODIES], ids=[n for n, _ in BODIES])
def test_parse_refuses_duplicates(raw: bytes) -> None:
    with pytest.raises(InvalidRequest, match="twice"):
        parse_chat_request(raw)


@pytest.mark.parametrize("raw", [b for _, b in NOT_DUPLICATES], ids=[n for n, _ in NOT_DUPLICATES])
def test_parse_accepts_lookalikes(raw: bytes) -> None:
    assert parse_chat_request(raw).requested_model == "gpt-5.5"


# ----------------------------------------------------------------- through the HTTP entry point


async def raw_post(stack: Stack, body: bytes) -> Reply:
    """One raw HTTP/1.1 POST of ``body`` to the chat route on a fresh connection."""
    headers = [bearer(stack), ("Content-Type", "application/json")]
    return await raw_http(stack, raw_request("POST", "/v1/chat/completions", headers, body))


@pytest.mark.parametrize("raw", [b for _, b in BODIES], ids=[n for n, _ in BODIES])
async def test_http_duplicate_key_is_400_without_upstream_call(stack: Stack, raw: bytes) -> None:
    before = len(stack.emulator.requests)
    reply = await raw_post(stack, raw)
    assert reply.status == 400, reply.body[:300]
    assert reply.headers["content-type"].startswith("application/json")
    assert reply.headers.get("x-request-id")
    error = reply.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert error["code"] == "invalid_request"
    assert error["type"] == "invalid_request_error"
    assert "twice" in error["message"]
    assert len(stack.emulator.requests) == before
    served = await raw_post(stack, b'{"model":"gpt-5.5",' + MESSAGES + b"}")
    assert served.status == 200
    assert len(stack.emulator.requests) == before + 1
