"""Route enumeration (Portkey-AI/gateway#1718, BerriAI/litellm#26399).

Walk the data app's router and call every route the way a stranger would: no identity, a
bogus key, a Clipia key. Every one must be 401 ``invalid_api_key`` with nothing sent upstream,
so a route registered without the identity middleware fails this test.
"""

from __future__ import annotations

import re
from collections.abc import Awaitable, Callable

import aiohttp
import msgspec
import pytest
from yarl import URL

from clipia_proxy.auth import generate_key
from clipia_proxy.record import GenerationOwners
from tests.conftest import Stack

StackFactory = Callable[..., Awaitable[Stack]]

DOCUMENTED = {
    ("POST", "/v1/chat/completions"),
    ("GET", "/v1/models"),
    ("GET", "/v1/models/{model_id}"),
    ("GET", "/v1/key"),
    ("GET", "/v1/generation"),
    ("POST", "/mcp"),
    ("GET", "/mcp"),  # 405: no server-sent stream
    ("DELETE", "/mcp"),  # 405: no session to end
    ("*", "/{path}"),  # anything else: 404 (405 for a known path), after identity
}
PARAMS = {"model_id": "gpt-5.5"}
BODY = msgspec.json.encode({"model": "gpt-5.5", "messages": [{"role": "user", "content": "hi"}]})


def _routes(stack: Stack) -> list[tuple[str, str, str]]:
    """Return (method, canonical path, concrete path) for every route of the data app."""
    found: list[tuple[str, str, str]] = []
    for route in stack.running.app.router.routes():
        resource = route.resource
        assert resource is not None
        canonical = resource.canonical
        concrete = re.sub(r"\{(\w+)(?::[^}]*)?\}", lambda m: PARAMS.get(m[1], "x"), canonical)
        found.append((route.method, canonical, concrete))
    return found


async def _call(
    stack: Stack, method: str, path: str, headers: dict[str, str]
) -> tuple[int, bytes, str | None]:
    query = "?id=chatcmpl-000000000000" if path == "/v1/generation" else ""
    async with (
        aiohttp.ClientSession() as session,
        session.request(
            "GET" if method == "*" else method,
            URL(f"http://127.0.0.1:{stack.running.port}{path}{query}", encoded=True),
            headers={"Content-Type": "application/json", **headers},
            data=BODY if method in {"POST", "PUT", "PATCH", "*"} else None,
        ) as response,
    ):
        return response.status, await response.read(), response.headers.get("X-Request-Id")


def test_documented_routes_are_registered(stack: Stack) -> None:
    registered = {(method, canonical) for method, canonical, _ in _routes(stack)}
    assert registered >= DOCUMENTED
    # A new route must be added to DOCUMENTED (and to the README) on purpose.
    assert registered - DOCUMENTED == set(), registered - DOCUMENTED


ANONYMOUS: list[tuple[str, Callable[[Stack], dict[str, str]]]] = [
    ("no_identity", lambda s: {}),
    ("bogus_key", lambda s: {"Authorization": f"Bearer {generate_key()}"}),
    ("clipia_key", lambda s: {"Authorization": f"Bearer {s.clipia_key}"}),
    ("identity_header_in_keys_mode", lambda s: {"X-Clipia-Team": "search"}),
]


@pytest.mark.parametrize("make", [m for _, m in ANONYMOUS], ids=[n for n, _ in ANONYMOUS])
async def test_every_route_refuses_without_identity(
    stack: Stack, make: Callable[[Stack], dict[str, str]]
) -> None:
    routes = _routes(stack)
    assert len(routes) >= len(DOCUMENTED)
    before = len(stack.emulator.requests)
    for method, canonical, concrete in routes:
        status, body, request_id = await _call(stack, method, concrete, make(stack))
        assert status == 401, (method, canonical, status, body[:200])
        error = msgspec.json.decode(body)["error"]
        assert set(error) == {"message", "type", "param", "code"}
        assert error["code"] == "invalid_api_key"
        assert request_id is not None
        assert len(stack.emulator.requests) == before, (method, canonical)


async def test_every_route_refuses_untrusted_identity_header(stacks: StackFactory) -> None:
    stack = await stacks(
        extra="auth: {mode: header, header: X-Clipia-Team, trusted_proxies: [10.0.0.0/8]}"
    )
    before = len(stack.emulator.requests)
    for method, canonical, concrete in _routes(stack):
        status, _, _ = await _call(stack, method, concrete, {"X-Clipia-Team": "search"})
        assert status == 401, (method, canonical)
    assert len(stack.emulator.requests) == before


async def test_every_route_serves_with_identity(stack: Stack) -> None:
    """The other half: each route is reachable with a key (so the 401s above are not 404s)."""
    for method, canonical, concrete in _routes(stack):
        status, body, _ = await _call(stack, method, concrete, stack.auth())
        if canonical == "/v1/generation":
            assert status == 404  # an id this team did not create
        elif canonical == "/mcp":
            # A chat body is no JSON-RPC message (400); GET and DELETE are 405 by design.
            assert status == (400 if method == "POST" else 405), (method, status, body[:200])
            assert msgspec.json.decode(body)["jsonrpc"] == "2.0"
        elif canonical == "/{path}":
            assert status == 404  # the catch-all: no route of that name
        else:
            assert status == 200, (method, canonical, status, body[:200])


def test_generation_owners_forget_the_oldest_first() -> None:
    owners = GenerationOwners(3)
    for number in range(5):
        owners.remember(f"gen-{number}", f"team-{number % 2}")
    assert len(owners) == 3
    assert owners.get("gen-0") is None
    assert owners.get("gen-1") is None
    assert [owners.get(f"gen-{number}") for number in (2, 3, 4)] == ["team-0", "team-1", "team-0"]
    owners.remember("gen-2", "team-1")  # a repeated id keeps its place and takes the new owner
    owners.remember("gen-5", "team-1")
    assert owners.get("gen-2") is None
    assert owners.get("gen-3") == "team-1"
