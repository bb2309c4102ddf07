"""``clipia-proxy reconcile``: the ledger's day against Clipia's own key usage, snapshotted.

A gateway in the test's loop snapshots the emulator's ``GET /v1/key`` usage while serving; a
request that bypassed the gateway (straight to Clipia with the company key) is the difference
the command must print, to the micro-credit. The command runs as a real process.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import os
import sys
from decimal import Decimal
from pathlib import Path
from zoneinfo import ZoneInfo

import aiohttp

from clipia_proxy.auth import generate_key, hash_key
from clipia_proxy.key_usage import read_snapshots
from tests.audit import start_cluster
from tests.test_ledger_audit import chat

ROOT = Path(__file__).resolve().parent.parent


async def test_reconcile_prints_what_clipia_charged_beyond_the_ledger(tmp_path: Path) -> None:
    snapshots = tmp_path / "key-usage.jsonl"
    ledger = tmp_path / "ledger.db"
    cluster = await start_cluster(
        1,
        store=f"{{backend: sqlite, sqlite_path: {ledger}}}",
        extra=(
            f"accounting: {{key_usage_snapshot_seconds: 0.1, key_usage_path: {snapshots}, "
            "timezone: Europe/Moscow}"
        ),
    )
    try:
        gateway = cluster.gateways[0]
        emulator = cluster.emulator

        async def snapshot_of(total: Decimal) -> None:
            async with asyncio.timeout(10):
                while True:
                    found = await asyncio.to_thread(read_snapshots, snapshots)
                    if found and found[-1].usage == total:
                        return
                    await asyncio.sleep(0.05)

        await snapshot_of(Decimal(0))
        for stream in (False, True, False):
            assert (await chat(gateway, stream=stream)).status == 200
        # One generation Clipia bills that never went through the gateway.
        async with (
            aiohttp.ClientSession() as session,
            session.post(
                f"{cluster.emulator_url}/v1/chat/completions",
                json={"model": "gpt-5.5", "messages": [{"role": "user", "content": "hi"}]},
                headers={"Authorization": f"Bearer {gateway.clipia_key}"},
            ) as direct,
        ):
            assert direct.status == 200
            bypass = (await direct.json())["usage"]["cost"]
        total = sum((bill.cost for bill in emulator.bills.values()), Decimal(0))
        await snapshot_of(total)
    finally:
        await cluster.stop()

    config = tmp_path / "config.yaml"
    config.write_text(
        f"store: {{backend: sqlite, sqlite_path: {ledger}}}\n"
        f"accounting: {{key_usage_path: {snapshots}, timezone: Europe/Moscow}}\n"
        "teams:\n"
        f"  - {{id: search, keys: [{{id: k, sha256: {hash_key(generate_key())}}}]}}\n"
    )
    today = dt.datetime.now(ZoneInfo("Europe/Moscow")).date().isoformat()
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "clipia_proxy",
        "reconcile",
        "--config",
        str(config),
        "--day",
        today,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
    )
    out, err = await process.communicate()
    assert process.returncode == 0, err.decode()
    lines = dict(line.split(": ", 1) for line in out.decode().splitlines())
    clipia = Decimal(lines["clipia"].split()[0])
    ledger_total = Decimal(lines["ledger"].split()[0])
    assert clipia == total
    assert ledger_total == total - Decimal(str(bypass))
    assert Decimal(lines["difference"].split()[0]) == Decimal(str(bypass)) > 0
    assert "3 request(s)" in lines["ledger"]
