"""The Grafana dashboard and the Prometheus alert rules against the metrics registry.

Every PromQL expression (dashboard targets with their template variables replaced, rule
``expr``s, the ``label_values`` queries of template variables) must parse, and every metric and
label it names must exist in ``Metrics``' registry — so renaming a metric or a label breaks this
test, not a dashboard in production. The walk also tracks which labels each sub-expression still
carries, so a ``by``/``on`` over a label that an inner aggregation already dropped is caught, as
is a one-to-one match between operands with different labels (which silently matches nothing).
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from dataclasses import dataclass, field
from decimal import Decimal
from functools import cache
from pathlib import Path
from typing import Any, Final

import msgspec
import promql_parser as pp
import pytest
import yaml

from clipia_proxy.metrics import BudgetSnapshot, Metrics

ROOT: Final = Path(__file__).resolve().parent.parent
DASHBOARD: Final = ROOT / "deploy" / "grafana" / "clipia-proxy.json"
OPERATIONS: Final = ROOT / "README.md"
RULES: Final = ROOT / "deploy" / "prometheus" / "clipia-proxy-rules.yaml"
CHART_RULES: Final = ROOT / "deploy" / "helm" / "clipia-proxy" / "files" / "clipia-proxy-rules.yaml"
PREFIX: Final = "clipia_proxy_"

# Values for Grafana's built-in variables and the dashboard's own, so the expressions parse.
PLACEHOLDERS: Final = {
    "__rate_interval": "5m",
    "__interval": "1m",
    "__range": "1d",
    "datasource": "prometheus",
    "team": "search",
    "model": "gpt-4o",
    "rubles_per_credit": "3",
}
PROMQL_BLOCK: Final = re.compile(r"```promql\n(.*?)```", re.DOTALL)
VARIABLE: Final = re.compile(r"\$\{(\w+)(?::\w+)?\}|\$(\w+)")
LABEL_VALUES: Final = re.compile(r"^label_values\((?:(?P<selector>.+),\s*)?(?P<label>\w+)\)$")
# Labels the scrape adds to every series; allowed only where the scrape target is the subject.
TARGET_LABELS: Final = frozenset({"job", "instance"})
# The only series not exported by the gateway that an expression may use.
FOREIGN: Final = frozenset({"up"})
# Functions whose result keeps the labels of their vector argument.
LABEL_PRESERVING: Final = frozenset(
    {
        "abs",
        "avg_over_time",
        "ceil",
        "changes",
        "clamp",
        "clamp_max",
        "clamp_min",
        "delta",
        "deriv",
        "exp",
        "floor",
        "idelta",
        "increase",
        "irate",
        "last_over_time",
        "ln",
        "log10",
        "log2",
        "max_over_time",
        "min_over_time",
        "rate",
        "resets",
        "round",
        "sort",
        "sort_desc",
        "sqrt",
    }
)
COUNTER_FUNCTIONS: Final = frozenset({"rate", "irate", "increase", "resets"})


# --- the registry ---------------------------------------------------------------------------


@dataclass(frozen=True)
class Series:
    """One exposed series name (``…_total``, ``…_bucket`` …): its family, labels and kind."""

    family: str
    labels: frozenset[str]
    counter: bool
    """Monotonic: a counter, or a histogram's ``_bucket``/``_sum``/``_count``."""


def _exercise(metrics: Metrics) -> None:
    """Give every labelled family a series, so the exposition shows its label names."""
    metrics.record_request(
        team="search", model="m", route="/v1/chat/completions", code=200, stream=True, duration=1
    )
    metrics.record_settlement(
        team="search", model="m", cost=Decimal(1), prompt_tokens=1, completion_tokens=1
    )
    metrics.record_tag_spend("search", {"service": "search-api"}, Decimal(1))
    metrics.record_ttft("search", "other", 0.5)
    metrics.record_overhead("/v1/chat/completions", 0.001)
    metrics.record_shadow_rejection("search", "budget")
    metrics.record_upstream_attempt("200")
    metrics.record_reservation("search", Decimal("0.1"))
    metrics.record_drift_check("search", "corrected", Decimal("0.01"))
    metrics.set_budgets(
        {
            ("search", "day"): BudgetSnapshot(
                limit=Decimal(10),
                spent=Decimal(1),
                reserved=Decimal(0),
                remaining=Decimal(9),
                resets_at=1.0,
            )
        }
    )


