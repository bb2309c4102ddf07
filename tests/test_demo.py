"""`clipia-proxy demo` starts on its embedded defaults and its printed snippets work as printed."""

from __future__ import annotations

import asyncio
import re
import shlex
import signal
import sys
from pathlib import Path

import aiohttp


async def test_demo_prints_working_snippets(tmp_path: Path) -> None:
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "clipia_proxy",
        "demo",
        "--port",
        "0",
        "--admin-port",
        "0",
        "--emulator-port",
        "0",
        "--db",
        str(tmp_path / "demo.db"),
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    assert process.stdout is not None
    try:
        text = ""
        async with asyncio.timeout(30):
            while "Press Ctrl+C" not in text:
                line = (await process.stdout.readline()).decode()
                assert line, "demo exited early"
                text += line
        # The curl snippets: run their URL, headers and body as printed.
        commands = re.findall(
            r"^(curl .*?)(?=\n\n|\ncurl|\Z)", text, flags=re.MULTILINE | re.DOTALL
        )
        assert len(commands) == 3
        async with aiohttp.ClientSession() as session:
            for command in commands:
                words = shlex.split(command.replace("\\\n", " "))
                url = next(w for w in words if w.startswith("http://"))
                headers = dict(
                    words[i + 1].split(": ", 1) for i, w in enumerate(words) if w == "-H"
                )
                body = next((words[i + 1] for i, w in enumerate(words) if w == "-d"), None)
                method = "POST" if body is not None else "GET"
                async with session.request(method, url, headers=headers, data=body) as reply:
                    payload = await reply.read()
                    assert reply.status == 200, payload
                    if b'"stream": true' in (body or "").encode():
                        assert payload.rstrip().endswith(b"data: [DONE]")
        # The python snippet, as printed, with the openai SDK.
        snippet = re.search(r"python - <<'PY'\n(.*?)\nPY\n", text, flags=re.DOTALL)
        assert snippet is not None
        run = await asyncio.create_subprocess_exec(
            sys.executable,
            "-c",
            snippet[1],
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
        )
        out, err = await asyncio.wait_for(run.communicate(), 30)
        assert run.returncode == 0, err.decode()
        assert b"CompletionUsage" in out
    finally:
        process.send_signal(signal.SIGINT)
        try:
            await asyncio.wait_for(process.wait(), 15)
        finally:
            if process.returncode is None:
                process.kill()
                await process.wait()
    assert process.returncode == 0
