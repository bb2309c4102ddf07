"""The worst-case estimate of a chat request, and exact money (pure)."""

from __future__ import annotations

import random
from decimal import Decimal
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from clipia_proxy.quotas.estimate import Estimate, PriceUnknown, estimate
from clipia_proxy.quotas.model import MICRO_PER_CREDIT, credits, to_micro
from clipia_proxy.wire import encode_json

PROMPT = Decimal("0.000002")  # ₽ per prompt token
COMPLETION = Decimal("0.00001")  # ₽ per completion token


def run(
    body: dict[str, Any],
    *,
    raw: bytes | None = None,
    prompt_price: Decimal | None = PROMPT,
    completion_price: Decimal | None = COMPLETION,
    context_length: int | None = None,
    team_max_tokens: int | None = None,
    default_output_tokens: int = 4096,
    image_reserve_tokens: int = 2000,
    rubles_per_credit: Decimal = Decimal(3),
    ceiling: Decimal | None = None,
) -> Estimate:
    return estimate(
        raw_body=encode_json(body) if raw is None else raw,
        body=body,
        prompt_price=prompt_price,
        completion_price=completion_price,
        context_length=context_length,
        team_max_tokens=team_max_tokens,
        default_output_tokens=default_output_tokens,
        image_reserve_tokens=image_reserve_tokens,
        rubles_per_credit=rubles_per_credit,
        ceiling=ceiling,
    )


def test_exact_amount() -> None:
    raw = b"x" * 100
    got = run({"max_tokens": 500, "n": 2}, raw=raw)
    assert (got.prompt_tokens, got.output_tokens, got.n) == (100, 500, 2)
    assert got.tokens == 100 + 2 * 500
    # 100 x 0.000002 + 2 x 500 x 0.00001 = 0.0102 ₽ = 0.0034 credits
    assert got.amount == 3_400


def test_amount_rounds_up_to_the_micro_credit() -> None:
    raw = b"x" * 10
    got = run(
        {"max_tokens": 1},
        raw=raw,
        prompt_price=Decimal("0.0000001"),
        completion_price=Decimal("0.0000001"),
    )
    # (10 + 1) x 0.0000001 ₽ / 3 = 0.000000366… credits = 0.366… micro → 1
    assert got.amount == 1
    exact = (Decimal(11) * Decimal("0.0000001") / 3) * MICRO_PER_CREDIT
    assert got.amount - 1 < exact <= got.amount


def test_amount_with_awkward_rubles_per_credit() -> None:
    raw = b"y" * 7
    got = run({"max_tokens": 13}, raw=raw, rubles_per_credit=Decimal("7.3"))
    rubles = 7 * PROMPT + 13 * COMPLETION
    exact = rubles / Decimal("7.3") * MICRO_PER_CREDIT
    assert got.amount == int(exact) + 1
    assert Decimal(got.amount) - 1 < exact < got.amount


@pytest.mark.parametrize(
    ("body", "team", "default", "expected"),
    [
        ({"max_tokens": 300}, 1000, 4096, 300),
        ({"max_completion_tokens": 200, "max_tokens": 300}, 1000, 4096, 200),
        ({}, 1000, 4096, 1000),
        ({}, None, 4096, 4096),
        ({"max_tokens": 0}, None, 4096, 4096),
        ({"max_tokens": -5}, 700, 4096, 700),
        ({"max_tokens": True}, 700, 4096, 700),
        ({"max_tokens": 12.5}, None, 64, 64),
        ({"max_tokens": "100"}, None, 64, 64),
        ({"max_completion_tokens": None, "max_tokens": 50}, None, 64, 50),
    ],
)
def test_output_cap(body: dict[str, Any], team: int | None, default: int, expected: int) -> None:
    got = run(body, team_max_tokens=team, default_output_tokens=default)
    assert got.output_tokens == expected


def test_request_max_tokens_above_the_team_cap_is_reserved_in_full() -> None:
    # Caps are enforced (or clamped) before the estimate; the estimate never under-reserves.
    assert run({"max_tokens": 5000}, team_max_tokens=1000).output_tokens == 5000


@pytest.mark.parametrize(
    ("body", "context", "expected"),
    [
        ({"max_tokens": 10_000}, 8192, 8192),
        ({"max_tokens": 100}, 8192, 100),
        ({}, 1024, 1024),
        ({}, None, 4096),
        ({}, 0, 4096),
    ],
)
def test_context_length_bounds_the_output(
    body: dict[str, Any], context: int | None, expected: int
) -> None:
    assert run(body, context_length=context).output_tokens == expected


@pytest.mark.parametrize(("n", "expected"), [(None, 1), (1, 1), (3, 3), (0, 1), (-2, 1), (True, 1)])
def test_n_multiplies_the_output(n: object, expected: int) -> None:
    body: dict[str, Any] = {"max_tokens": 100}
    if n is not None:
        body["n"] = n
    raw = b"z" * 10
    got = run(body, raw=raw)
    assert got.n == expected
    assert got.tokens == 10 + expected * 100
    assert got.amount == to_micro((10 * PROMPT + expected * 100 * COMPLETION) / 3)


