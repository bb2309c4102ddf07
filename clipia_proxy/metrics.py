"""Prometheus metrics: every metric of docs/architecture.md §5.6, defined once; a registry per app.

Label values come only from the config (teams), the catalog (models) and small enums; anything
else is ``other`` (models) or ``unknown`` (teams), so no request can create a new series. Known
series exist from start-up. State gauges (budgets, catalog age) and counters owned by other
modules (catalog refreshes, usage sources) are read by a custom collector during the scrape,
from in-memory snapshots only — a scrape never does I/O. Budget snapshots are refreshed by a
background loop (``refresh_budgets``) from the store, so with Redis every replica reports the
same shared values (dashboards aggregate them with ``max by (team)``).

Storage. The ``record_*`` methods count in plain Python: each metric (:class:`_Family`) keeps a
dict from its label values to a list of floats (a counter's or gauge's value; a histogram's
bucket counts, found with :func:`bisect.bisect_left` over the bounds, then its sum), plus when
each series was made. A custom collector (prometheus-client's public ``Collector`` and
``*MetricFamily`` classes) turns them into the same exposition prometheus-client's own
``Counter``/``Gauge``/``Histogram`` gave: names, HELP and TYPE, labels, buckets (cumulative),
``_count``/``_sum`` and ``_created`` series (left out when prometheus-client leaves out its own:
``PROMETHEUS_DISABLE_CREATED_SERIES`` or ``disable_created_metrics()``).
``tests/test_metrics_exposition.py`` holds the exposition written by those objects. A write is
a dict lookup and a float addition: no lock, no per-write checks.

Threads. Everything here runs on the event loop's thread. The recorders are request handlers
and middleware, the drift checker's and the config watcher's tasks, the connection-cap
callbacks of the listening servers and the upstream client's per-attempt hook, all on the
loop. The SQLite stores work on worker threads (``quotas/sqlite.py``'s own thread,
``asyncio.to_thread`` in ``ledgers/sqlite.py``) but hand their results back to the loop and
record nothing there. ``/metrics`` is collected by prometheus-client's aiohttp handler,
synchronously, on the loop too. So a write and a scrape never overlap. Should a scrape still
run on another thread, the collector copies each dict with ``list(d.items())`` first (one C
call, during which no other Python code runs), so it can never fail on a dict changing size
underneath it; a series read that way may be one write behind.
"""

from __future__ import annotations

import logging
import math
import time
from bisect import bisect_left
from collections.abc import Callable, Iterable, Iterator, Mapping
from decimal import Decimal
from itertools import accumulate
from typing import Final, Literal

from prometheus_client import CollectorRegistry, Counter
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.registry import Collector

__all__ = ["DRIFT_RESULTS", "PORTS", "REJECTION_REASONS", "Metrics"]

_LOGGER: Final = logging.getLogger(__name__)
PREFIX: Final = "clipia_proxy_"

REJECTION_REASONS: Final = (
    "budget",
    "rpm",
    "tpm",
    "concurrency",
    "model_not_allowed",
    "model_not_found",
    "cap",
    "auth",
    "bad_request",
    "store_unavailable",
    "overloaded",
)
STREAM_REASONS: Final = ("completed", "client_disconnect", "upstream_error", "timeout")
WITHHELD_REASONS: Final = ("key_echo", "invalid_response")
PORTS: Final = ("data", "admin")
DRIFT_RESULTS: Final = ("match", "corrected", "unavailable")
"""``match``: the ledger had Clipia's cost; ``corrected``: it did not and now does;
``unavailable``: ``/v1/generation`` did not answer (tried again later is not done)."""
_TOKEN_TYPES: Final = ("prompt", "completion")
# The headroom's "typical request": a moving average of the team's reservations, each new one
# weighing this much (about the last 20 requests count).
_TYPICAL_WEIGHT: Final = 0.1
ROUTES: Final = frozenset(
    {
        "/v1/chat/completions",
        "/v1/models",
        "/v1/models/{model_id}",
        "/v1/key",
        "/v1/generation",
        "/mcp",
    }
)

