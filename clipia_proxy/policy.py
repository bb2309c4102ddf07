"""Pure model policy: alias resolution, allow/deny globs on the canonical id, and caps.

Matching is on the canonical id exactly as the catalog spells it: ``fnmatchcase`` (never
``fnmatch``, which folds case on some systems), no trimming, no case folding, no Unicode
normalisation — two different strings never match the same rule by accident. Deny wins.
"""

from __future__ import annotations

from collections.abc import Container, Mapping
from fnmatch import fnmatchcase
from typing import Final

from .config import CapsConfig, TeamConfig
from .errors import InvalidRequest, ModelNotAllowed, ModelNotFound

__all__ = ["ModelPolicy", "apply_caps", "bound_output"]

_TOKEN_FIELDS: Final = ("max_tokens", "max_completion_tokens")


class ModelPolicy:
    """One team's model policy, built from its config."""

    def __init__(self, team: TeamConfig) -> None:
        self.team: Final = team
        """The team's whole config (its caps, limits and budgets)."""
        self.team_id: Final = team.id
        self.allow: Final = team.models.allow
        self.deny: Final = team.models.deny
        self.aliases: Final[Mapping[str, str]] = dict(team.models.aliases)
        self._resolved: dict[str, str] = {}
        """Requested id -> canonical id, for requests ``resolve`` accepted against the chat
        models in ``_resolved_for`` (so bounded by the catalog and the aliases)."""
        self._resolved_for: object = None
        budget = team.budget
        self.budgeted: Final = any(
            amount is not None for amount in (budget.day, budget.week, budget.month, budget.total)
        )
        """Whether any budget period is set (then every request's output must be bounded)."""

    def canonical(self, requested: str) -> str:
        """Return the canonical id for ``requested`` (aliases resolved; others unchanged)."""
        seen = 0
        current = requested
        while current in self.aliases and seen <= len(self.aliases):
            current = self.aliases[current]
            seen += 1
        return current

    def allows(self, canonical: str) -> bool:
        """Return whether the team may use the canonical id (deny wins over allow)."""
        if any(fnmatchcase(canonical, pattern) for pattern in self.deny):
            return False
        return any(fnmatchcase(canonical, pattern) for pattern in self.allow)

    def resolve(self, requested: str, chat_models: Container[str]) -> str:
        """Return the canonical id to forward, or raise 403 ``model_not_allowed`` / 404.

        A model the policy refuses is 403 whether or not it exists; an allowed id missing
        from the catalog's chat models is 404 ``model_not_found``. Accepted answers are
        remembered for the same ``chat_models`` object (a catalog snapshot's).
        """
        if chat_models is self._resolved_for:
            known = self._resolved.get(requested)
            if known is not None:
                return known
        else:
            self._resolved_for, self._resolved = chat_models, {}
        canonical = self.canonical(requested)
        if not self.allows(canonical):
            raise ModelNotAllowed(
                f"Team {self.team_id!r} may not use model {_show(requested)}. "
                f"Allowed: {self.describe()}.",
                param="model",
            )
        if canonical not in chat_models:
            raise ModelNotFound(
                f"The model {_show(requested)} does not exist or is not a chat model.",
                param="model",
            )
        self._resolved[requested] = canonical
        return canonical

    def visible(self, chat_models: Container[str], ids: list[str]) -> list[tuple[str, str]]:
        """Return ``(listed id, canonical id)`` for every model and alias the team may use."""
        listed = [(model_id, model_id) for model_id in ids if self.allows(model_id)]
        for alias in sorted(self.aliases):
            canonical = self.canonical(alias)
            if canonical in chat_models and self.allows(canonical):
                listed.append((alias, canonical))
        return listed

    def describe(self) -> str:
        """Return the policy for people: allow patterns, deny patterns, aliases."""
        parts = [", ".join(self.allow) if self.allow else "no models"]
        if self.deny:
            parts.append(f"except {', '.join(self.deny)}")
        if self.aliases:
            parts.append(
                "aliases " + ", ".join(f"{a} -> {t}" for a, t in sorted(self.aliases.items()))
            )
        return "; ".join(parts)


def _show(model: str) -> str:
    """Quote a client-supplied model name safely for a message (escapes controls, truncates)."""
    text = repr(model[:80])
    return text + ("..." if len(model) > 80 else "")


def apply_caps(body: dict[str, object], caps: CapsConfig) -> None:
    """Check (or clamp, per ``caps.on_exceed``) ``max_tokens``/``max_completion_tokens`` and ``n``.

    Mutates ``body`` only when clamping. Types are checked by the wire parser before this runs.
    """
    present = {name: body[name] for name in _TOKEN_FIELDS if body.get(name) is not None}
    if len(present) == 2 and present["max_tokens"] != present["max_completion_tokens"]:
        raise InvalidRequest(
            "max_tokens and max_completion_tokens disagree; send one of them",
            param="max_tokens",
        )
    if caps.max_tokens is not None:
        for name, value in present.items():
            assert isinstance(value, int)
            if value > caps.max_tokens:
                if caps.on_exceed == "clamp":
                    body[name] = caps.max_tokens
                else:
                    raise InvalidRequest(
                        f"{name}={value} is over this team's cap of {caps.max_tokens} tokens",
                        param=name,
                        reason="cap",
                    )
    n = body.get("n")
    if caps.n is not None and isinstance(n, int) and n > caps.n:
        if caps.on_exceed == "clamp":
            body["n"] = caps.n
        else:
            raise InvalidRequest(
                f"n={n} is over this team's cap of {caps.n}", param="n", reason="cap"
            )


def bound_output(
    body: dict[str, object],
    *,
    cap: int | None,
    budgeted: bool,
    default_reserve: int,
    context_length: int | None,
) -> int | None:
    """Make the output the upstream may write the output reserved; return that bound per choice.

    A request that sets ``max_tokens``/``max_completion_tokens`` keeps it (``apply_caps`` has
    checked it). Otherwise ``max_tokens`` is set to the team's cap, or — for a team with a
    budget and no cap — to ``default_reserve``, bounded by the model's context length: the
    same number the reservation counts. A team with neither stays unbounded (``None``).
    """
    for name in _TOKEN_FIELDS:
        value = body.get(name)
        if isinstance(value, int) and not isinstance(value, bool) and value > 0:
            return value
    bound = cap if cap is not None else (default_reserve if budgeted else None)
    if bound is None:
        return None
    if context_length:
        bound = min(bound, context_length)
    body["max_tokens"] = bound
    return bound
