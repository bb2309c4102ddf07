"""Unit tests of clipia_proxy.wire: strict parsing, exact numbers, usage extraction."""

from __future__ import annotations

from decimal import Decimal

import msgspec
import pytest
from hypothesis import given
from hypothesis import strategies as st

from clipia_proxy.errors import InvalidRequest
from clipia_proxy.wire import (
    Usage,
    answer_summary,
    decode_json,
    encode_json,
    parse_chat_request,
    tolerant_answer_summary,
    usage_from_object,
)

MSG = b'"messages":[{"role":"user","content":"hi"}]'


def body(extra: bytes = b"", model: bytes = b'"gpt-5.5"') -> bytes:
    return b'{"model":' + model + b"," + MSG + extra + b"}"


def test_parse_minimal() -> None:
    chat = parse_chat_request(body())
    assert chat.requested_model == "gpt-5.5"
    assert chat.stream is False
    assert chat.client_wants_usage is False
    assert chat.body == {"model": "gpt-5.5", "messages": [{"role": "user", "content": "hi"}]}


@pytest.mark.parametrize(
    ("extra", "stream", "wants_usage"),
    [
        (b',"stream":true', True, False),
        (b',"stream":null', False, False),
        (b',"stream":false,"stream_options":{"include_usage":true}', False, False),
        (b',"stream":true,"stream_options":{"include_usage":true}', True, True),
        (b',"stream":true,"stream_options":{"include_usage":false}', True, False),
        (b',"stream":true,"stream_options":null', True, False),
        (b',"stream":true,"stream_options":{"include_usage":"true"}', True, False),
    ],
)
def test_stream_flags(extra: bytes, stream: bool, wants_usage: bool) -> None:
    chat = parse_chat_request(body(extra))
    assert chat.stream is stream
    assert chat.client_wants_usage is wants_usage


BAD: list[tuple[str, bytes, str | None]] = [
    ("not_json", b"{", None),
    ("empty", b"", None),
    ("array", b"[]", None),
    ("nan", body(b',"temperature":NaN'), None),
    ("inf", body(b',"temperature":Infinity'), None),
    ("big_exp", body(b',"temperature":1e401'), None),
    ("small_exp", body(b',"temperature":1e-401'), None),
    ("bom", b"\xef\xbb\xbf" + body(), None),
    ("bad_utf8", body(b',"user":"\xff"'), None),
    ("lone_surrogate", body(b',"user":"\\ud800"'), None),
    ("deep", body(b',"x":' + b"[" * 5000 + b"]" * 5000), None),
    ("trailing", body() + b"{}", None),
    ("dup_model", b'{"model":"a","model":"gpt-5.5",' + MSG + b"}", None),
    ("dup_model_escaped", b'{"mod\\u0065l":"a","model":"gpt-5.5",' + MSG + b"}", None),
    ("dup_messages_escaped", b'{"model":"gpt-5.5","m\\u0065ssages":[],' + MSG + b"}", None),
    ("model_missing", b"{" + MSG + b"}", "model"),
    ("model_int", body(model=b"1"), "model"),
    ("model_empty", body(model=b'""'), "model"),
    ("model_null", body(model=b"null"), "model"),
    ("extra_body", body(b',"extra_body":{}'), "extra_body"),
    ("models", body(b',"models":["x"]'), "models"),
    ("api_base", body(b',"api_base":"http://x"'), "api_base"),
    ("base_url", body(b',"base_url":"http://x"'), "base_url"),
    ("api_key", body(b',"api_key":"x"'), "api_key"),
    ("messages_empty", b'{"model":"gpt-5.5","messages":[]}', "messages"),
    ("messages_obj", b'{"model":"gpt-5.5","messages":{}}', "messages"),
    ("messages_str_items", b'{"model":"gpt-5.5","messages":["hi"]}', "messages"),
    ("stream_str", body(b',"stream":"true"'), "stream"),
    ("stream_opts_str", body(b',"stream_options":"x"'), "stream_options"),
    ("max_tokens_zero", body(b',"max_tokens":0'), "max_tokens"),
    ("max_tokens_neg", body(b',"max_tokens":-3'), "max_tokens"),
    ("max_tokens_float", body(b',"max_tokens":1.0'), "max_tokens"),
    ("max_tokens_exp", body(b',"max_tokens":1e3'), "max_tokens"),
    ("max_tokens_bool", body(b',"max_tokens":true'), "max_tokens"),
    ("max_tokens_str", body(b',"max_tokens":"5"'), "max_tokens"),
    ("max_tokens_huge", body(b',"max_tokens":2147483649'), "max_tokens"),
    ("mct_zero", body(b',"max_completion_tokens":0'), "max_completion_tokens"),
    ("n_zero", body(b',"n":0'), "n"),
    ("n_float", body(b',"n":2.5'), "n"),
]


@pytest.mark.parametrize(("raw", "param"), [(r, p) for _, r, p in BAD], ids=[n for n, _, _ in BAD])
def test_parse_refuses(raw: bytes, param: str | None) -> None:
    with pytest.raises(InvalidRequest) as caught:
        parse_chat_request(raw)
    assert caught.value.status == 400
    if param is not None:
        assert caught.value.param == param
    assert len(caught.value.message) < 300


def test_parse_accepts_nul_and_unicode_content() -> None:
    chat = parse_chat_request(
        b'{"model":"gpt-5.5","messages":[{"role":"user","content":"a\\u0000\\u00e9\\ud83d\\ude00"}]}'
    )
    messages = chat.body["messages"]
    assert isinstance(messages, list)
    assert messages[0]["content"] == "a\x00\u00e9\U0001f600"


