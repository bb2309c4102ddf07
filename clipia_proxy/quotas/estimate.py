"""Worst-case cost of a chat request, before it is sent (pure).

``prompt upper bound`` = the body's size in bytes (byte-level BPE tokenizers never make more
tokens than bytes, and every prompt byte is inside the body) plus a fixed reserve per image
part (an image's token cost is not bounded by the bytes of its URL). ``output cap`` = the
request's ``max_tokens``/``max_completion_tokens``, else the team's cap, else
``accounting.default_output_reserve_tokens`` — bounded by the model's context length — times
``n``. Catalog prices are in catalog units (₽) per token; ``rubles_per_credit`` turns them into
credits. A model without both prices cannot be bounded: refused, unless the team set
``caps.max_request_credits``, which is then reserved.
"""

from __future__ import annotations

from decimal import Decimal
from typing import Final

import msgspec

from .model import Micro, to_micro

__all__ = ["Estimate", "PriceUnknown", "estimate", "plausible_cost"]

_IMAGE_MARKER: Final = b'"type":"image_url"'
"""One per image part in the gateway's own compact re-serialisation (the body estimated);
text that merely mentions it is escaped (``\\"type\\"``) and never matches."""


class PriceUnknown(Exception):
    """The model has no price in the catalog and the team set no per-request ceiling."""


class Estimate(msgspec.Struct, frozen=True, kw_only=True):
    """A request's worst case: tokens and credits."""

    prompt_tokens: int
    output_tokens: int
    """Per choice; the request may ask for ``n`` choices."""
    n: int
    amount: Micro

    @property
    def tokens(self) -> int:
        """Return the worst-case total tokens (counted against TPM)."""
        return self.prompt_tokens + self.n * self.output_tokens


def _positive_int(value: object) -> int | None:
    if isinstance(value, int) and not isinstance(value, bool) and value > 0:
        return value
    return None


def estimate(
    *,
    raw_body: bytes,
    body: dict[str, object],
    prompt_price: Decimal | None,
    completion_price: Decimal | None,
    context_length: int | None,
    team_max_tokens: int | None,
    default_output_tokens: int,
    image_reserve_tokens: int,
    rubles_per_credit: Decimal,
    ceiling: Decimal | None,
) -> Estimate:
    """Return the worst-case estimate; raise :class:`PriceUnknown` when it cannot be bounded."""
    images = raw_body.count(_IMAGE_MARKER)
    prompt_tokens = len(raw_body) + images * image_reserve_tokens
    output = (
        _positive_int(body.get("max_completion_tokens"))
        or _positive_int(body.get("max_tokens"))
        or team_max_tokens
        or default_output_tokens
    )
    if context_length:
        output = min(output, context_length)
    n = _positive_int(body.get("n")) or 1
    if prompt_price is None or completion_price is None:
        if ceiling is None:
            raise PriceUnknown
        amount = to_micro(ceiling)
    else:
        rubles = prompt_tokens * prompt_price + n * output * completion_price
        amount = to_micro(rubles / rubles_per_credit)
    return Estimate(prompt_tokens=prompt_tokens, output_tokens=output, n=n, amount=amount)


PLAUSIBLE_FACTOR: Final = 2
"""An upstream cost up to this many times its tokens x catalog prices is believed."""


def plausible_cost(
    cost: Micro,
    *,
    reserved: Micro,
    counted: Micro | None,
) -> bool:
    """Return whether an upstream-reported ``cost`` is believable.

    Believed: a cost from 0 up to the larger of the reservation and ``PLAUSIBLE_FACTOR`` x the
    cost ``counted`` from the reported tokens x catalog prices (``None``: no tokens or prices
    known, so the reservation alone bounds it). A negative cost, or one above both (a ``1e9``
    that would lock the team out), is not: the caller then settles from tokens.
    """
    if cost < 0:
        return False
    ceiling = reserved if counted is None else max(reserved, PLAUSIBLE_FACTOR * counted)
    return cost <= ceiling
