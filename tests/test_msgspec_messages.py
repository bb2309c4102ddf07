"""The msgspec message shapes config.py reads, pinned: a new msgspec that rewords them fails here.

``config._convert`` turns ``msgspec.ValidationError`` text into ``file: path: problem`` lines:
it splits the ``- at `$.path``` suffix off, recognises ``Object contains unknown field``, and
rewrites ``Expected …, got …`` and ``Invalid decimal string``. msgspec documents none of this
text, so pyproject caps msgspec below the next minor release; before raising the cap, this
test says whether the shapes still hold.
"""

from __future__ import annotations

from decimal import Decimal

import msgspec
import pytest

from clipia_proxy.config import ConfigError, parse_config


class Inner(msgspec.Struct, forbid_unknown_fields=True):
    port: int = 0
    amount: Decimal | None = None


class Outer(msgspec.Struct, forbid_unknown_fields=True):
    items: list[Inner] = msgspec.field(default_factory=list)


def message(raw: object) -> str:
    with pytest.raises(msgspec.ValidationError) as caught:
        msgspec.convert(raw, Outer, strict=True)
    return str(caught.value)


def test_the_path_suffix() -> None:
    assert (
        message({"items": [{}, {"port": "x"}]})
        == "Expected `int`, got `str` - at `$.items[1].port`"
    )


def test_the_unknown_field_message() -> None:
    assert (
        message({"items": [{"nope": 1}]})
        == "Object contains unknown field `nope` - at `$.items[0]`"
    )


def test_the_decimal_message() -> None:
    assert message({"items": [{"amount": "lots"}]}).startswith("Invalid decimal string")


@pytest.mark.parametrize(
    ("text", "line"),
    [
        ("server: {port: x}", "t.yaml: server.port: expected int (got 'x')"),
        ("server: {nope: 1}", "t.yaml: server.nope: unknown key"),
        (
            "teams: [{id: a, budget: {day: lots}}]",
            "t.yaml: teams[0].budget.day: must be a number (got 'lots')",
        ),
    ],
)
def test_config_lines_built_from_them(text: str, line: str) -> None:
    with pytest.raises(ConfigError) as caught:
        parse_config(text, source="t.yaml", resolve_secrets=False)
    assert line in caught.value.problems
