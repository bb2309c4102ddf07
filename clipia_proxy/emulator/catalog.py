"""The emulator's model catalog: chat models in OpenRouter form, mixed with media models.

This module owns the list served at ``GET /v1/models`` and the per-token prices the emulator
bills with. It is pure data: no I/O, no aiohttp. Prices are decimal strings in rubles per token,
exactly as Clipia writes them; :func:`chat_price` turns them into ``Decimal`` for billing.
"""

from __future__ import annotations

from dataclasses import dataclass
from decimal import ROUND_HALF_UP, Decimal
from typing import Final

__all__ = [
    "CATALOG",
    "RUBLES_PER_CREDIT",
    "ChatPrice",
    "catalog_entry",
    "chat_price",
    "cost_credits",
]

RUBLES_PER_CREDIT: Final = Decimal(3)
"""Clipia's documented catalog examples fit 1 credit = 3 ₽."""

_COST_QUANTUM: Final = Decimal("0.000001")

_SUPPORTED_FULL: Final = (
    "tools",
    "tool_choice",
    "response_format",
    "temperature",
    "top_p",
    "max_tokens",
    "stop",
    "seed",
)
_SUPPORTED_BASIC: Final = ("temperature", "top_p", "max_tokens", "stop", "seed")


def _chat(
    model_id: str,
    name: str,
    *,
    prompt: str,
    completion: str,
    tokenizer: str,
    context_length: int,
    created: int,
    images: bool = True,
    tools: bool = True,
) -> dict[str, object]:
    return {
        "id": model_id,
        "object": "model",
        "name": name,
        "created": created,
        "owned_by": "clipia",
        "context_length": context_length,
        "architecture": {
            "modality": "text+image->text" if images else "text->text",
            "input_modalities": ["text", "image"] if images else ["text"],
            "output_modalities": ["text"],
            "tokenizer": tokenizer,
        },
        "pricing": {"prompt": prompt, "completion": completion},
        "supported_parameters": list(_SUPPORTED_FULL if tools else _SUPPORTED_BASIC),
    }


def _media(model_id: str, name: str, *, kind: str, credits: int, created: int) -> dict[str, object]:
    return {
        "id": model_id,
        "slug": model_id,
        "object": "model",
        "name": name,
        "type": kind,
        "created": created,
        "owned_by": "clipia",
        "pricing": {"credits": credits},
    }


CATALOG: Final[tuple[dict[str, object], ...]] = (
    # The first three prices are Clipia's documented ones (₽ per 1M tokens / 10⁶); the rest are
    # invented but plausible, since their rows in the docs were not readable.
    _chat(
        "claude-opus-4-8",
        "Claude Opus 4.8",
        prompt="0.0004",
        completion="0.002",
        tokenizer="Claude",
        context_length=200000,
        created=1782200000,
    ),
    _chat(
        "gpt-5.5",
        "GPT-5.5",
        prompt="0.0004",
        completion="0.0024",
        tokenizer="GPT",
        context_length=400000,
        created=1782100000,
    ),
    _chat(
        "claude-sonnet-4-6",
        "Claude Sonnet 4.6",
        prompt="0.00024",
        completion="0.0012",
        tokenizer="Claude",
        context_length=200000,
        created=1781900000,
    ),
    _media("flux-2-pro", "FLUX.2 [pro]", kind="image", credits=4, created=1781800000),
    _chat(
        "claude-sonnet-4-5",
        "Claude Sonnet 4.5",
        prompt="0.00024",
        completion="0.0012",
        tokenizer="Claude",
        context_length=200000,
        created=1770000000,
    ),
    _chat(
        "gpt-5.5-mini",
        "GPT-5.5 mini",
        prompt="0.00005",
        completion="0.0004",
        tokenizer="GPT",
        context_length=400000,
        created=1782100001,
    ),
    _media("veo-4", "Veo 4", kind="video", credits=60, created=1781700000),
    _chat(
        "gemini-3-pro",
        "Gemini 3 Pro",
        prompt="0.0002",
        completion="0.0012",
        tokenizer="Gemini",
        context_length=1000000,
        created=1781000000,
    ),
    _chat(
        "deepseek-v4",
        "DeepSeek V4",
        prompt="0.00003",
        completion="0.00011",
        tokenizer="DeepSeek",
        context_length=128000,
        created=1780000000,
        images=False,
    ),
    _chat(
        "grok-5",
        "Grok 5",
        prompt="0.0003",
        completion="0.0015",
        tokenizer="Grok",
        context_length=256000,
        created=1780500000,
    ),
    _media("nano-banana-3", "Nano Banana 3", kind="image", credits=2, created=1781600000),
)
"""Every entry of ``GET /v1/models``, chat and media mixed, in the order served."""


@dataclass(frozen=True, slots=True, kw_only=True)
class ChatPrice:
    """Per-token prices of one chat model, in catalog price units (rubles)."""

    prompt: Decimal
    completion: Decimal


def _build_prices() -> dict[str, ChatPrice]:
    prices: dict[str, ChatPrice] = {}
    for entry in CATALOG:
        pricing = entry.get("pricing")
        if "architecture" not in entry or not isinstance(pricing, dict):
            continue
        prices[str(entry["id"])] = ChatPrice(
            prompt=Decimal(pricing["prompt"]), completion=Decimal(pricing["completion"])
        )
    return prices


_PRICES: Final = _build_prices()
_BY_ID: Final = {str(entry["id"]): entry for entry in CATALOG}


def chat_price(model_id: str) -> ChatPrice | None:
    """Return the prices of chat model ``model_id``, or ``None`` for media or unknown ids."""
    return _PRICES.get(model_id)


def catalog_entry(model_id: str) -> dict[str, object] | None:
    """Return the catalog entry with id ``model_id`` (chat or media), or ``None``."""
    return _BY_ID.get(model_id)


def cost_credits(price: ChatPrice, prompt_tokens: int, completion_tokens: int) -> Decimal:
    """Return the cost in credits, rounded half-up to 6 places, without trailing zeros.

    ``(prompt_tokens * prompt + completion_tokens * completion) / 3``, all in ``Decimal``; the
    result's text is what ``usage.cost`` shows (``0.0504``, never ``0.050400`` or ``5.04E-2``).
    """
    rubles = price.prompt * prompt_tokens + price.completion * completion_tokens
    cost = (rubles / RUBLES_PER_CREDIT).quantize(_COST_QUANTUM, rounding=ROUND_HALF_UP)
    plain = cost.normalize()
    # normalize() turns 10 into 1E+1; an integral cost is written without an exponent.
    exponent = plain.as_tuple().exponent
    return plain.quantize(Decimal(1)) if isinstance(exponent, int) and exponent > 0 else plain
