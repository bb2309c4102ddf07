"""Prometheus metrics: every metric of DESIGN §5.6, defined once, in a registry per app.

Label values come only from the config (teams), the catalog (models) and small enums; anything
else is ``other`` (models) or ``unknown`` (teams), so no request can create a new series. Known
series exist from start-up. State gauges (budgets, catalog age) and counters owned by other
modules (catalog refreshes, usage sources) are read by a custom collector during the scrape,
from in-memory snapshots only — a scrape never does I/O. Budget snapshots are refreshed by a
background loop (``refresh_budgets``) from the store, so with Redis every replica reports the
same shared values (dashboards aggregate them with ``max by (team)``).
"""

from __future__ import annotations

import bisect
import datetime as dt
import logging
from collections.abc import Callable, Iterable, Iterator, Mapping
from decimal import Decimal
from typing import Any, Final

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, values
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.metrics import MetricWrapperBase as _Labelled
from prometheus_client.registry import Collector

__all__ = ["REJECTION_REASONS", "Metrics"]

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
)
STREAM_REASONS: Final = ("completed", "client_disconnect", "upstream_error", "timeout")
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
        self._metrics = metrics

    def collect(self) -> Iterator[Metric]:
        metrics = self._metrics
        families = {
            "limit": GaugeMetricFamily(
                PREFIX + "budget_limit_credits",
                "Budget of the period, in credits.",
                labels=["team", "period"],
            ),
            "spent": GaugeMetricFamily(
                PREFIX + "budget_spent_credits",
                "Settled spend in the current period, in credits.",
                labels=["team", "period"],
            ),
            "reserved": GaugeMetricFamily(
                PREFIX + "budget_reserved_credits",
                "Reservations of requests in flight, in credits.",
                labels=["team", "period"],
            ),
            "remaining": GaugeMetricFamily(
                PREFIX + "budget_remaining_credits",
                "Budget left in the current period, in credits.",
                labels=["team", "period"],
            ),
            "resets": GaugeMetricFamily(
                PREFIX + "budget_reset_timestamp_seconds",
                "When the current period ends (Unix time).",
                labels=["team", "period"],
            ),
        }
        for (team, period), snap in sorted(metrics.budgets.items()):
            labels = [team, period]
            families["limit"].add_metric(labels, float(snap.limit))
            families["spent"].add_metric(labels, float(snap.spent))
            families["reserved"].add_metric(labels, float(snap.reserved))
            families["remaining"].add_metric(labels, float(snap.remaining))
            if snap.resets_at is not None:
                families["resets"].add_metric(labels, snap.resets_at)
        yield from families.values()
        age = metrics.catalog_age()
        catalog_age = GaugeMetricFamily(
            PREFIX + "catalog_age_seconds", "Age of the cached model catalog (-1: never loaded)."
        )
        catalog_age.add_metric([], -1.0 if age is None else age)
        yield catalog_age
        refreshes = CounterMetricFamily(
            PREFIX + "catalog_refreshes", "Catalog refreshes by result.", labels=["result"]
        )
        for result, count in sorted(metrics.catalog_refreshes().items()):
            refreshes.add_metric([result], count)
        yield refreshes
        sources = CounterMetricFamily(
            PREFIX + "usage_source",
            "Settled requests by where their cost came from.",
            labels=["source"],
        )
        for source in ("response", "stream", "generation", "counted", "reserved"):
            sources.add_metric([source], metrics.usage_sources().get(source, 0))
        yield sources
        implausible = CounterMetricFamily(
            PREFIX + "upstream_cost_implausible",
            "Upstream costs not believed (over the reservation and 2x tokens x prices).",
        )
        implausible.add_metric([], metrics.implausible_costs())
        yield implausible
        errors = CounterMetricFamily(
            PREFIX + "store_errors",
            "Quota store failures, by what store.on_error made of them.",
            labels=["on_error"],
        )
        for kind in ("fail_closed", "fail_open"):
            errors.add_metric([kind], metrics.store_errors().get(kind, 0))
        yield errors


class _LoopValue:
    """prometheus_client's ``MutexValue`` without its lock, for series written on the loop.

    Every write to the gateway's series happens on the event loop's thread (the SQLite
    writer thread never touches metrics; scrapes run on the loop), so the lock only cost
    time: about 3 us a request, over the dozen series a request updates.
    """

    __slots__ = ("_exemplar", "_value")
    _multiprocess = False

    def __init__(self, value: float) -> None:
        self._value = value
        self._exemplar: Any = None

    def inc(self, amount: float) -> None:
        self._value += amount

    def set(self, value: float, timestamp: float | None = None) -> None:
        self._value = value

    def set_exemplar(self, exemplar: Any) -> None:
        self._exemplar = exemplar

    def get(self) -> float:
        return self._value

    def get_exemplar(self) -> Any:
        return self._exemplar


