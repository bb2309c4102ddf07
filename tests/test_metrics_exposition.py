"""The ``/metrics`` exposition, byte for byte, after a fixed sequence of every ``record_*`` call.

The expected texts (``tests/fixtures/metrics/``) were written by the façade on prometheus-client's
own ``Counter``/``Gauge``/``Histogram`` objects; the façade now counts in plain storage and
exposes it through a custom collector, and must still give the same series: names, HELP and
TYPE lines, labels and their order, bucket bounds, ``_sum``/``_count`` and the ``_created``
series (their timestamps are masked, then checked to lie within the test's run). Both formats
are checked: the text format and OpenMetrics, which Prometheus asks for when it scrapes.

Regenerate (only when a series is meant to change): ``CLIPIA_WRITE_GOLDEN=1 pytest <this file>``.
"""

from __future__ import annotations

import math
import os
import re
import time
from collections.abc import Callable, Iterable
from decimal import Decimal
from pathlib import Path
from typing import Final

import pytest
from prometheus_client import (
    CollectorRegistry,
    Histogram,
    disable_created_metrics,
    enable_created_metrics,
    generate_latest,
)
from prometheus_client.metrics_core import Metric
from prometheus_client.openmetrics.exposition import generate_latest as generate_openmetrics

from clipia_proxy.metrics import BudgetSnapshot, Metrics

OVERHEAD_BUCKETS: Final = (
    0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1.0,
)  # fmt: skip
"""``overhead_seconds``' bounds, as the golden text has them."""

GOLDEN: Final = Path(__file__).parent / "fixtures" / "metrics"
CHAT: Final = "/v1/chat/completions"
CREATED: Final = re.compile(r"^(\w+_created(?:\{[^}]*\})?) (\S+)$", re.MULTILINE)
SAMPLE: Final = re.compile(r"^\w+(\{.*\})? ")
LE: Final = re.compile(r'le="[^"]*",?')


def drive() -> Metrics:
    """A gateway's metrics after a fixed mix: every ``record_*`` method, several label sets."""
    catalog = {"models": frozenset({"gpt-5.5", "claude-sonnet-4-6", "claude-opus-4-8"})}
    policy = {"search": {"gpt-5.5", "claude-sonnet-4-6"}, "ops": {"gpt-5.5"}, "ci": {"gpt-5.5"}}
    metrics = Metrics(
        ["search", "ops", "ci"],
        version="1.2.3",
        catalog_age=lambda: 12.5,
        catalog_refreshes=lambda: {"success": 3, "error": 1},
        usage_sources=lambda: {"response": 5, "stream": 2},
        implausible_costs=lambda: 1,
        store_errors=lambda: {"fail_open": 2},
        counters_health=lambda: (1, 4),
        models=lambda: catalog["models"],
        allows=lambda team, model: model in policy.get(team, set()),
        environment=lambda team: "test" if team == "ci" else "live",
    )
    ended = [metrics.record_request_started(team) for team in ("search", "search", "ops", "ghost")]
    ended[0]()
    for team, model, route, code, stream, duration in (
        ("search", "gpt-5.5", CHAT, 200, False, 0.3),
        ("search", "gpt-5.5", CHAT, 200, False, 0.1),  # on a bucket bound
        ("search", "gpt-5.5", CHAT, 200, True, 42.0),
        ("search", "claude-sonnet-4-6", CHAT, 429, False, 0.0),
        ("ops", "nope", CHAT, 200, False, 1000.0),  # above the last bound: +Inf only
        ("ops", None, "/v1/models", 200, False, 0.002),
        ("ghost", "gpt-5.5", "/admin/secret", 401, False, 0.0001),
        ("ci", "gpt-5.5", CHAT, 502, True, 0.1 + 0.2),
    ):
        metrics.record_request(
            team=team, model=model, route=route, code=code, stream=stream, duration=duration
        )
    for route, seconds in ((CHAT, 0.0003), (CHAT, 0.00025), (CHAT, 2.0), ("/v1/key", 0.001)):
        metrics.record_overhead(route, seconds)
    for team, model, seconds in (("search", "gpt-5.5", 0.7), ("ops", "x", 0.05), ("ci", "", 500)):
        metrics.record_ttft(team, model, seconds)
    for team, reason in (("search", "rpm"), ("search", "rpm"), ("ghost", "auth"), ("ops", "no")):
        metrics.record_rejection(team, reason)
    for team, reason in (("ops", "budget"), ("ghost", "tpm"), ("ops", "nonsense")):
        metrics.record_shadow_rejection(team, reason)
    for team, amount in (("search", "0.5"), ("search", "0.25"), ("ops", "2"), ("ghost", "9")):
        metrics.record_reservation(team, Decimal(amount))
    for team, model, cost, prompt, completion in (
        ("search", "gpt-5.5", "0.1", 10, 20),
        ("search", "gpt-5.5", "0.2", 1, 0),
        ("search", "claude-opus-4-8", "0.3", 0, 5),  # not allowed to search: other
        ("ci", "gpt-5.5", "0.000001", 3, 3),
        ("ghost", "gpt-5.5", "1", 1, 1),
    ):
        metrics.record_settlement(
            team=team,
            model=model,
            cost=Decimal(cost),
            prompt_tokens=prompt,
            completion_tokens=completion,
        )
    metrics.record_tag_spend("search", {"project": "alpha", "owner": "me"}, Decimal("0.1"))
    metrics.record_tag_spend("search", {"project": "alpha"}, Decimal("0.2"))
    metrics.record_tag_spend("ghost", {"project": "beta"}, Decimal(1))
    for team, reason in (("search", "completed"), ("ops", "timeout"), ("ops", "weird")):
        metrics.record_stream_end(team, reason)
    for attempt in ("200", "200", "503", "connect_error"):
        metrics.record_upstream_attempt(attempt)
    for reason in ("key_echo", "key_echo", "other"):
        metrics.record_withheld(reason)
    for port in ("data", "admin", "data", "elsewhere"):
        metrics.record_connection_refused(port)
    for team, result, drift in (
        ("search", "match", "0"),
        ("search", "corrected", "-0.05"),
        ("ghost", "corrected", "0.5"),
        ("ops", "bogus", "0"),
    ):
        metrics.record_drift_check(team, result, Decimal(drift))
    metrics.record_config_reload("success")
    metrics.record_config_reload("error")
    metrics.record_config_reload("success")
    # A reload: ops goes, new comes, ci becomes live; a catalog refresh drops claude-opus-4-8.
    policy["new"] = {"claude-sonnet-4-6"}
    metrics.set_teams(["search", "ci", "new"])
    ended[2]()  # ops' request ends after its series went: nothing appears
    catalog["models"] = frozenset({"gpt-5.5", "claude-sonnet-4-6", "gpt-6"})
    policy["search"].add("gpt-6")
    metrics.set_models()
    metrics.record_settlement(
        team="new",
        model="claude-sonnet-4-6",
        cost=Decimal("0.7"),
        prompt_tokens=7,
        completion_tokens=0,
    )
    metrics.record_request(
        team="new", model="gpt-6", route=CHAT, code=200, stream=False, duration=5
    )
    snapshot = BudgetSnapshot(
        limit=Decimal(10), spent=Decimal(7), reserved=Decimal("0.5"), remaining=Decimal("2.5"),
        resets_at=1_800_000_000.0,
    )  # fmt: skip
    broke = BudgetSnapshot(
        limit=Decimal(1), spent=Decimal(2), reserved=Decimal(0), remaining=Decimal(-1),
        resets_at=None,
    )  # fmt: skip
    metrics.set_budgets({("search", "day"): snapshot, ("search", "month"): broke})
    return metrics