@cache
def exposed() -> dict[str, Series]:
    """Every series name the registry of ``Metrics(["search"], version="test")`` exposes."""
    metrics = Metrics(
        ["search"],
        version="test",
        catalog_refreshes=lambda: {"success": 1, "error": 0},
        catalog_age=lambda: 1.0,
    )
    _exercise(metrics)
    series: dict[str, Series] = {}
    for family in metrics.registry.collect():
        counter = family.type in {"counter", "histogram"}
        assert family.samples, f"{family.name}: _exercise gives it no series"
        for sample in family.samples:
            labels = frozenset(sample.labels)
            known = series.get(sample.name)
            if known is not None:
                labels |= known.labels
            series[sample.name] = Series(family.name, labels, counter)
    return series


# --- the PromQL checker ---------------------------------------------------------------------


@dataclass
class Checker:
    """Walks one expression; collects problems and what it used.

    ``labels_of`` returns the labels every series of a sub-expression carries (None for
    scalars and strings).
    """

    target_labels: bool = False
    """Whether ``job``/``instance`` may be used (rules about the scrape target itself)."""
    problems: list[str] = field(default_factory=list)
    metrics: set[str] = field(default_factory=set)
    labels: set[str] = field(default_factory=set)

    def check(self, expr: pp.Expr) -> None:
        self.labels_of(expr, max_by=None)

    def selector(self, node: pp.VectorSelector, *, max_by: frozenset[str] | None) -> frozenset[str]:
        name = node.name
        if name is None:
            self.problems.append(f"selector without a metric name: {node}")
            return frozenset()
        self.metrics.add(name)
        used = {matcher.name for matcher in node.matchers.matchers} | {
            matcher.name for group in node.matchers.or_matchers for matcher in group
        }
        self.labels.update(used)
        available: frozenset[str]
        if name in FOREIGN:
            if not self.target_labels:
                self.problems.append(f"{name}: only alerts about the scrape target may use it")
            available = TARGET_LABELS
        elif name.startswith(PREFIX):
            series = exposed().get(name)
            if series is None:
                self.problems.append(f"{name}: not exposed by the registry")
                return frozenset(used)
            available = series.labels | (TARGET_LABELS if self.target_labels else frozenset())
            # One series per (team, period): by (...) or an equality matcher must pin both.
            pinned = {m.name for m in node.matchers.matchers if m.op == pp.MatchOp.Equal}
            if series.family.startswith(PREFIX + "budget_") and (
                max_by is None or not {"team", "period"} <= max_by | pinned
            ):
                self.problems.append(
                    f"{name}: budget gauges are reported by every replica; "
                    "aggregate them with max (or min) by (team, period)"
                )
        else:
            self.problems.append(f"{name}: not a clipia_proxy metric")
            return frozenset(used)
        for label in sorted(used - available):
            self.problems.append(f"{name}: no label {label!r} (it has {sorted(available)})")
        return available

    def need(self, labels: list[str], have: frozenset[str] | None, where: str) -> None:
        self.labels.update(labels)
        if have is None:
            self.problems.append(f"{where}: over a scalar")
            return
        for label in labels:
            if label not in have:
                self.problems.append(f"{where}: label {label!r} is not on {sorted(have)}")

    def labels_of(self, node: pp.Expr, *, max_by: frozenset[str] | None) -> frozenset[str] | None:
        if isinstance(node, pp.VectorSelector):
            return self.selector(node, max_by=max_by)
        if isinstance(node, pp.MatrixSelector):
            return self.selector(node.vector_selector, max_by=max_by)
        if isinstance(node, pp.NumberLiteral | pp.StringLiteral):
            return None
        if isinstance(node, pp.ParenExpr | pp.UnaryExpr | pp.SubqueryExpr):
            return self.labels_of(node.expr, max_by=max_by)
        if isinstance(node, pp.Call):
            return self.call(node, max_by=max_by)
        if isinstance(node, pp.AggregateExpr):
            return self.aggregate(node)
        if isinstance(node, pp.BinaryExpr):
            return self.binary(node, max_by=max_by)
        self.problems.append(f"unsupported expression {type(node).__name__}: {node}")
        return None

    def call(self, node: pp.Call, *, max_by: frozenset[str] | None) -> frozenset[str] | None:
        name = node.func.name
        args = [self.labels_of(arg, max_by=max_by) for arg in node.args]
        if name in COUNTER_FUNCTIONS:
            for arg in node.args:
                if isinstance(arg, pp.MatrixSelector):
                    series = exposed().get(arg.vector_selector.name or "")
                    if series is not None and not series.counter:
                        self.problems.append(f"{name}() over the gauge {arg.vector_selector.name}")
        if name == "histogram_quantile":
            inner = args[1]
            self.need(["le"], inner, "histogram_quantile")
            return None if inner is None else inner - {"le"}
        if name == "absent":
            return frozenset()
        if name in LABEL_PRESERVING:
            vectors = [labels for labels in args if labels is not None]
            return vectors[0] if vectors else None
        if node.func.return_type == pp.ValueType.Scalar:
            return None
        self.problems.append(f"function {name}() is not known to this checker")
        return None

    def aggregate(self, node: pp.AggregateExpr) -> frozenset[str] | None:
        op = str(node.op)
        modifier = node.modifier
        grouping = list(modifier.labels) if modifier is not None else []
        by = modifier is not None and modifier.type == pp.AggModifierType.By
        inner = self.labels_of(
            node.expr, max_by=frozenset(grouping) if op in {"max", "min"} and by else None
        )
        if node.param is not None:
            self.labels_of(node.param, max_by=None)
        self.need(grouping, inner, f"{op} by/without")
        if inner is None:
            return None
        if op in {"topk", "bottomk", "limitk", "limit_ratio"}:
            return inner
        if op == "count_values":
            self.problems.append("count_values: not supported by this checker")
        if modifier is None:
            return frozenset()
        return frozenset(grouping) if by else inner - set(grouping)

    def binary(
        self, node: pp.BinaryExpr, *, max_by: frozenset[str] | None
    ) -> frozenset[str] | None:
        lhs = self.labels_of(node.lhs, max_by=max_by)
        rhs = self.labels_of(node.rhs, max_by=max_by)
        if lhs is None or rhs is None:
            return lhs if rhs is None else rhs
        op = str(node.op)
        modifier = node.modifier
        matching = modifier.matching if modifier is not None else None
        group = list(modifier.group_labels or []) if modifier is not None else []
        card = modifier.card if modifier is not None else pp.VectorMatchCardinality.OneToOne
        if matching is not None and matching.type == pp.LabelModifierType.Include:
            on = list(matching.labels)
            self.need(on, lhs, f"{op} on(...), left side")
            self.need(on, rhs, f"{op} on(...), right side")
            lhs_key, rhs_key = frozenset(on), frozenset(on)
        else:
            ignoring = list(matching.labels) if matching is not None else []
            self.labels.update(ignoring)
            for label in ignoring:
                if label not in lhs | rhs:
                    self.problems.append(f"{op} ignoring({label}): on neither side")
            lhs_key, rhs_key = lhs - set(ignoring), rhs - set(ignoring)
        if op == "or":
            return lhs & rhs
        if card == pp.VectorMatchCardinality.ManyToOne:
            self.need(group, rhs, f"{op} group_left(...)")
            if not rhs_key <= lhs:
                self.problems.append(f"{op} group_left: {sorted(rhs_key)} not all on the left")
            return lhs | set(group)
        if card == pp.VectorMatchCardinality.OneToMany:
            self.need(group, lhs, f"{op} group_right(...)")
            return rhs | set(group)
        if lhs_key != rhs_key:
            self.problems.append(
                f"{op}: one-to-one match of {sorted(lhs_key)} with {sorted(rhs_key)} "
                "matches nothing; use on(...)/ignoring(...)"
            )
        # Prometheus keeps the left side's labels, minus ignoring(...) or only on(...).
        return lhs if op in {"and", "unless"} else lhs_key