# Buckets, and why: LLM calls take from ~100 ms to minutes (reasoning, long outputs).
_DURATION_BUCKETS: Final = (0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 20, 30, 60, 120, 300, 600)
# Time to first token: interactive (0.1-2 s) to slow reasoning starts (tens of seconds).
_TTFT_BUCKETS: Final = (0.05, 0.1, 0.25, 0.5, 1, 2, 3, 5, 10, 20, 30, 60, 120)
# Overhead the gateway adds: target below 0.5 ms; store stalls show up in the upper buckets.
_OVERHEAD_BUCKETS: Final = (
    0.0001,
    0.00025,
    0.0005,
    0.001,
    0.0025,
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    1.0,
)


class BudgetSnapshot:
    """One team period's budget numbers in credits, as last read from the store."""

    __slots__ = ("limit", "remaining", "reserved", "resets_at", "spent")

    def __init__(
        self,
        *,
        limit: Decimal,
        spent: Decimal,
        reserved: Decimal,
        remaining: Decimal,
        resets_at: float | None,
    ) -> None:
        self.limit, self.spent, self.reserved = limit, spent, reserved
        self.remaining, self.resets_at = remaining, resets_at


class _StateCollector(Collector):
    """Gauges and foreign counters read at scrape time, from memory only."""

    def __init__(self, metrics: Metrics) -> None:
        self._source = metrics

    def collect(self) -> Iterator[Metric]:
        metrics = self._source
        families = {
            key: GaugeMetricFamily(PREFIX + name, documentation, labels=["team", "period"])
            for key, name, documentation in _BUDGET_GAUGES
        }
        for (team, period), snap in sorted(metrics.budgets.items()):
            labels = [team, period]
            families["limit"].add_metric(labels, float(snap.limit))
            families["spent"].add_metric(labels, float(snap.spent))
            families["reserved"].add_metric(labels, float(snap.reserved))
            families["remaining"].add_metric(labels, float(snap.remaining))
            if snap.resets_at is not None:
                families["resets"].add_metric(labels, snap.resets_at)
            typical = metrics.typical_reservation.get(team)
            if typical:
                families["headroom"].add_metric(labels, max(float(snap.remaining), 0.0) / typical)
        yield from families.values()
        age = metrics.catalog_age()
        yield GaugeMetricFamily(
            PREFIX + "catalog_age_seconds",
            "Age of the cached model catalog (-1: never loaded).",
            value=-1.0 if age is None else age,
        )
        yield _counters(
            "catalog_refreshes",
            "Catalog refreshes by result.",
            "result",
            sorted(metrics.catalog_refreshes().items()),
        )
        sources = metrics.usage_sources()
        yield _counters(
            "usage_source",
            "Settled requests by where their cost came from.",
            "source",
            [(source, sources.get(source, 0)) for source in _USAGE_SOURCES],
        )
        yield _counters(
            "upstream_cost_implausible",
            "Upstream costs not believed (over the reservation and 2x tokens x prices).",
            None,
            [("", metrics.implausible_costs())],
        )
        errors = metrics.store_errors()
        yield _counters(
            "store_errors",
            "Quota store failures, by what store.on_error made of them.",
            "on_error",
            [(kind, errors.get(kind, 0)) for kind in ("fail_closed", "fail_open")],
        )
        unsafe, rebuilds = metrics.counters_health()
        yield GaugeMetricFamily(
            PREFIX + "store_unsafe_settings",
            "Redis settings that can lose counters (maxmemory-policy other than noeviction, "
            "no persistence); 0 when safe or not Redis.",
            value=unsafe,
        )
        yield _counters(
            "store_counter_rebuilds",
            "Times this replica rebuilt the Redis counters from the ledger (Redis lost them).",
            None,
            [("", rebuilds)],
        )


