"""Which Clipia key a team's requests carry: the live key, or the sandbox key for test teams.

Clipia keys come in two kinds: ``clipia_live_…`` (charged) and ``clipia_test_…`` (the
sandbox). A team with ``environment: test`` is served with the sandbox key only, through its
own upstream client (its own connections, its own key in its own headers), so no request of a
test team can ever carry the live key, and no live team's the sandbox key.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Final, Literal

from .config import TeamConfig
from .errors import UpstreamUnavailable
from .upstream import UpstreamClient

__all__ = ["Environment", "Upstreams"]

Environment = Literal["live", "test"]


class Upstreams:
    """The live upstream client and, when a sandbox key is configured, the sandbox one."""

    __slots__ = ("_environments", "live", "sandbox")

    def __init__(self, live: UpstreamClient, sandbox: UpstreamClient | None) -> None:
        self.live: Final = live
        self.sandbox: Final = sandbox
        self._environments: dict[str, Environment] = {}

    def apply(self, teams: Iterable[TeamConfig]) -> None:
        """Take the teams' environments from a (re)loaded config."""
        self._environments = {team.id: team.environment for team in teams}

    def environment(self, team: str) -> Environment:
        """Return a team's environment (``live`` for a team the config no longer has)."""
        return self._environments.get(team, "live")

    def for_team(self, team: str) -> UpstreamClient:
        """Return the client for ``team``'s requests; raise 502 for a test team without a key."""
        if self.environment(team) == "live":
            return self.live
        if self.sandbox is None:
            # A reload made a team a test team, but the sandbox key was not there at start-up:
            # refuse rather than send the team's request with the live key.
            raise UpstreamUnavailable(
                "This team uses Clipia's sandbox, and the gateway has no sandbox key loaded; "
                "the platform team must restart it with upstream.test_api_key_env set."
            )
        return self.sandbox

    def clients(self) -> list[UpstreamClient]:
        """Return every client (to start and close them)."""
        return [self.live] if self.sandbox is None else [self.live, self.sandbox]