def test_prompt_bound_is_the_body_size() -> None:
    body = {"model": "gpt-5.5", "messages": [{"role": "user", "content": "Привет, мир"}]}
    raw = encode_json(body)
    got = run(body, raw=raw)
    assert got.prompt_tokens == len(raw)
    assert len(raw) > len(raw.decode())  # bytes, not characters


def test_image_parts_add_the_image_reserve() -> None:
    text_only = {"messages": [{"role": "user", "content": [{"type": "text", "text": "hi"}]}]}
    base = run(text_only, image_reserve_tokens=0).prompt_tokens
    one = {
        "messages": [
            {
                "role": "user",
                "content": [
                    {"type": "text", "text": "hi"},
                    {"type": "image_url", "image_url": {"url": "https://x/a.png"}},
                ],
            }
        ]
    }
    raw = encode_json(one)
    without = run(one, raw=raw, image_reserve_tokens=0).prompt_tokens
    with_reserve = run(one, raw=raw, image_reserve_tokens=2000).prompt_tokens
    assert without == len(raw) > base
    # Exactly one reserve per image part (the body is the gateway's compact re-serialisation).
    assert with_reserve - without == 2000
    two = {"messages": [{"role": "user", "content": [one["messages"][0]["content"][1]] * 2}]}
    raw_two = encode_json(two)
    assert (
        run(two, raw=raw_two, image_reserve_tokens=2000).prompt_tokens
        - run(two, raw=raw_two, image_reserve_tokens=0).prompt_tokens
        == 4000
    )


def test_text_mentioning_image_url_adds_nothing() -> None:
    body = {"messages": [{"role": "user", "content": 'say "image_url" twice: "image_url"'}]}
    raw = encode_json(body)
    assert run(body, raw=raw).prompt_tokens == len(raw)


@pytest.mark.parametrize(
    ("prompt", "completion"), [(None, COMPLETION), (PROMPT, None), (None, None)]
)
def test_unknown_price_without_ceiling_fails_closed(
    prompt: Decimal | None, completion: Decimal | None
) -> None:
    with pytest.raises(PriceUnknown):
        run({"max_tokens": 10}, prompt_price=prompt, completion_price=completion)


def test_unknown_price_with_ceiling_reserves_the_ceiling() -> None:
    got = run({"max_tokens": 10}, prompt_price=None, ceiling=Decimal("0.5000001"))
    assert got.amount == 500_001
    assert got.output_tokens == 10


def test_ceiling_is_ignored_when_the_price_is_known() -> None:
    raw = b"x" * 100
    got = run({"max_tokens": 500, "n": 2}, raw=raw, ceiling=Decimal("0.000001"))
    assert got.amount == 3_400


def test_zero_price_model_reserves_nothing() -> None:
    got = run({}, prompt_price=Decimal(0), completion_price=Decimal(0))
    assert got.amount == 0


# -- to_micro and exact sums -----------------------------------------------------------------


@pytest.mark.parametrize(
    ("amount", "micro"),
    [
        (Decimal(0), 0),
        (Decimal(1), 1_000_000),
        (5, 5_000_000),
        (Decimal("0.000001"), 1),
        (Decimal("0.0000001"), 1),
        (Decimal("0.0000010000000000000001"), 2),
        (Decimal("1.2345670"), 1_234_567),
        (Decimal("1.2345671"), 1_234_568),
        (Decimal("123456789.123456"), 123_456_789_123_456),
        (Decimal("-0.0000005"), 0),  # ceiling: toward +infinity
        (Decimal("1E-30"), 1),
        (Decimal("0.1") + Decimal("0.2"), 300_000),
    ],
)
def test_to_micro(amount: Decimal | int, micro: int) -> None:
    assert to_micro(amount) == micro


def test_credits_is_exact() -> None:
    assert credits(1) == Decimal("0.000001")
    assert credits(123_456_789_123_456) == Decimal("123456789.123456")
    assert str(credits(3_400)) == "0.0034"


@given(st.decimals(min_value=0, max_value=10**9, allow_nan=False, allow_infinity=False, places=9))
def test_to_micro_rounds_up_by_less_than_one(amount: Decimal) -> None:
    micro = to_micro(amount)
    scaled = amount * MICRO_PER_CREDIT
    assert micro - 1 < scaled <= micro
    assert credits(micro) >= amount


def test_random_six_place_costs_sum_exactly() -> None:
    rng = random.Random(20261125)
    total_micro = 0
    total_decimal = Decimal(0)
    expected = 0
    for _ in range(100_000):
        units = rng.randrange(0, 50_000_000)  # up to 50 credits
        cost = Decimal(units).scaleb(-6)  # exactly six places
        assert cost.as_tuple().exponent == -6
        total_micro += to_micro(cost)
        total_decimal += cost
        expected += units
    assert total_micro == expected
    assert to_micro(total_decimal) == expected
    assert credits(total_micro) == total_decimal


def test_decimal_text_never_passes_through_a_float() -> None:
    # 0.1 + 0.2 as binary floats is 0.30000000000000004: rounding up would add a micro-credit.
    assert to_micro(Decimal(str(0.1)) + Decimal(str(0.2))) == 300_000
    assert to_micro(Decimal(0.1 + 0.2)) == 300_001  # the float path over-counts