def _unlocked(value: Any) -> Any:
    """Return a :class:`_LoopValue` with ``value``'s number (other value kinds as they are)."""
    if type(value) is not values.MutexValue:
        return value  # already unlocked, or a multiprocess value: leave it
    locked: Any = value  # (prometheus_client's value methods are untyped)
    unlocked = _LoopValue(locked.get())
    unlocked.set_exemplar(locked.get_exemplar())
    return unlocked


def _unlock(child: Any) -> None:
    """Swap a child's values for lock-free ones (once; later calls find them swapped)."""
    if isinstance(child, Histogram):
        child._sum = _unlocked(child._sum)
        child._buckets = [_unlocked(bucket) for bucket in child._buckets]
    else:
        child._value = _unlocked(child._value)


class Metrics:
    """The gateway's metrics; callers use the ``record_*`` methods."""

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
        models: Callable[[], frozenset[str]] = frozenset,
    ) -> None:
        self.registry: Final = CollectorRegistry(auto_describe=True)
        self._teams = frozenset(teams)
        self.catalog_age = catalog_age
        self.catalog_refreshes = catalog_refreshes
        self.usage_sources = usage_sources
        self.implausible_costs = implausible_costs
        self.store_errors = store_errors
        self._catalog_models = models
        self._children: dict[tuple[int, tuple[str, ...]], Any] = {}
        self._adders: dict[tuple[int, tuple[str, ...]], Callable[[float], None]] = {}
        self._observers: dict[tuple[int, tuple[str, ...]], Callable[[float], None]] = {}
        self._request_series: dict[
            tuple[str, str, str, int, bool], tuple[Callable[[float], None], ...]
        ] = {}
        self._settlement_series: dict[tuple[str, str], tuple[Callable[[float], None], ...]] = {}
        self.budgets: dict[tuple[str, str], BudgetSnapshot] = {}
        """(team, period) -> numbers; replaced by ``set_budgets``."""
        r = self.registry
        self.requests: Final = Counter(
            PREFIX + "requests",
            "Requests answered, by HTTP status.",
            ["team", "model", "route", "code"],
            registry=r,
        )
        self.request_duration: Final = Histogram(
            PREFIX + "request_duration_seconds",
            "Time from request received to response end (streams: the whole stream).",
            ["team", "route", "stream"],
            buckets=_DURATION_BUCKETS,
            registry=r,
        )
        self.ttft: Final = Histogram(
            PREFIX + "time_to_first_token_seconds",
            "Time from request received to the first upstream byte relayed.",
            ["team", "model"],
            buckets=_TTFT_BUCKETS,
            registry=r,
        )
        self.overhead: Final = Histogram(
            PREFIX + "overhead_seconds",
            "Time the gateway itself added: before the upstream request and after its end.",
            ["route"],
            buckets=_OVERHEAD_BUCKETS,
            registry=r,
        )
        self.spend: Final = Counter(
            PREFIX + "spend_credits", "Settled spend, in credits.", ["team", "model"], registry=r
        )
        self.tokens: Final = Counter(
            PREFIX + "tokens", "Settled tokens.", ["team", "model", "type"], registry=r
        )
        self.rejections: Final = Counter(
            PREFIX + "rejections",
            "Requests refused before the upstream, by reason.",
            ["team", "reason"],
            registry=r,
        )
        self.would_reject: Final = Counter(
            PREFIX + "shadow_would_reject",
            "Requests of shadow teams that limits would have refused.",
            ["team", "reason"],
            registry=r,
        )
        self.inflight: Final = Gauge(
            PREFIX + "inflight_requests", "Requests being served.", ["team"], registry=r
        )
        self.stream_terminations: Final = Counter(
            PREFIX + "stream_terminations",
            "Streams by how they ended.",
            ["team", "reason"],
            registry=r,
        )
        self.upstream_requests: Final = Counter(
            PREFIX + "upstream_requests",
            "Requests sent to Clipia (every attempt), by its status or error kind.",
            ["code"],
            registry=r,
        )
        self.config_reloads: Final = Counter(
            PREFIX + "config_reloads", "Config reloads by result.", ["result"], registry=r
        )
        self.build_info: Final = Gauge(
            PREFIX + "build_info", "Always 1; the version is a label.", ["version"], registry=r
        )
        self.build_info.labels(version=version).set(1)
        r.register(_StateCollector(self))
        for result in ("success", "error"):
            self.config_reloads.labels(result=result)
        self._init_team_series(self._teams)

    def _init_team_series(self, teams: Iterable[str]) -> None:
        for team in teams:
            self.inflight.labels(team=team)
            for reason in REJECTION_REASONS:
                self.rejections.labels(team=team, reason=reason)
            for reason in STREAM_REASONS:
                self.stream_terminations.labels(team=team, reason=reason)

    def child(self, metric: _Labelled, *labels: str) -> Any:
        """Return ``metric.labels(*labels)``, cached: the hot path skips prometheus' lock.

        Safe to cache because every label value is bounded (see the module docstring). The
        child's values are made lock-free (:class:`_LoopValue`) on the way.
        """
        key = (id(metric), labels)
        found = self._children.get(key)
        if found is None:
            found = metric.labels(*labels)
            _unlock(found)
            self._children[key] = found
        return found

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

    def set_teams(self, teams: Iterable[str]) -> None:
        """Install a new team list (reload): dropped teams' series are removed."""
        new = frozenset(teams)
        for gone in self._teams - new:
            for metric in (
                self.inflight,
                self.rejections,
                self.stream_terminations,
                self.would_reject,
            ):
                for labels in list(metric._metrics):
                    if labels[0] == gone:
                        metric.remove(*labels)
            self.budgets = {k: v for k, v in self.budgets.items() if k[0] != gone}
        self._children.clear()
        self._adders.clear()
        self._observers.clear()
        self._request_series.clear()
        self._settlement_series.clear()
        self._teams = new
        self._init_team_series(new)

    def set_budgets(self, budgets: dict[tuple[str, str], BudgetSnapshot]) -> None:
        """Replace the budget snapshot read at scrape time."""
        self.budgets = budgets

    # -- recording --------------------------------------------------------------------------
    def add(self, metric: Counter | Gauge, labels: tuple[str, ...], amount: float = 1.0) -> None:
        """Add ``amount`` to a counter's (or gauge's) child: ``child.inc(amount)``, faster.

        Goes straight to the child's value (prometheus_client's ``_value``), skipping the
        per-call checks of ``inc``; amounts are the gateway's own (never negative for a
        counter). ``tests/test_metrics.py`` holds the result equal to the public API's.
        """
        self.adder(metric, labels)(amount)

    def adder(self, metric: Counter | Gauge, labels: tuple[str, ...]) -> Callable[[float], None]:
        """Return the function ``add`` calls for this series.

        Keep it to undo a gauge change on the same series, even if a reload removes the label
        meanwhile (looking it up again would make a new series).
        """
        key = (id(metric), labels)
        adder = self._adders.get(key)
        if adder is None:
            adder = self.child(metric, *labels)._value.inc
            self._adders[key] = adder
        return adder

    def observe(self, metric: Histogram, labels: tuple[str, ...], value: float) -> None:
        """``child.observe(value)`` for a histogram's child, faster (a bisect, no checks)."""
        self.observer(metric, labels)(value)

    def observer(self, metric: Histogram, labels: tuple[str, ...]) -> Callable[[float], None]:
        """Return the function ``observe`` calls for this series."""
        key = (id(metric), labels)
        observer = self._observers.get(key)
        if observer is None:
            observer = _fast_observer(self.child(metric, *labels))
            self._observers[key] = observer
        return observer

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
        key = (self.team(team), self.model(model), self.route(route), code, stream)
        series = self._request_series.get(key)
        if series is None:
            team_label, model_label, route_label = key[:3]
            series = (
                self.adder(self.requests, (team_label, model_label, route_label, str(code))),
                self.observer(
                    self.request_duration, (team_label, route_label, "true" if stream else "false")
                ),
            )
            self._request_series[key] = series
        count, observe_duration = series
        count(1.0)
        observe_duration(duration)

    def record_rejection(self, team: str, reason: str) -> None:
        """Count a request refused before the upstream."""
        if reason in REJECTION_REASONS:
            self.rejections.labels(self.team(team), reason).inc()

    def record_settlement(
        self, *, team: str, model: str, cost: Decimal, prompt_tokens: int, completion_tokens: int
    ) -> None:
        """Count settled spend and tokens."""
        key = (self.team(team), self.model(model))
        series = self._settlement_series.get(key)
        if series is None:
            series = (
                self.adder(self.spend, key),
                self.adder(self.tokens, (*key, "prompt")),
                self.adder(self.tokens, (*key, "completion")),
            )
            self._settlement_series[key] = series
        add_spend, add_prompt, add_completion = series
        add_spend(float(cost))  # 0 still makes the series
        if prompt_tokens:
            add_prompt(prompt_tokens)
        if completion_tokens:
            add_completion(completion_tokens)


def _fast_observer(child: Histogram) -> Callable[[float], None]:
    """Return ``child.observe`` without its checks: the sum and the first bucket >= value."""
    bounds = list(child._upper_bounds)
    bucket_adders = [bucket.inc for bucket in child._buckets]
    add_to_sum = child._sum.inc

    def observe(value: float) -> None:
        add_to_sum(value)
        bucket_adders[bisect.bisect_left(bounds, value)](1.0)

    return observe


def resets_timestamp(resets_at: dt.datetime | None) -> float | None:
    """Return a reset time as Unix seconds."""
    return None if resets_at is None else resets_at.timestamp()
