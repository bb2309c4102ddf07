"""The part of the application a config reload replaces: config, identity and model policy.

Handlers read ``app[LIVE]`` once per request and keep what they read, so a request that
started under one config finishes under it. ``apply`` swaps every part in one synchronous
call (no ``await`` in between), so no request ever sees a mix of two configs.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Callable

from .auth import Authenticator
from .config import Config
from .policy import ModelPolicy

__all__ = ["Live"]


class Live:
    """The config in force, its authenticator and its teams' model policies."""

    __slots__ = ("_today", "authenticator", "config", "policies")

    def __init__(self, config: Config, *, today: Callable[[], dt.date] | None = None) -> None:
        self._today = today
        self.apply(config)

    def apply(self, config: Config) -> None:
        """Install a new config (already validated)."""
        authenticator = Authenticator(config, today=self._today)
        policies = {team.id: ModelPolicy(team) for team in config.teams}
        self.config: Config = config
        self.authenticator: Authenticator = authenticator
        self.policies: dict[str, ModelPolicy] = policies