def check(expr: str, *, target_labels: bool = False) -> Checker:
    """Parse ``expr`` (raises on a syntax error) and check it against the registry."""
    checker = Checker(target_labels=target_labels)
    checker.check(pp.parse(expr))
    return checker


# --- the files ------------------------------------------------------------------------------


def substitute(text: str) -> str:
    """Replace Grafana variables by placeholders that keep the PromQL valid."""

    def one(match: re.Match[str]) -> str:
        name = match.group(1) or match.group(2)
        if name not in PLACEHOLDERS:
            raise AssertionError(f"unknown dashboard variable ${name} in {text!r}")
        return PLACEHOLDERS[name]

    return VARIABLE.sub(one, text)


@cache
def dashboard() -> dict[str, Any]:
    data: dict[str, Any] = msgspec.json.decode(DASHBOARD.read_bytes())
    return data


@cache
def rules() -> dict[str, Any]:
    data: dict[str, Any] = yaml.safe_load(RULES.read_text(encoding="utf-8"))
    return data


def panels(items: list[dict[str, Any]] | None = None) -> Iterator[dict[str, Any]]:
    """Every panel, rows' nested panels too."""
    for panel in dashboard()["panels"] if items is None else items:
        yield panel
        yield from panels(panel.get("panels", []))


def data_panels() -> list[dict[str, Any]]:
    return [panel for panel in panels() if panel["type"] != "row"]