_BUDGET_GAUGES: Final = (
    ("limit", "budget_limit_credits", "Budget of the period, in credits."),
    ("spent", "budget_spent_credits", "Settled spend in the current period, in credits."),
    ("reserved", "budget_reserved_credits", "Reservations of requests in flight, in credits."),
    ("remaining", "budget_remaining_credits", "Budget left in the current period, in credits."),
    ("resets", "budget_reset_timestamp_seconds", "When the current period ends (Unix time)."),
    (
        "headroom",
        "budget_headroom_requests",
        "How many more typical requests of the team the remaining budget admits "
        "(remaining credits / the average reservation of its recent requests); "
        "below 1, its next typical request is refused with 402.",
    ),
)
"""(key, name, help) of the per (team, period) budget gauges, in exposition order."""
_USAGE_SOURCES: Final = ("response", "stream", "generation", "counted", "reserved")


def _counters(
    name: str, documentation: str, label: str | None, counts: Iterable[tuple[str, float]]
) -> CounterMetricFamily:
    """A counter family read at scrape time: one series per (label value, count).

    Without a ``label``, ``counts`` holds the one series' count (its label value unused).
    """
    family = CounterMetricFamily(
        PREFIX + name, documentation, labels=[label] if label is not None else None
    )
    for value, count in counts:
        family.add_metric([value] if label is not None else [], count)
    return family


_Kind = Literal["counter", "gauge", "histogram"]
_CREATED_PROBE: Final = Counter("created_probe", "", registry=None)
"""Never registered: whether its scrape holds ``_created`` tells whether prometheus-client writes
``_created`` series (the environment or ``disable_created_metrics()`` may turn them off)."""


def _created_series() -> bool:
    """Whether prometheus-client writes ``_created`` series just now (checked at each scrape)."""
    return any(s.name.endswith("_created") for m in _CREATED_PROBE.collect() for s in m.samples)


class _Family:
    """One metric's series in plain storage: label values -> values (see the module docstring).

    A series is a list of floats: ``[value]`` for a counter or gauge; for a histogram one count
    per bucket (not cumulative; the last bucket is ``+Inf``) and then the sum.
    """

    __slots__ = ("bounds", "created", "documentation", "kind", "labels", "les", "name", "series")

    def __init__(
        self, kind: _Kind, name: str, documentation: str, labels: str, bounds: Iterable[float] = ()
    ) -> None:
        self.kind: Final = kind
        self.name: Final = PREFIX + name
        self.documentation: Final = documentation
        self.labels: Final = labels.split()
        self.bounds: Final = (*map(float, bounds), math.inf) if kind == "histogram" else ()
        self.les: Final = [repr(b) if b != math.inf else "+Inf" for b in self.bounds]
        """The ``le`` label of each bucket, as prometheus-client writes it (for bounds below
        10^7: it writes larger ones in Go's exponent form, ``1e+07``)."""
        self.series: Final[dict[tuple[str, ...], list[float]]] = {}
        self.created: Final[dict[tuple[str, ...], float]] = {}
        """When each series was made (Unix time): its ``_created`` sample."""

    def make(self, key: tuple[str, ...]) -> list[float]:
        """Return the series of ``key``, made at 0 if it is new."""
        cell = self.series.get(key)
        if cell is None:
            cell = self.series[key] = [0.0] * (len(self.bounds) + 1)
            self.created[key] = time.time()
        return cell

    def remove(self, key: tuple[str, ...]) -> None:
        """Drop the series of ``key`` (a later write makes it again, from 0)."""
        self.series.pop(key, None)
        self.created.pop(key, None)

    def inc(self, key: tuple[str, ...]) -> None:
        """Add 1 to a counter's series."""
        try:
            self.series[key][0] += 1.0
        except KeyError:
            self.make(key)[0] += 1.0

    def add(self, key: tuple[str, ...], amount: float) -> None:
        """Add ``amount`` (never negative, as prometheus-client's ``inc``) to a counter's series."""
        if amount < 0:
            raise ValueError("Counters can only be incremented by non-negative amounts.")
        try:
            self.series[key][0] += amount
        except KeyError:
            self.make(key)[0] += amount

    def observe(self, key: tuple[str, ...], amount: float) -> None:
        """Count ``amount`` in a histogram's series: its bucket (``amount <= bound``), its sum."""
        try:
            cell = self.series[key]
        except KeyError:
            cell = self.make(key)
        cell[bisect_left(self.bounds, amount)] += 1.0
        cell[-1] += amount

    def collect(self, created: bool) -> Metric:
        """This metric as a prometheus-client metric family (with ``_created`` if ``created``)."""
        series = list(self.series.items())  # first, in one C call (see the module docstring)
        made = self.created.copy()
        if self.kind == "gauge":
            gauge = GaugeMetricFamily(self.name, self.documentation, labels=self.labels)
            for key, cell in series:
                gauge.add_metric(key, cell[0])
            return gauge
        if self.kind == "counter":
            counter = CounterMetricFamily(self.name, self.documentation, labels=self.labels)
            for key, cell in series:
                counter.add_metric(key, cell[0], created=made.get(key) if created else None)
            return counter
        histogram = HistogramMetricFamily(self.name, self.documentation, labels=self.labels)
        for key, cell in series:
            *counts, total = cell  # one C call
            histogram.add_metric(key, list(zip(self.les, accumulate(counts), strict=True)), total)
            if created and key in made:
                histogram.add_sample(
                    self.name + "_created", dict(zip(self.labels, key, strict=True)), made[key]
                )
        return histogram


