"""``server.admin_token_env``: ``/metrics`` needs the bearer token; the probes stay open (A2)."""

from __future__ import annotations

from collections.abc import AsyncIterator

import aiohttp
import pytest

from clipia_proxy.config import ConfigError, read_admin_token
from tests.harness import Stack, make_config, start_stack, stop_stack

TOKEN_ENV = "CLIPIA_TEST_ADMIN_TOKEN"
TOKEN = "admin-token-for-tests-0123456789"


@pytest.fixture
async def guarded(monkeypatch: pytest.MonkeyPatch) -> AsyncIterator[Stack]:
    monkeypatch.setenv(TOKEN_ENV, TOKEN)
    made = await start_stack(server={"admin_token_env": TOKEN_ENV})
    try:
        yield made
    finally:
        await stop_stack(made)


async def _get(url: str, headers: dict[str, str] | None = None) -> tuple[int, str, str]:
    async with aiohttp.ClientSession() as session, session.get(url, headers=headers) as response:
        return response.status, await response.text(), response.headers.get("WWW-Authenticate", "")


async def test_metrics_needs_the_token(guarded: Stack) -> None:
    url = guarded.admin_url + "/metrics"
    for headers in (None, {"Authorization": "Bearer wrong"}, {"Authorization": TOKEN}):
        status, body, challenge = await _get(url, headers)
        assert status == 401
        assert "clipia_proxy_" not in body  # no team's spend or budget
        assert '"code":"invalid_api_key"' in body
        assert challenge == "Bearer"
        assert TOKEN not in body
    status, body, _ = await _get(url, {"Authorization": f"Bearer {TOKEN}"})
    assert status == 200
    assert "clipia_proxy_requests_total" in body


async def test_probes_stay_open_with_a_token(guarded: Stack) -> None:
    for path in ("/healthz", "/readyz"):
        status, _, _ = await _get(guarded.admin_url + path)
        assert status == 200, path


async def test_without_a_token_metrics_stays_open(stack: Stack) -> None:
    status, body, _ = await _get(stack.admin_url + "/metrics")
    assert status == 200
    assert "clipia_proxy_requests_total" in body


def test_a_named_but_unset_token_is_a_config_error() -> None:
    config = make_config("http://127.0.0.1:1", {"search": "x", "research": "y"})
    server = config.server.__class__(admin_token_env=TOKEN_ENV)
    with pytest.raises(ConfigError) as caught:
        read_admin_token(server, environ={})
    assert TOKEN_ENV in str(caught.value.problems)
    assert read_admin_token(server, environ={TOKEN_ENV: TOKEN}) is not None
