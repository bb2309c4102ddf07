"""Run a test module's async tests once per upstream transport (``upstream.transport``).

A module imports :func:`pytest_generate_tests` and :func:`transport_kind`: every ``async def``
test then runs with the default transport (``httptools``) and with ``aiohttp``; the gateway
and the ``UpstreamClient`` built in the test (in this process) use that transport.
"""

from __future__ import annotations

import inspect
import ssl
from collections.abc import Iterator

import msgspec
import pytest

import clipia_proxy.upstream as upstream_module
from clipia_proxy.config import UpstreamConfig
from clipia_proxy.transport import Transport

TRANSPORTS = ("httptools", "aiohttp")


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    """Parametrize every coroutine test of the module over the transports."""
    if inspect.iscoroutinefunction(metafunc.function):
        metafunc.fixturenames.insert(0, "transport_kind")  # before the gateway fixtures
        metafunc.parametrize("transport_kind", TRANSPORTS, indirect=True)


@pytest.fixture
def transport_kind(request: pytest.FixtureRequest) -> Iterator[str]:
    """Make every ``UpstreamClient`` built without a transport use ``request.param``'s."""
    kind: str = request.param
    default = upstream_module.default_transport

    def chosen(config: UpstreamConfig, *, tls: ssl.SSLContext | None = None) -> Transport:
        return default(msgspec.structs.replace(config, transport=kind), tls=tls)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(upstream_module, "default_transport", chosen)
        yield kind
