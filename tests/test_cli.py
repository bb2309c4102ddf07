"""The command line: check-config, keygen (pasted into a config, used by the openai SDK)."""

from __future__ import annotations

import contextlib
import os
import re
import socket
import subprocess
import sys
from pathlib import Path

import openai
import pytest

from clipia_proxy.cli import main
from tests.conftest import start_stack, stop_stack

ROOT = Path(__file__).parent.parent


def test_check_config_ok(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["check-config", str(ROOT / "config.example.yaml")]) == 0
    out = capsys.readouterr().out
    assert out.startswith("config.example.yaml: ok: 2 team(s), 2 key(s), auth.mode=keys")


def test_check_config_reports_every_problem(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text("server: {port: lots, nope: 1}\nauth: {mode: fixed}\n")
    assert main(["check-config", str(bad)]) == 1
    err = capsys.readouterr().err.splitlines()
    assert err == [
        "bad.yaml: server.port: expected int (got 'lots')",
        "bad.yaml: server.nope: unknown key",
        "bad.yaml: auth.team: mode fixed needs the team every request belongs to",
    ]


def test_python_dash_m_entry_point() -> None:
    done = subprocess.run(
        [sys.executable, "-m", "clipia_proxy", "check-config", str(ROOT / "config.example.yaml")],
        capture_output=True,
        text=True,
        check=False,
        timeout=30,
    )
    assert done.returncode == 0, done.stderr
    assert ": ok: " in done.stdout


def test_keygen_output_pastes_into_config_and_works_with_the_sdk(
    capsys: pytest.CaptureFixture[str],
) -> None:
    assert main(["keygen", "--team", "search", "--key-id", "search-new"]) == 0
    lines = capsys.readouterr().out.splitlines()
    key = next(line for line in lines if line.startswith("cpx_"))
    entry = next(line for line in lines if line.startswith("- {id: search-new"))
    assert re.fullmatch(r"cpx_[A-Za-z0-9_-]{43}", key)
    assert re.fullmatch(r"- \{id: search-new, sha256: [0-9a-f]{64}\}", entry)
    teams = (
        "teams:\n  - id: search\n    keys:\n      "
        + entry.replace("{", "{{").replace("}", "}}")
        + "\n    models: {{allow: [gpt-5.5]}}\n"
        + "  - id: research\n    keys: [{{id: r, sha256: {research}}}]\n"
    )

    async def call() -> str:
        stack = await start_stack(teams=teams)
        try:
            client = openai.AsyncOpenAI(base_url=stack.base_url, api_key=key, max_retries=0)
            reply = await client.chat.completions.create(
                model="gpt-5.5", messages=[{"role": "user", "content": "hi"}]
            )
            await client.close()
            return reply.model
        finally:
            await stop_stack(stack)

    import asyncio

    assert asyncio.run(call()) == "gpt-5.5"


@pytest.mark.parametrize("busy", ["port", "admin_port"])
def test_serve_on_a_busy_port_says_so_in_one_line_and_exits_non_zero(
    tmp_path: Path, busy: str
) -> None:
    from bench.run import UPSTREAM_KEY_ENV, gateway_config
    from clipia_proxy.auth import generate_key

    with contextlib.ExitStack() as stack:
        occupied = stack.enter_context(socket.socket())
        occupied.bind(("127.0.0.1", 0))
        occupied.listen()
        taken = occupied.getsockname()[1]
        free = stack.enter_context(socket.socket())
        free.bind(("127.0.0.1", 0))  # held, never listening: Clipia's address refuses at once
        ports = {"port": 0, "admin_port": 0, busy: taken}
        config = tmp_path / "gateway.yaml"
        config.write_text(
            gateway_config(
                port=ports["port"],
                admin_port=ports["admin_port"],
                emulator_port=free.getsockname()[1],
                team_key=generate_key(),
                store="memory",
            )
        )
        done = subprocess.run(
            [sys.executable, "-m", "clipia_proxy", "serve", "--config", str(config)],
            capture_output=True,
            text=True,
            timeout=120,
            cwd=tmp_path,
            env={**os.environ, UPSTREAM_KEY_ENV: "clipia_test_" + "k" * 32},
            check=False,
        )
    assert done.returncode == 1, done.stderr
    assert "Traceback" not in done.stderr
    lines = done.stderr.strip().splitlines()
    about = [line for line in lines if str(taken) in line]
    name = "admin" if busy == "admin_port" else "data"
    assert about == [lines[-1]]
    assert lines[-1].startswith(f"clipia-proxy serve: cannot listen on 127.0.0.1:{taken} ")
    assert f"(the {name} port)" in lines[-1]
