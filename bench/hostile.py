r"""Hostile bodies against the event loop: another team's latency while big ``\u`` bodies parse.

One gateway (``clipia-proxy serve``, its default SQLite store) in front of the emulator, two
teams. Team ``victim`` sends ``GET /v1/models`` one after another; its latency is measured
idle, then while team ``hostile`` keeps ``--bodies`` requests in flight, each a
``--body-mb`` MB chat body whose content is nothing but ``\uXXXX`` escapes (colons among
them, the duplicate-key check's case) naming a model the team may not use, so every one is
parsed and refused with nothing sent upstream. The report is the victim's p50 and max,
idle and under the hostile load, and their ratio; ``--rounds`` alternates the two phases.

    python -m bench.hostile                    # 3 rounds, 4 bodies of 4 MB
    python -m bench.hostile --gateway-tree /tmp/old   # the same against another checkout

``--hostile-rpm N`` gives the hostile team an RPM limit (refused bodies count against it, so
past N the gateway refuses before reading a body). Timing only; nothing here is asserted.
"""

from __future__ import annotations

import argparse
import asyncio
import multiprocessing
import multiprocessing.queues
import multiprocessing.synchronize
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

import aiohttp
import msgspec
import yaml

from bench.procs import HOST, Child, child_env, free_ports, python, wait_ready
from clipia_proxy.auth import generate_key, hash_key


def hostile_body(megabytes: float) -> bytes:
    r"""A chat body of about ``megabytes`` MB, its content all ``\u`` escapes."""
    unit = "\\u003a\\u0041\\u00e9\\u4e2d"  # ':' 'A' 'é' '中', each escaped
    count = int(megabytes * 1_000_000) // len(unit)
    content = unit * count
    return (
        '{"model":"not-allowed-model","messages":[{"role":"user","content":"' + content + '"}]}'
    ).encode()


def gateway_config(
    *, port: int, admin_port: int, emulator_port: int, keys: dict[str, str], rpm: int | None
) -> str:
    hostile: dict[str, object] = {
        "id": "hostile",
        "keys": [{"id": "h", "sha256": hash_key(keys["hostile"])}],
        "models": {"allow": ["gpt-5.5"]},
    }
    if rpm is not None:
        hostile["limits"] = {"rpm": rpm}
    victim = {
        "id": "victim",
        "keys": [{"id": "v", "sha256": hash_key(keys["victim"])}],
        "models": {"allow": ["*"]},
    }
    config = {
        "server": {"host": HOST, "port": port, "admin_port": admin_port},
        "upstream": {
            "base_url": f"http://{HOST}:{emulator_port}/v1",
            "api_key_env": "CLIPIA_API_KEY",
        },
        "auth": {"mode": "keys"},
        "teams": [victim, hostile],
    }
    return yaml.safe_dump(config, sort_keys=False)


async def probe(session: aiohttp.ClientSession, url: str, key: str, count: int) -> list[float]:
    """``count`` sequential ``GET /v1/models``; their latencies in seconds."""
    latencies: list[float] = []
    headers = {"Authorization": f"Bearer {key}"}
    for _ in range(count):
        started = time.perf_counter()
        async with session.get(url, headers=headers) as response:
            await response.read()
            if response.status != 200:
                raise RuntimeError(f"victim got {response.status}")
        latencies.append(time.perf_counter() - started)
        await asyncio.sleep(0.01)
    return latencies


async def flood(
    url: str,
    key: str,
    body: bytes,
    bodies: int,
    stop: multiprocessing.synchronize.Event,
    ready: multiprocessing.synchronize.Event,
) -> dict[int, int]:
    """Keep ``bodies`` posts of ``body`` in flight until ``stop``; count answers by status.

    ``ready`` is set once the first answer came back (the flood is on).
    """
    statuses: dict[int, int] = {}
    headers = {"Authorization": f"Bearer {key}", "Content-Type": "application/json"}

    async def one(session: aiohttp.ClientSession) -> None:
        while not stop.is_set():
            try:
                async with session.post(url, headers=headers, data=body) as response:
                    await response.read()
                    statuses[response.status] = statuses.get(response.status, 0) + 1
                ready.set()
            except aiohttp.ClientError:  # refused before the body was read: closed under us
                statuses[0] = statuses.get(0, 0) + 1

    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=120)) as session:
        await asyncio.gather(*(one(session) for _ in range(bodies)))
    return statuses


def _flood_process(
    url: str,
    key: str,
    megabytes: float,
    bodies: int,
    stop: multiprocessing.synchronize.Event,
    ready: multiprocessing.synchronize.Event,
    results: multiprocessing.queues.Queue[dict[int, int]],
) -> None:
    """The hostile client, in its own process (its work must not slow the victim's client)."""
    results.put(asyncio.run(flood(url, key, hostile_body(megabytes), bodies, stop, ready)))


def summary(latencies: list[float]) -> dict[str, float]:
    return {
        "p50_ms": round(statistics.median(latencies) * 1000, 2),
        "max_ms": round(max(latencies) * 1000, 2),
    }