def targets() -> list[tuple[str, str]]:
    """(id, expr) of every dashboard query."""
    return [
        (f"{panel['title']}#{target['refId']}", target["expr"])
        for panel in data_panels()
        for target in panel["targets"]
    ]


def alerts() -> list[dict[str, Any]]:
    return [rule for group in rules()["groups"] for rule in group["rules"]]


def variables() -> dict[str, dict[str, Any]]:
    return {variable["name"]: variable for variable in dashboard()["templating"]["list"]}


def query_of(variable: dict[str, Any]) -> str:
    query = variable["query"]
    return str(query["query"] if isinstance(query, dict) else query)


# --- the tests ------------------------------------------------------------------------------


def test_the_registry_is_read() -> None:
    names = exposed()
    assert names["clipia_proxy_spend_credits_total"].labels == {"team", "model", "environment"}
    assert "le" in names["clipia_proxy_request_duration_seconds_bucket"].labels
    assert "le" not in names["clipia_proxy_request_duration_seconds_count"].labels
    assert names["clipia_proxy_budget_limit_credits"].labels == {"team", "period"}
    assert not names["clipia_proxy_budget_limit_credits"].counter


@pytest.mark.parametrize(
    ("expr", "problem"),
    [
        ("clipia_proxy_nope_total", "not exposed"),
        ("sum by (tema) (clipia_proxy_spend_credits_total)", "label 'tema'"),
        ('clipia_proxy_spend_credits_total{route="x"}', "no label 'route'"),
        ("sum by (team) (sum by (model) (clipia_proxy_spend_credits_total))", "label 'team'"),
        ("rate(clipia_proxy_inflight_requests[5m])", "over the gauge"),
        ("sum(clipia_proxy_budget_spent_credits)", "by (team, period)"),
        ("histogram_quantile(0.9, sum by (team) (rate(x_bucket[5m])))", "not a clipia_proxy"),
        (
            "histogram_quantile(0.9, sum by (team) "
            "(rate(clipia_proxy_overhead_seconds_bucket[5m])))",
            "label 'team'",
        ),
        (
            "sum by (team, model) (clipia_proxy_spend_credits_total)"
            " / sum by (team) (clipia_proxy_spend_credits_total)",
            "matches nothing",
        ),
        ('up{job="x"}', "scrape target"),
        ("clipia_proxy_build_info{instance='x'}", "no label 'instance'"),
    ],
)
def test_the_checker_catches(expr: str, problem: str) -> None:
    problems = check(expr).problems
    assert any(problem in text for text in problems), problems


def test_the_checker_accepts_matching_with_modifiers() -> None:
    expr = (
        "sum by (team, reason) (rate(clipia_proxy_rejections_total[5m]))"
        " / on (team) group_left () sum by (team) (rate(clipia_proxy_requests_total[5m]))"
    )
    assert check(expr).problems == []


@pytest.mark.parametrize("expr", [pytest.param(expr, id=where) for where, expr in targets()])
def test_dashboard_query_uses_only_exported_metrics_and_labels(expr: str) -> None:
    checker = check(substitute(expr))
    assert checker.problems == []
    assert checker.metrics