class _Recorded(Collector):
    """The façade's own metrics, in the order they were defined, then ``build_info``."""

    def __init__(self, families: list[_Family], version: str) -> None:
        self._families = families
        self._version = version

    def collect(self) -> Iterator[Metric]:
        created = _created_series()
        for family in self._families:
            yield family.collect(created)
        build_info = GaugeMetricFamily(
            PREFIX + "build_info", "Always 1; the version is a label.", labels=["version"]
        )
        build_info.add_metric([self._version], 1.0)
        yield build_info


class Metrics:
    """The gateway's metrics façade: the ``record_*`` methods are the only way to record.

    The metrics are private: callers say what happened (a request answered, a settlement, a
    stream's end) and the façade picks the series and bounds every label. Each write is a
    lookup by label tuple in plain storage (every label value is bounded, see the module
    docstring); a custom collector exposes it through prometheus-client's public API.

    Spend and token series exist at 0 before their first request, for every team and every
    catalog model its policy allows (plus ``other``), so that Prometheus' ``increase()`` also
    counts a series' first request. They follow reloads (``set_teams``) and catalog refreshes
    (``set_models``): new pairs appear at 0, pairs no longer possible are removed.
    """

    def __init__(
        self,
        teams: Iterable[str],
        *,
        version: str,
        catalog_age: Callable[[], float | None] = lambda: None,
        catalog_refreshes: Callable[[], Mapping[str, int]] = dict,
        usage_sources: Callable[[], Mapping[str, int]] = dict,
        implausible_costs: Callable[[], int] = lambda: 0,
        store_errors: Callable[[], Mapping[str, int]] = dict,
        counters_health: Callable[[], tuple[int, int]] = lambda: (0, 0),
        models: Callable[[], frozenset[str]] = frozenset,
        allows: Callable[[str, str], bool] = lambda team, model: True,
        environment: Callable[[str], str] = lambda team: "live",
    ) -> None:
        """Build every metric; the callables are read at scrape or settlement time.

        ``models`` returns the catalog's chat model ids; ``allows(team, model)`` the policy;
        ``environment(team)`` is ``live``, or ``test`` for a sandbox team.
        """
        self.registry: Final = CollectorRegistry(auto_describe=True)
        self.catalog_age = catalog_age
        self.catalog_refreshes = catalog_refreshes
        self.usage_sources = usage_sources
        self.implausible_costs = implausible_costs
        self.store_errors = store_errors
        self.counters_health = counters_health
        """(unsafe Redis settings, counter rebuilds from the ledger), read at scrape time."""
        self._catalog_models = models
        self._allows = allows
        self._environment = environment
        self._teams: frozenset[str] = frozenset()
        self._settlement_pairs: frozenset[tuple[str, str, str]] = frozenset()
        """(team, model, environment) whose spend and token series exist."""
        self.typical_reservation: dict[str, float] = {}
        """team -> moving average of its requests' reservations, in credits (headroom)."""
        self.budgets: dict[tuple[str, str], BudgetSnapshot] = {}
        """(team, period) -> numbers; replaced by ``set_budgets``."""
        families: list[_Family] = []

        def define(
            kind: _Kind, name: str, documentation: str, labels: str, bounds: Iterable[float] = ()
        ) -> _Family:
            families.append(_Family(kind, name, documentation, labels, bounds))
            return families[-1]

        self._tag_spend: Final = define(
            "counter",
            "tag_spend_credits",
            "Settled spend per declared tag value (attribution.tags.*.metric), in credits.",
            "team tag value",
        )
        self._requests: Final = define(
            "counter", "requests", "Requests answered, by HTTP status.", "team model route code"
        )
        self._request_duration: Final = define(
            "histogram",
            "request_duration_seconds",
            "Time from request received to response end (streams: the whole stream).",
            "team route stream",
            _DURATION_BUCKETS,
        )
        self._ttft: Final = define(
            "histogram",
            "time_to_first_token_seconds",
            "Time from request received to the first upstream byte relayed.",
            "team model",
            _TTFT_BUCKETS,
        )
        self._overhead: Final = define(
            "histogram",
            "overhead_seconds",
            "Time the gateway itself added: before the upstream request and after its end.",
            "route",
            _OVERHEAD_BUCKETS,
        )
        self._spend: Final = define(
            "counter", "spend_credits", "Settled spend, in credits.", "team model environment"
        )
        self._tokens: Final = define(
            "counter", "tokens", "Settled tokens.", "team model environment type"
        )
        self._rejections: Final = define(
            "counter",
            "rejections",
            "Requests refused before the upstream, by reason.",
            "team reason",
        )
        self._would_reject: Final = define(
            "counter",
            "shadow_would_reject",
            "Requests of shadow teams that limits would have refused.",
            "team reason",
        )
        self._inflight: Final = define(
            "gauge", "inflight_requests", "Requests being served.", "team"
        )
        self._stream_terminations: Final = define(
            "counter", "stream_terminations", "Streams by how they ended.", "team reason"
        )
        self._upstream_requests: Final = define(
            "counter",
            "upstream_requests",
            "Requests sent to Clipia (every attempt), by its status or error kind.",
            "code",
        )
        self._withheld: Final = define(
            "counter",
            "upstream_answers_withheld",
            "Upstream answers (or relayed headers) withheld from the client, by reason.",
            "reason",
        )
        self._connections_refused: Final = define(
            "counter",
            "connections_refused",
            "Connections refused at the port's cap (503 overloaded, then closed), by port.",
            "port",
        )
        self._config_reloads: Final = define(
            "counter", "config_reloads", "Config reloads by result.", "result"
        )
        self._drift_checks: Final = define(
            "counter",
            "drift_checks",
            "Settled requests checked against GET /v1/generation, by result.",
            "result",
        )
        self._cost_drift: Final = define(
            "counter",
            "cost_drift_credits",
            "Credits the drift check moved in the ledger (absolute difference, per team).",
            "team",
        )
        for family, values in (
            (self._withheld, WITHHELD_REASONS),
            (self._connections_refused, PORTS),
            (self._config_reloads, ("success", "error")),
            (self._drift_checks, DRIFT_RESULTS),
        ):
            for value in values:
                family.make((value,))
        self.registry.register(_Recorded(families, version))
        self.registry.register(_StateCollector(self))
        self.set_teams(teams)

    # -- label bounding ---------------------------------------------------------------------
    # A team label is a configured id, else ``unknown``; a model label a catalog chat id, else
    # ``other``; a route label one of ``ROUTES``, else ``other``; an environment ``test`` or
    # ``live``. The per-request recorders apply these rules inline: a method call per label
    # cost more than the write itself.
    def team(self, team: str | None) -> str:
        """Return the label for a team: configured ids only, else ``unknown``."""
        return team if team in self._teams else "unknown"

    # -- state changes ----------------------------------------------------------------------
    def set_teams(self, teams: Iterable[str]) -> None:
        """Install the team list (start-up, reload); dropped teams' series are removed.

        Every configured team has its in-flight, rejection and stream series at 0, and its
        spend and token series for each model its policy allows.
        """
        new = frozenset(teams)
        for gone in self._teams - new:
            for family, key in self._team_series(gone):
                family.remove(key)
            self.typical_reservation.pop(gone, None)
            self.budgets = {k: v for k, v in self.budgets.items() if k[0] != gone}
        self._teams = new
        for team in sorted(new):
            for family, key in self._team_series(team):
                if family is not self._would_reject:
                    family.make(key)
        self._sync_settlement_series()

    def set_models(self) -> None:
        """The catalog's chat models changed: make (and drop) spend and token series."""
        self._sync_settlement_series()

    def set_budgets(self, budgets: dict[tuple[str, str], BudgetSnapshot]) -> None:
        """Replace the budget snapshot read at scrape time."""
        self.budgets = budgets

    def _team_series(self, team: str) -> list[tuple[_Family, tuple[str, ...]]]:
        """Every series of ``team`` outside spend and tokens."""
        series: list[tuple[_Family, tuple[str, ...]]] = [(self._inflight, (team,))]
        for reason in REJECTION_REASONS:
            series += [(self._rejections, (team, reason)), (self._would_reject, (team, reason))]
        series += [(self._stream_terminations, (team, reason)) for reason in STREAM_REASONS]
        return series

    def _sync_settlement_series(self) -> None:
        models = self._catalog_models()
        wanted = frozenset(
            (team, model, self._environment_label(team))
            for team in self._teams
            for model in (*models, "other")
            if model == "other" or self._allows(team, model)
        )
        for labels in self._settlement_pairs - wanted:
            self._spend.remove(labels)
            for kind in _TOKEN_TYPES:
                self._tokens.remove((*labels, kind))
        for labels in wanted - self._settlement_pairs:
            self._spend.make(labels)
            for kind in _TOKEN_TYPES:
                self._tokens.make((*labels, kind))
        self._settlement_pairs = wanted

    # -- recording --------------------------------------------------------------------------
    def record_request_started(self, team: str) -> Callable[[], None]:
        """Count a request in flight; return what records its end.

        The returned function writes the same series even if a reload removed the team
        meanwhile (looking it up again would make a new series at -1); a removed series is no
        longer exposed.
        """
        cell = self._inflight.make((team if team in self._teams else "unknown",))
        cell[0] += 1.0

        def end() -> None:
            cell[0] -= 1.0

        return end

    def record_request(
        self,
        *,
        team: str,
        model: str | None,
        route: str,
        code: int,
        stream: bool,
        duration: float,
    ) -> None:
        """Count one answered request and its duration."""
        team_label = team if team in self._teams else "unknown"
        route_label = route if route in ROUTES else "other"
        model_label = model if model is not None and model in self._catalog_models() else "other"
        self._requests.inc((team_label, model_label, route_label, str(code)))
        self._request_duration.observe(
            (team_label, route_label, "true" if stream else "false"), duration
        )

    def record_overhead(self, route: str, seconds: float) -> None:
        """Observe the time the gateway itself added to a request sent upstream."""
        self._overhead.observe((route if route in ROUTES else "other",), seconds)

    def record_ttft(self, team: str, model: str, seconds: float) -> None:
        """Observe a request's time to its first upstream byte."""
        team_label = team if team in self._teams else "unknown"
        model_label = model if model in self._catalog_models() else "other"
        self._ttft.observe((team_label, model_label), seconds)

    def record_rejection(self, team: str, reason: str) -> None:
        """Count a request refused before the upstream."""
        if reason in REJECTION_REASONS:
            self._rejections.inc((self.team(team), reason))

    def record_shadow_rejection(self, team: str, reason: str) -> None:
        """Count a shadow team's request that its limits would have refused."""
        if reason in REJECTION_REASONS:
            self._would_reject.inc((self.team(team), reason))

    def record_reservation(self, team: str, amount: Decimal) -> None:
        """Note a request's worst-case cost (credits), admitted or not, for the headroom."""
        if team not in self._teams:
            return
        value = float(amount)
        typical = self.typical_reservation.get(team)
        self.typical_reservation[team] = (
            value if typical is None else typical + _TYPICAL_WEIGHT * (value - typical)
        )

    def record_settlement(
        self,
        *,
        team: str,
        model: str,
        cost: Decimal,
        prompt_tokens: int,
        completion_tokens: int,
    ) -> None:
        """Count settled spend and tokens (labelled with the team's environment)."""
        team_label = team if team in self._teams else "unknown"
        model_label = model if model in self._catalog_models() else "other"
        environment = "test" if self._environment(team) == "test" else "live"
        self._spend.add((team_label, model_label, environment), float(cost))
        if prompt_tokens:
            self._tokens.add((team_label, model_label, environment, "prompt"), prompt_tokens)
        if completion_tokens:
            self._tokens.add(
                (team_label, model_label, environment, "completion"), completion_tokens
            )

    def record_tag_spend(self, team: str, tags: Mapping[str, str], cost: Decimal) -> None:
        """Count settled spend per metric tag (names and values bounded by the config)."""
        team_label, amount = self.team(team), float(cost)
        for name, value in tags.items():
            self._tag_spend.add((team_label, name, value), amount)

    def _environment_label(self, team: str) -> str:
        """``test`` for a sandbox team, else ``live`` (two values: bounded)."""
        return "test" if self._environment(team) == "test" else "live"

    def record_stream_end(self, team: str, reason: str) -> None:
        """Count a stream by how it ended (one of ``STREAM_REASONS``)."""
        if reason in STREAM_REASONS:
            team_label = team if team in self._teams else "unknown"
            self._stream_terminations.inc((team_label, reason))

    def record_upstream_attempt(self, code: str) -> None:
        """Count one attempt against Clipia: its status, or an error kind (bounded by caller)."""
        self._upstream_requests.inc((code,))

    def record_withheld(self, reason: str) -> None:
        """Count an upstream answer not relayed: ``key_echo`` or ``invalid_response``."""
        if reason in WITHHELD_REASONS:
            self._withheld.inc((reason,))

    def record_connection_refused(self, port: str) -> None:
        """Count a connection refused at a port's cap: ``data`` or ``admin``."""
        if port in PORTS:
            self._connections_refused.inc((port,))

    def record_drift_check(self, team: str, result: str, drift: Decimal) -> None:
        """Count one drift check (one of ``DRIFT_RESULTS``) and the credits it corrected."""
        if result in DRIFT_RESULTS:
            self._drift_checks.inc((result,))
        if drift:
            self._cost_drift.add((self.team(team),), float(abs(drift)))

    def record_config_reload(self, result: str) -> None:
        """Count a config reload: ``success`` or ``error``."""
        self._config_reloads.inc((result,))
