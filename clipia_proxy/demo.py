"""``clipia-proxy demo``: the emulator and the gateway with example teams, on this machine only.

Needs no Clipia key and no internet: the upstream is the built-in emulator. Fresh team keys are
made at every start and printed with ready-to-paste ``curl`` and ``openai`` snippets.
"""

from __future__ import annotations

import secrets
from collections.abc import Callable
from typing import Final

from aiohttp import web

from .auth import generate_key, hash_key
from .config import Config, Secret, parse_config
from .emulator import EmulatorState, create_emulator_app
from .keys import LIVE
from .server import Running, serve

__all__ = ["demo_config", "run_demo"]

_HOST: Final = "127.0.0.1"


def demo_config(
    *, port: int, admin_port: int, emulator_port: int, keys: dict[str, str], db_path: str
) -> Config:
    """Return the demo's config: two example teams, upstream = the local emulator."""
    text = f"""
server: {{host: {_HOST}, port: {port}, admin_port: {admin_port}, shutdown_grace_seconds: 2}}
upstream:
  base_url: http://{_HOST}:{emulator_port}/v1
  api_key_env: null
catalog: {{ttl_seconds: 300}}
store: {{backend: sqlite, sqlite_path: "{db_path}"}}
auth: {{mode: keys}}
teams:
  - id: search
    label: Search team (demo)
    keys: [{{id: search-demo, sha256: {hash_key(keys["search"])}}}]
    models:
      allow: ["claude-sonnet-*", "gpt-5.5"]
      deny: ["claude-sonnet-4-5"]
      aliases: {{fast: claude-sonnet-4-6}}
    caps: {{max_tokens: 4096, n: 1}}
  - id: research
    label: Research team (demo)
    keys: [{{id: research-demo, sha256: {hash_key(keys["research"])}}}]
    models:
      allow: ["*"]
      deny: ["claude-opus-*"]
"""
    return parse_config(text, source="demo", resolve_secrets=False)


def _snippets(running: Running, keys: dict[str, str]) -> str:
    base = f"http://{_HOST}:{running.port}/v1"
    key = keys["search"]
    return f"""
clipia-proxy demo is running (upstream: the built-in Clipia emulator; no real credits are spent).

  gateway  {base}
  admin    http://{_HOST}:{running.admin_port}/healthz  /readyz
  team keys (fresh for this run):
    search    {key}
    research  {keys["research"]}
  ledger   SQLite file {running.app[LIVE].config.store.sqlite_path} (spend survives restarts)

Try it:

curl -s {base}/chat/completions \\
  -H "Authorization: Bearer {key}" -H "Content-Type: application/json" \\
  -d '{{"model": "fast", "messages": [{{"role": "user", "content": "Hello!"}}]}}'

curl -sN {base}/chat/completions \\
  -H "Authorization: Bearer {key}" -H "Content-Type: application/json" \\
  -d '{{"model": "gpt-5.5", "stream": true, "messages": [{{"role": "user", "content": "Hi"}}]}}'

curl -s {base}/models -H "Authorization: Bearer {key}"

# with the openai package installed (pip install openai):
python - <<'PY'
from openai import OpenAI
client = OpenAI(base_url="{base}", api_key="{key}")
reply = client.chat.completions.create(
    model="claude-sonnet-4-6", messages=[{{"role": "user", "content": "Hello!"}}])
print(reply.choices[0].message.content, reply.usage)
PY

Press Ctrl+C to stop.
"""


async def run_demo(
    *,
    port: int = 8080,
    admin_port: int = 9090,
    emulator_port: int = 8090,
    db_path: str = "clipia-proxy-demo.db",
    announce: Callable[[str], None],
) -> None:
    """Run the emulator and the gateway until interrupted; ``announce`` shows the snippets."""
    state = EmulatorState(seed=0)
    emulator = web.AppRunner(create_emulator_app(state), access_log=None)
    await emulator.setup()
    await web.TCPSite(emulator, _HOST, emulator_port).start()
    bound = emulator.addresses[0][1]  # the real port when 0 asked for a free one
    keys = {"search": generate_key(), "research": generate_key()}
    config = demo_config(
        port=port, admin_port=admin_port, emulator_port=bound, keys=keys, db_path=db_path
    )
    upstream_key = Secret("clipia_test_demo" + secrets.token_hex(16))

    try:
        await serve(
            config,
            api_key=upstream_key,
            on_ready=lambda running: announce(_snippets(running, keys)),
        )
    finally:
        await emulator.cleanup()