@pytest.mark.parametrize("alert", [rule["alert"] for rule in alerts()])
def test_alert_uses_only_exported_metrics_and_labels(alert: str) -> None:
    [rule] = [rule for rule in alerts() if rule["alert"] == alert]
    expr = str(rule["expr"])
    about_target = "up" in {
        node.name for node in _selectors(pp.parse(expr))
    } or expr.lstrip().startswith("absent(")
    checker = check(expr, target_labels=about_target)
    assert checker.problems == []


def _selectors(expr: pp.Expr) -> list[pp.VectorSelector]:
    found: list[pp.VectorSelector] = []

    def visit(node: pp.Expr) -> bool:
        if isinstance(node, pp.VectorSelector):
            found.append(node)
        return True

    pp.walk(expr, visit)
    return found


def test_alert_rules_follow_the_prometheus_rule_shape() -> None:
    data = rules()
    assert set(data) == {"groups"}
    names = [group["name"] for group in data["groups"]]
    assert len(names) == len(set(names))
    seen: set[str] = set()
    for group in data["groups"]:
        assert group["rules"], group["name"]
        for rule in group["rules"]:
            assert set(rule) == {"alert", "expr", "for", "labels", "annotations"}, rule
            assert rule["alert"] not in seen
            seen.add(rule["alert"])
            pp.parse_duration(rule["for"])
            assert rule["labels"]["severity"] in {"critical", "warning", "info"}
            annotations = rule["annotations"]
            for key in ("summary", "description", "runbook"):
                assert str(annotations.get(key, "")).strip(), (rule["alert"], key)
            assert "\n" not in annotations["runbook"].strip(), "a runbook is one line"


def test_alerts_cover_the_operational_risks() -> None:
    exprs = {rule["alert"]: str(rule["expr"]) for rule in alerts()}
    used = {alert: check(expr, target_labels=True).metrics for alert, expr in exprs.items()}
    everything = set().union(*used.values())
    for metric in (
        "clipia_proxy_budget_spent_credits",
        "clipia_proxy_budget_limit_credits",
        "clipia_proxy_rejections_total",
        "clipia_proxy_upstream_requests_total",
        "clipia_proxy_catalog_age_seconds",
        "clipia_proxy_store_errors_total",
        "clipia_proxy_build_info",
        "up",
        # Hardening's counters: a key echo, an implausible cost, load shed.
        "clipia_proxy_upstream_answers_withheld_total",
        "clipia_proxy_upstream_cost_implausible_total",
        "clipia_proxy_connections_refused_total",
    ):
        assert metric in everything, metric
    assert any('reason="key_echo"' in expr for expr in exprs.values())
    assert any('reason="overloaded"' in expr for expr in exprs.values())
    assert any('"401|403"' in expr for expr in exprs.values())
    assert any(">= 0.8" in expr for expr in exprs.values())
    # Refusals start when a reservation does not fit, before 100 %: any budget refusal alerts,
    # and so does a headroom of few typical requests.
    assert any('reason="budget"' in expr for expr in exprs.values())
    assert "clipia_proxy_budget_headroom_requests" in everything
    assert any("== -1" in expr for expr in exprs.values())


def test_the_chart_ships_the_same_rules_file() -> None:
    assert CHART_RULES.read_bytes() == RULES.read_bytes()


def test_dashboard_model() -> None:
    data = dashboard()
    assert data["schemaVersion"] >= 39
    assert data["uid"]
    assert data["title"]
    [source] = data["__inputs"]
    assert (source["type"], source["pluginId"]) == ("datasource", "prometheus")
    ids = [panel["id"] for panel in panels()]
    assert len(ids) == len(set(ids))
    for panel in data_panels():
        assert panel["title"], panel["id"]
        assert panel["description"], panel["title"]
        assert panel["targets"], panel["title"]
        grid = panel["gridPos"]
        assert grid["x"] >= 0, panel["title"]
        assert grid["x"] + grid["w"] <= 24, panel["title"]


def test_every_panel_and_query_uses_the_datasource_variable() -> None:
    wanted = {"type": "prometheus", "uid": "${datasource}"}
    for panel in data_panels():
        assert panel["datasource"] == wanted, panel["title"]
        for target in panel["targets"]:
            assert target.get("datasource", wanted) == wanted, panel["title"]
    for variable in variables().values():
        if variable["type"] == "query":
            assert variable["datasource"] == wanted, variable["name"]