def test_parse_accepts_moderate_nesting_and_max_int() -> None:
    chat = parse_chat_request(
        body(b',"x":' + b"[" * 100 + b"]" * 100 + b',"max_tokens":2147483648')
    )
    assert chat.body["max_tokens"] == 2**31


def test_decode_keeps_decimal_text_and_big_ints() -> None:
    value = decode_json(b'{"t":0.70,"c":1e-3,"s":9223372036854775807,"b":18446744073709551615}')
    assert value == {"t": Decimal("0.70"), "c": Decimal("0.001"), "s": 2**63 - 1, "b": 2**64 - 1}
    assert (
        encode_json(value)
        == b'{"t":0.70,"c":0.001,"s":9223372036854775807,"b":18446744073709551615}'
    )


@pytest.mark.parametrize(
    "raw",
    [
        b"NaN",
        b"Infinity",
        b"1e999999",
        b"9" * 10_000,
        b'"\\ud800"',
        b"\xef\xbb\xbf{}",
        b"{} {}",
        b"[" * 100_000 + b"]" * 100_000,
        b"{'a':1}",
        b"[1,]",
        b"// c\n1",
    ],
)
def test_decode_json_refuses_with_value_or_decode_error(raw: bytes) -> None:
    with pytest.raises((msgspec.DecodeError, ValueError)):
        decode_json(raw)


def test_decode_json_deep_nesting_is_value_error_not_recursion_error() -> None:
    """Regression: msgspec raises RecursionError for deep nesting; callers catch ValueError."""
    with pytest.raises(ValueError, match="nested too deeply"):
        decode_json(b"[" * 100_000 + b"]" * 100_000)


def test_usage_from_object_full() -> None:
    usage = usage_from_object(
        decode_json(
            b'{"usage":{"prompt_tokens":8,"completion_tokens":59,"total_tokens":67,"cost":0.048267}}'
        )
    )
    assert usage == Usage(
        prompt_tokens=8, completion_tokens=59, total_tokens=67, cost=Decimal("0.048267")
    )


@pytest.mark.parametrize(
    "obj",
    [None, [], "usage", {}, {"usage": None}, {"usage": []}, {"usage": "x"}, {"choices": []}],
)
def test_usage_from_object_absent(obj: object) -> None:
    assert usage_from_object(obj) is None


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        (
            {"prompt_tokens": -1, "completion_tokens": True, "total_tokens": 1.5, "cost": -1},
            Usage(),
        ),
        ({"prompt_tokens": "8", "cost": "0.5"}, Usage(cost=Decimal("0.5"))),
        ({"cost": "NaN"}, Usage()),
        ({"cost": "Infinity"}, Usage()),
        ({"cost": "abc"}, Usage()),
        ({"cost": True}, Usage()),
        ({"cost": 3}, Usage(cost=Decimal(3))),
        ({"cost": 0}, Usage(cost=Decimal(0))),
        ({"cost": Decimal("0.000001")}, Usage(cost=Decimal("0.000001"))),
        ({"cost": Decimal("-0.1")}, Usage()),
        ({"cost": None, "prompt_tokens": 0}, Usage(prompt_tokens=0)),
    ],
)
def test_usage_from_object_tolerates_mistyped_fields(
    raw: dict[str, object], expected: Usage
) -> None:
    assert usage_from_object({"usage": raw}) == expected


def test_reserialisation_is_exact_for_client_numbers() -> None:
    raw = body(b',"temperature":0.70,"seed":9223372036854775807,"logit_bias":{"50256":-100}')
    chat = parse_chat_request(raw)
    out = encode_json(chat.body)
    assert b"0.70" in out
    assert b"9223372036854775807" in out
    assert decode_json(out) == decode_json(raw)


_ODD_VALUES = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(min_value=-5, max_value=10**12),
    st.sampled_from(["12", "0.5", "-1", "abc", "NaN", "1e5", "", "0.000123"]),
    st.sampled_from([0.0, 0.00123, -0.5, 1.5e-7, 12.25]),
    st.lists(st.integers(), max_size=2),
    st.dictionaries(st.sampled_from(["a", "cost"]), st.integers(), max_size=2),
)


@given(
    upstream_id=_ODD_VALUES | st.text(max_size=8),
    usage=st.none()
    | _ODD_VALUES
    | st.dictionaries(
        st.sampled_from(["prompt_tokens", "completion_tokens", "total_tokens", "cost", "x"]),
        _ODD_VALUES,
    ),
    with_usage=st.booleans(),
    extra=st.dictionaries(st.sampled_from(["choices", "model", "object"]), _ODD_VALUES),
)
def test_answer_summary_equals_the_tolerant_path(
    upstream_id: object, usage: object, with_usage: bool, extra: dict[str, object]
) -> None:
    body: dict[str, object] = {**extra, "id": upstream_id}
    if with_usage:
        body["usage"] = usage
    data = msgspec.json.encode(body)
    assert answer_summary(data) == tolerant_answer_summary(data)


@pytest.mark.parametrize(
    "data",
    [
        b"[]",
        b"not json",
        b'{"id": "x", "usage": {"cost": 1e999}}',
        b'{"id": "x", "usage": {"cost": 5e-401}}',
        b'{"id": "x", "usage": {"cost": -0.0}}',
        b'{"id": "x"',
        b'{"id": "x", "usage": {"prompt_tokens": 3, "cost": "0.25"}}',
        b'{"id": "chatcmpl-1", "usage": null}',
    ],
)
def test_answer_summary_edge_bodies(data: bytes) -> None:
    assert answer_summary(data) == tolerant_answer_summary(data)
