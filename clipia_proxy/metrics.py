"""Prometheus metrics: every metric of docs/architecture.md §5.6, defined once; a registry per app.

Label values come only from the config (teams), the catalog (models) and small enums; anything
else is ``other`` (models) or ``unknown`` (teams), so no request can create a new series. Known
series exist from start-up. State gauges (budgets, catalog age) and counters owned by other
modules (catalog refreshes, usage sources) are read by a custom collector during the scrape,
from in-memory snapshots only — a scrape never does I/O. Budget snapshots are refreshed by a
background loop (``refresh_budgets``) from the store, so with Redis every replica reports the
same shared values (dashboards aggregate them with ``max by (team)``).
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable, Iterable, Iterator, Mapping
from decimal import Decimal
from typing import Any, Final

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
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


class Metrics:
    """The gateway's metrics façade: the ``record_*`` methods are the only way to record.

    The metric objects are private: callers say what happened (a request answered, a
    settlement, a stream's end) and the façade picks the series and bounds every label.
    Children come from prometheus-client's public ``labels()``, looked up once per label tuple
    (every label value is bounded, see the module docstring), and are written with the public
    ``inc``/``dec``/``observe``.

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
        self._children: dict[tuple[object, tuple[str, ...]], Any] = {}
        """(metric, labels) -> its child: the hot path's cache (bounded labels)."""
        self._settlement_pairs: frozenset[tuple[str, str, str]] = frozenset()
        """(team, model, environment) whose spend and token series exist."""
        self.typical_reservation: dict[str, float] = {}
        """team -> moving average of its requests' reservations, in credits (headroom)."""
        self.budgets: dict[tuple[str, str], BudgetSnapshot] = {}
        """(team, period) -> numbers; replaced by ``set_budgets``."""
        counter, histogram = self._counter, self._histogram
        self._tag_spend: Final = counter(
            "tag_spend_credits",
            "Settled spend per declared tag value (attribution.tags.*.metric), in credits.",
            "team tag value",
        )
        self._requests: Final = counter(
            "requests", "Requests answered, by HTTP status.", "team model route code"
        )
        self._request_duration: Final = histogram(
            "request_duration_seconds",
            "Time from request received to response end (streams: the whole stream).",
            "team route stream",
            _DURATION_BUCKETS,
        )
        self._ttft: Final = histogram(
            "time_to_first_token_seconds",
            "Time from request received to the first upstream byte relayed.",
            "team model",
            _TTFT_BUCKETS,
        )
        self._overhead: Final = histogram(
            "overhead_seconds",
            "Time the gateway itself added: before the upstream request and after its end.",
            "route",
            _OVERHEAD_BUCKETS,
        )
        self._spend: Final = counter(
            "spend_credits", "Settled spend, in credits.", "team model environment"
        )
        self._tokens: Final = counter("tokens", "Settled tokens.", "team model environment type")
        self._rejections: Final = counter(
            "rejections", "Requests refused before the upstream, by reason.", "team reason"
        )
        self._would_reject: Final = counter(
            "shadow_would_reject",
            "Requests of shadow teams that limits would have refused.",
            "team reason",
        )
        self._inflight: Final = Gauge(
            PREFIX + "inflight_requests", "Requests being served.", ["team"], registry=self.registry
        )
        self._stream_terminations: Final = counter(
            "stream_terminations", "Streams by how they ended.", "team reason"
        )
        self._upstream_requests: Final = counter(
            "upstream_requests",
            "Requests sent to Clipia (every attempt), by its status or error kind.",
            "code",
        )
        self._withheld: Final = counter(
            "upstream_answers_withheld",
            "Upstream answers (or relayed headers) withheld from the client, by reason.",
            "reason",
            WITHHELD_REASONS,
        )
        self._connections_refused: Final = counter(
            "connections_refused",
            "Connections refused at the port's cap (503 overloaded, then closed), by port.",
            "port",
            PORTS,
        )
        self._config_reloads: Final = counter(
            "config_reloads", "Config reloads by result.", "result"
        )
        self._drift_checks: Final = counter(
            "drift_checks",
            "Settled requests checked against GET /v1/generation, by result.",
            "result",
            DRIFT_RESULTS,
        )
        self._cost_drift: Final = counter(
            "cost_drift_credits",
            "Credits the drift check moved in the ledger (absolute difference, per team).",
            "team",
        )
        build_info = Gauge(
            PREFIX + "build_info",
            "Always 1; the version is a label.",
            ["version"],
            registry=self.registry,
        )
        build_info.labels(version).set(1)
        self.registry.register(_StateCollector(self))
        for result in ("success", "error"):
            self._config_reloads.labels(result)
        self.set_teams(teams)

    def _counter(
        self, name: str, documentation: str, labels: str, values: Iterable[str] = ()
    ) -> Counter:
        """Register the counter ``PREFIX + name``; ``values``: one-label series made at 0."""
        made = Counter(PREFIX + name, documentation, labels.split(), registry=self.registry)
        for value in values:
            made.labels(value)
        return made

    def _histogram(
        self, name: str, documentation: str, labels: str, buckets: tuple[float, ...]
    ) -> Histogram:
        """Register the histogram ``PREFIX + name``."""
        return Histogram(
            PREFIX + name, documentation, labels.split(), buckets=buckets, registry=self.registry
        )

    # -- label bounding ---------------------------------------------------------------------
    def team(self, team: str | None) -> str:
        """Return the label for a team: configured ids only, else ``unknown``."""
        return team if team in self._teams else "unknown"

    def model(self, model: str | None) -> str:
        """Return the label for a model: catalog chat ids only, else ``other``."""
        return model if model is not None and model in self._catalog_models() else "other"

    @staticmethod
    def route(route: str) -> str:
        """Return the label for a route: the gateway's own routes only, else ``other``."""
        return route if route in ROUTES else "other"

    # -- state changes ----------------------------------------------------------------------
    def set_teams(self, teams: Iterable[str]) -> None:
        """Install the team list (start-up, reload); dropped teams' series are removed.

        Every configured team has its in-flight, rejection and stream series at 0, and its
        spend and token series for each model its policy allows.
        """
        new = frozenset(teams)
        for gone in self._teams - new:
            for metric, labels in self._team_series(gone):
                with contextlib.suppress(KeyError):  # never made (shadow): older clients raise
                    metric.remove(*labels)
            self.typical_reservation.pop(gone, None)
            self.budgets = {k: v for k, v in self.budgets.items() if k[0] != gone}
        self._teams = new
        for team in sorted(new):
            for metric, labels in self._team_series(team):
                if metric is not self._would_reject:
                    metric.labels(*labels)
        self._sync_settlement_series()

    def set_models(self) -> None:
        """The catalog's chat models changed: make (and drop) spend and token series."""
        self._sync_settlement_series()

    def set_budgets(self, budgets: dict[tuple[str, str], BudgetSnapshot]) -> None:
        """Replace the budget snapshot read at scrape time."""
        self.budgets = budgets

    def _team_series(self, team: str) -> list[tuple[Counter | Gauge, tuple[str, ...]]]:
        """Every series of ``team`` outside spend and tokens."""
        series: list[tuple[Counter | Gauge, tuple[str, ...]]] = [(self._inflight, (team,))]
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
            self._spend.remove(*labels)
            for kind in _TOKEN_TYPES:
                self._tokens.remove(*labels, kind)
        for labels in wanted - self._settlement_pairs:
            self._spend.labels(*labels)
            for kind in _TOKEN_TYPES:
                self._tokens.labels(*labels, kind)
        self._settlement_pairs = wanted
        self._children.clear()  # removed children must not be written to any more

    def _child(self, metric: Counter | Gauge | Histogram, *labels: str) -> Any:
        """Return ``metric.labels(*labels)``, looked up once per label tuple."""
        key = (metric, labels)
        child = self._children.get(key)
        if child is None:
            child = self._children[key] = metric.labels(*labels)
        return child

    # -- recording --------------------------------------------------------------------------
    def record_request_started(self, team: str) -> Callable[[], None]:
        """Count a request in flight; return what records its end.

        The returned function writes the same series even if a reload removed the team
        meanwhile (looking it up again would make a new series at -1).
        """
        gauge = self._child(self._inflight, self.team(team))
        gauge.inc()
        end: Callable[[], None] = gauge.dec
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
        team_label, route_label = self.team(team), self.route(route)
        self._child(self._requests, team_label, self.model(model), route_label, str(code)).inc()
        self._child(
            self._request_duration, team_label, route_label, "true" if stream else "false"
        ).observe(duration)

    def record_overhead(self, route: str, seconds: float) -> None:
        """Observe the time the gateway itself added to a request sent upstream."""
        self._child(self._overhead, self.route(route)).observe(seconds)

    def record_ttft(self, team: str, model: str, seconds: float) -> None:
        """Observe a request's time to its first upstream byte."""
        self._child(self._ttft, self.team(team), self.model(model)).observe(seconds)

    def record_rejection(self, team: str, reason: str) -> None:
        """Count a request refused before the upstream."""
        if reason in REJECTION_REASONS:
            self._child(self._rejections, self.team(team), reason).inc()

    def record_shadow_rejection(self, team: str, reason: str) -> None:
        """Count a shadow team's request that its limits would have refused."""
        if reason in REJECTION_REASONS:
            self._child(self._would_reject, self.team(team), reason).inc()

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
        labels = (self.team(team), self.model(model), self._environment_label(team))
        self._child(self._spend, *labels).inc(float(cost))
        if prompt_tokens:
            self._child(self._tokens, *labels, "prompt").inc(prompt_tokens)
        if completion_tokens:
            self._child(self._tokens, *labels, "completion").inc(completion_tokens)

    def record_tag_spend(self, team: str, tags: Mapping[str, str], cost: Decimal) -> None:
        """Count settled spend per metric tag (names and values bounded by the config)."""
        team_label = self.team(team)
        for name, value in tags.items():
            self._child(self._tag_spend, team_label, name, value).inc(float(cost))

    def _environment_label(self, team: str) -> str:
        """``test`` for a sandbox team, else ``live`` (two values: bounded)."""
        return "test" if self._environment(team) == "test" else "live"

    def record_stream_end(self, team: str, reason: str) -> None:
        """Count a stream by how it ended (one of ``STREAM_REASONS``)."""
        if reason in STREAM_REASONS:
            self._child(self._stream_terminations, self.team(team), reason).inc()

    def record_upstream_attempt(self, code: str) -> None:
        """Count one attempt against Clipia: its status, or an error kind (bounded by caller)."""
        self._child(self._upstream_requests, code).inc()

    def record_withheld(self, reason: str) -> None:
        """Count an upstream answer not relayed: ``key_echo`` or ``invalid_response``."""
        if reason in WITHHELD_REASONS:
            self._child(self._withheld, reason).inc()

    def record_connection_refused(self, port: str) -> None:
        """Count a connection refused at a port's cap: ``data`` or ``admin``."""
        if port in PORTS:
            self._child(self._connections_refused, port).inc()

    def record_drift_check(self, team: str, result: str, drift: Decimal) -> None:
        """Count one drift check (one of ``DRIFT_RESULTS``) and the credits it corrected."""
        if result in DRIFT_RESULTS:
            self._child(self._drift_checks, result).inc()
        if drift:
            self._child(self._cost_drift, self.team(team)).inc(float(abs(drift)))

    def record_config_reload(self, result: str) -> None:
        """Count a config reload: ``success`` or ``error``."""
        self._child(self._config_reloads, result).inc()