async def run(args: argparse.Namespace) -> dict[str, object]:
    emulator_port, port, admin_port = free_ports(3)
    keys = {"victim": generate_key(), "hostile": generate_key()}
    body = hostile_body(args.body_mb)
    with tempfile.TemporaryDirectory(prefix="clipia-hostile-") as tmp_name:
        tmp = Path(tmp_name)
        (tmp / "gateway.yaml").write_text(
            gateway_config(
                port=port,
                admin_port=admin_port,
                emulator_port=emulator_port,
                keys=keys,
                rpm=args.hostile_rpm,
            )
        )
        gateway_env = child_env({"CLIPIA_API_KEY": "clipia_test_hostile" + os.urandom(8).hex()})
        if args.gateway_tree:
            gateway_env["PYTHONPATH"] = args.gateway_tree
        children = [
            Child(
                "emulator",
                [python(), "-m", "bench.emulator", "--port", str(emulator_port)],
                env=child_env(),
                log_path=tmp / "emulator.log",
                cwd=tmp,
            )
        ]
        try:
            async with aiohttp.ClientSession(
                connector=aiohttp.TCPConnector(limit=64),
                timeout=aiohttp.ClientTimeout(total=120),
            ) as session:
                await wait_ready(
                    session, children[0], f"http://{HOST}:{emulator_port}/v1/models", within=30
                )
                gateway = Child(
                    "gateway",
                    [
                        python(),
                        "-m",
                        "clipia_proxy",
                        "serve",
                        "--config",
                        str(tmp / "gateway.yaml"),
                        "--log-level",
                        "WARNING",
                    ],
                    env=gateway_env,
                    log_path=tmp / "gateway.log",
                    cwd=tmp,
                )
                children.append(gateway)
                await wait_ready(session, gateway, f"http://{HOST}:{admin_port}/readyz", within=60)
                root = f"http://{HOST}:{port}/v1"
                for _ in range(600):  # the data port listens after the admin port
                    try:
                        await probe(session, root + "/models", keys["victim"], 1)
                        break
                    except aiohttp.ClientConnectorError:
                        await asyncio.sleep(0.1)
                await probe(session, root + "/models", keys["victim"], 20)  # warm-up
                rounds: list[dict[str, object]] = []
                for _ in range(args.rounds):
                    idle = await probe(session, root + "/models", keys["victim"], args.probes)
                    context = multiprocessing.get_context("spawn")
                    stop, ready = context.Event(), context.Event()
                    results: multiprocessing.queues.Queue[dict[int, int]] = context.Queue()
                    cpu_before = gateway.cpu_seconds()
                    hostile = context.Process(
                        target=_flood_process,
                        args=(
                            root + "/chat/completions",
                            keys["hostile"],
                            args.body_mb,
                            args.bodies,
                            stop,
                            ready,
                            results,
                        ),
                    )
                    hostile.start()
                    if not await asyncio.to_thread(ready.wait, 120):
                        raise RuntimeError("the hostile client never got an answer")
                    await asyncio.sleep(0.2)  # all its bodies are in flight
                    try:
                        loaded = await probe(session, root + "/models", keys["victim"], args.probes)
                    finally:
                        stop.set()
                        statuses = await asyncio.to_thread(results.get, True, 120)
                        await asyncio.to_thread(hostile.join, 30)
                    hostile_requests = sum(statuses.values())
                    cpu = gateway.cpu_seconds() - cpu_before
                    idle_s, loaded_s = summary(idle), summary(loaded)
                    rounds.append(
                        {
                            "idle": idle_s,
                            "hostile": loaded_s,
                            "p50_ratio": round(loaded_s["p50_ms"] / idle_s["p50_ms"], 1),
                            "max_ratio": round(loaded_s["max_ms"] / idle_s["max_ms"], 1),
                            "hostile_answers": {str(k): v for k, v in sorted(statuses.items())},
                            "gateway_cpu_ms_per_hostile_body": round(
                                cpu * 1000 / max(hostile_requests, 1), 1
                            ),
                        }
                    )
        finally:
            for child in reversed(children):
                child.stop()
    return {
        "body_bytes": len(body),
        "bodies_in_flight": args.bodies,
        "probes_per_phase": args.probes,
        "hostile_rpm": args.hostile_rpm,
        "gateway_tree": args.gateway_tree,
        "rounds": rounds,
    }


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.hostile", description=__doc__)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--bodies", type=int, default=4, help="hostile bodies in flight")
    parser.add_argument("--body-mb", type=float, default=4.0)
    parser.add_argument("--probes", type=int, default=100, help="victim requests per phase")
    parser.add_argument("--hostile-rpm", type=int, default=None)
    parser.add_argument(
        "--gateway-tree", default=None, help="run the gateway from this checkout instead"
    )
    args = parser.parse_args(argv)
    if args.gateway_tree:
        args.gateway_tree = str(Path(args.gateway_tree).resolve())
    report = asyncio.run(run(args))
    print(msgspec.json.format(msgspec.json.encode(report), indent=2).decode())
    return 0


if __name__ == "__main__":
    sys.exit(main())
