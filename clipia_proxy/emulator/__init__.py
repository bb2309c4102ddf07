"""A faithful local Clipia AI Gateway: a real aiohttp server for the demo, tests and benchmarks.

It serves the catalog, chat completions (deterministic text, real token counts, tool calls,
JSON for ``response_format``, SSE streams with usage and cost when asked), ``/v1/generation``,
``/v1/key``, Clipia's error envelope and per-key RPM; faults are scripted per request; it
records every request and what it billed. Never used by the gateway itself at run time.

Typical use in a test::

    state = EmulatorState(seed=0)
    server = await aiohttp_server(create_emulator_app(state))
    state.push_fault(Fault(status=503, retry_after="1"))
    ...
    assert state.bills[gen_id].cost == Decimal("0.0504")
"""

from clipia_proxy.emulator.app import STATE_KEY, create_emulator_app, run_emulator
from clipia_proxy.emulator.catalog import CATALOG, RUBLES_PER_CREDIT, cost_credits
from clipia_proxy.emulator.faults import Fault
from clipia_proxy.emulator.state import Bill, EmulatorState, RecordedRequest
from clipia_proxy.emulator.text import count_tokens

__all__ = [
    "CATALOG",
    "RUBLES_PER_CREDIT",
    "STATE_KEY",
    "Bill",
    "EmulatorState",
    "Fault",
    "RecordedRequest",
    "cost_credits",
    "count_tokens",
    "create_emulator_app",
    "run_emulator",
]