def test_template_variables() -> None:
    found = variables()
    assert found["datasource"]["type"] == "datasource"
    assert found["datasource"]["query"] == "prometheus"
    for name in ("team", "model"):
        variable = found[name]
        assert variable["type"] == "query"
        assert variable["multi"]
        assert variable["includeAll"]
        assert variable["allValue"] == ".*"
        match = LABEL_VALUES.match(query_of(variable))
        assert match is not None, query_of(variable)
        assert match["label"] == name
    constant = found["rubles_per_credit"]
    assert constant["type"] == "constant"
    assert Decimal(query_of(constant)) == 3


@pytest.mark.parametrize(
    "name", [v["name"] for v in dashboard()["templating"]["list"] if v["type"] == "query"]
)
def test_variable_query_uses_exported_labels(name: str) -> None:
    match = LABEL_VALUES.match(substitute(query_of(variables()[name])))
    assert match is not None
    selector = match["selector"]
    assert selector is not None, "label_values over every series is too broad"
    checker = check(selector)
    assert checker.problems == []
    [metric] = checker.metrics
    assert match["label"] in exposed()[metric].labels


def test_dashboard_shows_every_metric_family() -> None:
    shown = set().union(*(check(substitute(expr)).metrics for _where, expr in targets()))
    families = {series.family for series in exposed().values()}
    shown_families = {exposed()[name].family for name in shown}
    assert families - shown_families == set()


def test_spend_is_shown_in_credits_and_rubles() -> None:
    exprs = [expr for _where, expr in targets() if "clipia_proxy_spend_credits_total" in expr]
    assert any("$rubles_per_credit" in expr for expr in exprs)
    assert any("$rubles_per_credit" not in expr for expr in exprs)
    for expr in exprs:
        assert 'team=~"$team"' in expr, expr
        assert 'model=~"$model"' in expr, expr


def test_operations_doc_queries_use_exported_metrics_and_labels() -> None:
    blocks = PROMQL_BLOCK.findall(OPERATIONS.read_text(encoding="utf-8"))
    assert len(blocks) >= 5
    for block in blocks:
        checker = check(substitute(block))
        assert checker.problems == [], block


def _unit_and_decimals(panel: dict[str, Any], field_name: str | None = None) -> tuple[str, int]:
    """The unit and decimals a panel shows a field with (its overrides applied)."""
    config = panel["fieldConfig"]
    properties = dict(config["defaults"])
    for override in config.get("overrides", []):
        if field_name is not None and override["matcher"]["options"] == field_name:
            properties.update({p["id"]: p["value"] for p in override["properties"]})
    return str(properties.get("unit", "")), int(properties.get("decimals", -1))


def test_every_panel_names_its_unit_with_enough_decimals() -> None:
    """Credits as a named unit, ₽, tokens, seconds; one micro-credit still shows in tables."""
    for panel in data_panels():
        title = panel["title"]
        unit, decimals = _unit_and_decimals(panel)
        assert unit not in {"", "short", "none"}, title
        assert decimals >= 0, title
        exprs = [str(target["expr"]) for target in panel["targets"]]
        money = [expr for expr in exprs if "_credits" in expr and "headroom" not in expr]
        for index, expr in enumerate(money):
            field_name = None
            if panel["type"] == "table":
                renames = {
                    key: value
                    for transformation in panel.get("transformations", [])
                    for key, value in transformation["options"].get("renameByName", {}).items()
                }
                field_name = renames.get(f"Value #{panel['targets'][index]['refId']}")
            shown, places = _unit_and_decimals(panel, field_name)
            if "reset_timestamp" in expr:
                assert shown in {"s", "dateTimeAsIso"}, title
                continue
            if shown == "percentunit":  # a ratio of credits (spent / limit)
                continue
            if "$rubles_per_credit" in expr:
                assert shown == "currencyRUB", title
            else:
                assert "credits" in shown, title
            # Tables list exact amounts: 6 places show one micro-credit (0.000001).
            assert places >= (6 if panel["type"] == "table" else 4), title
        if any("tokens_total" in expr for expr in exprs):
            assert "tokens" in unit, title
        if any("_seconds_bucket" in expr or "age_seconds" in expr for expr in exprs):
            assert unit == "s", title