def canonical(text: str) -> str:
    """``text`` with each family's series sorted by their labels (``le`` aside).

    The order of a family's series is the order they were made in, which for the spend and
    token series follows set iteration, so string hashing: it differs from run to run. A
    series' own lines (buckets, ``_count``, ``_sum``) keep their order.
    """
    out: list[str] = []
    series: dict[str, list[str]] = {}
    for line in text.splitlines():
        sample = SAMPLE.match(line)
        if sample is None:
            out += [kept for _key, lines in sorted(series.items()) for kept in lines]
            series.clear()
            out.append(line)
        else:
            series.setdefault(LE.sub("", sample.group(1) or ""), []).append(line)
    out += [kept for _key, lines in sorted(series.items()) for kept in lines]
    return "".join(line + "\n" for line in out)


def masked(text: str, since: float, until: float) -> str:
    """``text`` with every ``_created`` value replaced by ``CREATED``, each checked in range."""
    for match in CREATED.finditer(text):
        assert since <= float(match.group(2)) <= until, match.group(0)
    return CREATED.sub(r"\1 CREATED", text)


@pytest.mark.parametrize(
    ("generate", "golden"),
    [(generate_latest, "exposition.txt"), (generate_openmetrics, "exposition.openmetrics.txt")],
)
def test_the_exposition_equals_the_golden_text(
    generate: Callable[[CollectorRegistry], bytes], golden: str
) -> None:
    since = time.time()
    metrics = drive()
    until = time.time()
    text = canonical(masked(generate(metrics.registry).decode(), since, until))
    path = GOLDEN / golden
    if os.environ.get("CLIPIA_WRITE_GOLDEN"):
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text, encoding="utf-8")
    assert text == path.read_text(encoding="utf-8")


def test_created_series_follow_prometheus_clients_switch() -> None:
    """``disable_created_metrics()`` (or PROMETHEUS_DISABLE_CREATED_SERIES) drops them here too."""
    metrics = drive()
    before = generate_latest(metrics.registry).decode()
    assert "_created" in before
    disable_created_metrics()  # type: ignore[no-untyped-call]
    try:
        without = generate_latest(metrics.registry).decode()
    finally:
        enable_created_metrics()  # type: ignore[no-untyped-call]
    assert "_created" not in without
    expected = "".join(
        line + "\n"
        for line in before.splitlines()
        if not re.match(r"^(# \w+ )?\w+_created\b", line)
    )
    assert without == expected


def test_histogram_buckets_equal_prometheus_clients_for_values_on_and_around_each_bound() -> None:
    """The bisection puts each value in the bucket prometheus-client's own Histogram would."""
    metrics = Metrics([], version="test")
    reference = Histogram(
        "clipia_proxy_overhead_seconds", "", ["route"], buckets=OVERHEAD_BUCKETS, registry=None
    )
    values = [-1.0, 0.0, 5e-324, 1e9, math.inf]
    for bound in OVERHEAD_BUCKETS:
        values += [bound, math.nextafter(bound, 0.0), math.nextafter(bound, math.inf)]
    for value in values:
        metrics.record_overhead(CHAT, value)
        reference.labels(CHAT).observe(value)

    def samples(families: Iterable[Metric]) -> list[tuple[str, dict[str, str], float]]:
        return [
            (sample.name, sample.labels, sample.value)
            for family in families
            if family.name == "clipia_proxy_overhead_seconds"
            for sample in family.samples
            if not sample.name.endswith("_created")
        ]

    assert samples(metrics.registry.collect()) == samples(reference.collect())


def test_a_negative_amount_is_refused_as_prometheus_client_refuses_it() -> None:
    metrics = Metrics(["search"], version="test")
    with pytest.raises(ValueError, match="non-negative"):
        metrics.record_tag_spend("search", {"project": "alpha"}, Decimal(-1))
