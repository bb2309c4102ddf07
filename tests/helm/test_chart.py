"""The Helm chart, rendered by Helm's own engine and checked against Kubernetes' own schemas.

Every ``ci/*-values.yaml`` is rendered with ``Chart.load(path).render(...)`` (helm_python: the
real Helm template engine, offline), each manifest passes ``kubernetes_validate`` in strict mode
at the chart's ``kubeVersion`` floor and at the newest version the package ships, and the
ConfigMap each renders is accepted by ``clipia-proxy check-config``. Refused values must fail
with the chart's own message; optional objects must be absent when disabled.
"""

from __future__ import annotations

import base64
import math
import re
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import yaml
from helm_python import HelmRenderError, HelmValuesError
from helm_python.chart import Chart, lint, values_from_yaml

from clipia_proxy.cli import main
from clipia_proxy.config import load_config

from .manifests import Rendered, container, find, find_all, kinds, pod_spec, workload

pytestmark = pytest.mark.helm

CHART_DIR = Path(__file__).resolve().parents[2] / "deploy" / "helm" / "clipia-proxy"
CI_FILES = sorted((CHART_DIR / "ci").glob("*-values.yaml"))
CI_IDS = [path.name.removesuffix("-values.yaml") for path in CI_FILES]
CENTRAL = [name for name in CI_IDS if name != "sidecar"]
RELEASE = "rel"
NAMESPACE = "ai"
# The ci files carry these canaries; they must reach a Secret and nothing else.
CANARIES = ("ci-not-a-real-clipia-key-0001", "ci-not-a-real-clipia-key-0002", "ci-redis-password")
API_KEY = {"clipia": {"apiKey": "test-not-a-real-clipia-key"}}


def _kube_floor() -> str:
    chart_yaml = yaml.safe_load((CHART_DIR / "Chart.yaml").read_text(encoding="utf-8"))
    match = re.fullmatch(r">=\s*(\d+\.\d+\.\d+)(?:-0)?", chart_yaml["kubeVersion"])
    assert match, f"kubeVersion {chart_yaml['kubeVersion']!r} has no floor"
    return match[1]


KUBE_VERSIONS = (_kube_floor(), kubernetes_validate.latest_version())


def _ci_values(name: str) -> dict[str, Any]:
    return values_from_yaml((CHART_DIR / "ci" / f"{name}-values.yaml").read_text(encoding="utf-8"))


@pytest.fixture(scope="module")
def chart() -> Iterator[Chart]:
    with Chart.load(CHART_DIR) as loaded:
        yield loaded


@pytest.fixture(scope="module")
def ci(chart: Chart) -> dict[str, Rendered]:
    """Each ci values file, rendered once for the whole module."""
    return {name: Rendered.of(chart, _ci_values(name), RELEASE, NAMESPACE) for name in CI_IDS}


def _render(chart: Chart, values: dict[str, Any], name: str = RELEASE) -> Rendered:
    return Rendered.of(chart, values, name, NAMESPACE)


def _refusal(chart: Chart, values: dict[str, Any]) -> str:
    with pytest.raises(HelmRenderError) as caught:
        chart.render(values=values, name=RELEASE, namespace=NAMESPACE)
    message = str(caught.value)
    assert "clipia-proxy: invalid values:" in message
    return message


# --- Helm's own checks --------------------------------------------------------------------


def test_ci_files_cover_every_feature() -> None:
    assert set(CI_IDS) >= {
        "central-sqlite",
        "central-redis",
        "existing-secret",
        "servicemonitor",
        "sidecar",
    }


def test_lint_has_no_errors_with_defaults() -> None:
    report = lint(CHART_DIR, strict=True)
    assert report["errors"] == []
    assert not [m for m in report["messages"] if m["severity"] >= 2]


@pytest.mark.parametrize("name", CI_IDS)
@pytest.mark.parametrize("kube", KUBE_VERSIONS)
def test_lint_has_no_errors_with_ci_values(name: str, kube: str) -> None:
    report = lint(CHART_DIR, _ci_values(name), strict=True, kube_version=f"v{kube}")
    assert report["errors"] == []


@pytest.mark.parametrize("name", CI_IDS)
def test_ci_values_meet_the_schema(chart: Chart, name: str) -> None:
    chart.validate_schema(_ci_values(name))


def test_schema_refuses_unknown_top_level_keys(chart: Chart) -> None:
    with pytest.raises(HelmValuesError, match="replicaCounts"):
        chart.render(values={**API_KEY, "replicaCounts": 2}, name=RELEASE)


def _value_paths(node: object, prefix: str = "") -> Iterator[str]:
    if isinstance(node, dict) and node:
        for key, value in node.items():
            path = f"{prefix}.{key}" if prefix else str(key)
            yield path
            yield from _value_paths(value, path)


def test_every_values_key_is_documented() -> None:
    text = (CHART_DIR / "values.yaml").read_text(encoding="utf-8")
    documented = set(re.findall(r"^\s*## @param (\S+)", text, flags=re.MULTILINE))
    assert re.search(r"^## @section ", text, flags=re.MULTILINE)
    paths = set(_value_paths(yaml.safe_load(text)))
    assert documented <= paths, f"@param for keys that do not exist: {documented - paths}"
    undocumented = {
        path
        for path in paths
        if not any(path == doc or path.startswith(f"{doc}.") for doc in documented)
        and not any(doc.startswith(f"{path}.") for doc in documented)
    }
    assert not undocumented, f"values keys without a @param line: {sorted(undocumented)}"


# --- Kubernetes' own schemas ----------------------------------------------------------------


@pytest.mark.parametrize("name", CI_IDS)
@pytest.mark.parametrize("kube", KUBE_VERSIONS)
def test_manifests_pass_kubernetes_validate(ci: dict[str, Rendered], name: str, kube: str) -> None:
    checked = 0
    for doc in ci[name].docs:
        if doc["apiVersion"].startswith("monitoring.coreos.com/"):
            continue  # CRDs: no schema in kubernetes_validate; see the shape tests below
        kubernetes_validate.validate(doc, kube, strict=True)
        checked += 1
    assert checked


def test_service_monitor_shape(ci: dict[str, Rendered]) -> None:
    rendered = ci["servicemonitor"]
    monitor = find(rendered.docs, "ServiceMonitor")
    service = find(rendered.docs, "Service")
    assert monitor["apiVersion"] == "monitoring.coreos.com/v1"
    assert monitor["metadata"]["namespace"] == NAMESPACE
    assert monitor["metadata"]["labels"]["release"] == "kube-prometheus-stack"
    spec = monitor["spec"]
    assert spec["namespaceSelector"] == {"matchNames": [NAMESPACE]}
    selector = spec["selector"]["matchLabels"]
    assert selector.items() <= service["metadata"]["labels"].items()
    [endpoint] = spec["endpoints"]
    assert endpoint["port"] == "admin"
    assert endpoint["path"] == "/metrics"
    assert endpoint["interval"] == "15s"
    assert "admin" in {port["name"] for port in service["spec"]["ports"]}
    # /metrics behind the admin token: the monitor sends it, the gateway is told where it is.
    assert endpoint["bearerTokenSecret"] == {"name": "clipia-admin-token", "key": "admin-token"}
    deployment = workload(rendered.docs)
    [env] = [e for e in container(deployment)["env"] if e["name"] == "CLIPIA_ADMIN_TOKEN"]
    assert env["valueFrom"]["secretKeyRef"] == {"name": "clipia-admin-token", "key": "admin-token"}
    config = yaml.safe_load(find(rendered.docs, "ConfigMap")["data"]["config.yaml"])
    assert config["server"]["admin_token_env"] == "CLIPIA_ADMIN_TOKEN"


def test_prometheus_rule_renders_the_rules_file(ci: dict[str, Rendered]) -> None:
    rule = find(ci["servicemonitor"].docs, "PrometheusRule")
    source = yaml.safe_load(
        (CHART_DIR / "files" / "clipia-proxy-rules.yaml").read_text(encoding="utf-8")
    )
    assert rule["apiVersion"] == "monitoring.coreos.com/v1"
    assert rule["metadata"]["labels"]["release"] == "kube-prometheus-stack"
    assert rule["spec"]["groups"] == source["groups"]
    assert rule["spec"]["groups"]
    for group in rule["spec"]["groups"]:
        assert group["name"]
        assert group["rules"]
        for item in group["rules"]:
            assert ("alert" in item) != ("record" in item)
            assert isinstance(item["expr"], str | int)


# --- what the gateway needs -----------------------------------------------------------------


@pytest.mark.parametrize("name", CI_IDS)
def test_rendered_config_passes_check_config(
    ci: dict[str, Rendered], name: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    config = find(ci[name].docs, "ConfigMap")["data"]["config.yaml"]
    path = tmp_path / "config.yaml"
    path.write_text(config, encoding="utf-8")
    assert main(["check-config", str(path)]) == 0, capsys.readouterr().err
    assert "config.yaml: ok:" in capsys.readouterr().out


def test_logging_values_reach_the_config_and_pass_check_config(
    chart: Chart, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    logging_values = {"level": "WARNING", "format": "text", "access_log": False}
    rendered = _render(chart, {**API_KEY, "config": {"logging": logging_values}})
    text = find(rendered.docs, "ConfigMap")["data"]["config.yaml"]
    assert yaml.safe_load(text)["logging"] == logging_values
    path = tmp_path / "config.yaml"
    path.write_text(text, encoding="utf-8")
    assert main(["check-config", str(path)]) == 0, capsys.readouterr().err
    config = load_config(path, resolve_secrets=False)
    assert (config.logging.level, config.logging.format, config.logging.access_log) == (
        "WARNING",
        "text",
        False,
    )


def test_schema_refuses_an_unknown_log_level(chart: Chart) -> None:
    with pytest.raises(HelmValuesError, match="/config/logging/level"):
        chart.render(values={**API_KEY, "config": {"logging": {"level": "VERBOSE"}}}, name=RELEASE)


@pytest.mark.parametrize("name", CI_IDS)
def test_secrets_never_reach_the_config_map(ci: dict[str, Rendered], name: str) -> None:
    rendered = ci[name]
    for doc in rendered.docs:
        if doc["kind"] != "Secret":
            text = yaml.safe_dump(doc)
            assert not [canary for canary in CANARIES if canary in text], doc["kind"]
    assert not [canary for canary in CANARIES if canary in rendered.notes]
    config = yaml.safe_load(find(rendered.docs, "ConfigMap")["data"]["config.yaml"])
    assert config["upstream"]["api_key_env"] == "CLIPIA_API_KEY"
    assert "api_key_file" not in config["upstream"]


def _secret_value(docs: list[dict[str, Any]], ref: dict[str, str]) -> str:
    secret = find(docs, "Secret", name=ref["name"])
    return base64.b64decode(secret["data"][ref["key"]]).decode()


def test_chart_secret_holds_the_key_and_the_redis_url(ci: dict[str, Rendered]) -> None:
    docs = ci["central-redis"].docs
    env = {item["name"]: item for item in container(workload(docs))["env"]}
    assert set(env) >= {"CLIPIA_API_KEY", "REDIS_URL"}
    for item in env.values():
        assert "value" not in item or item["name"] not in {"CLIPIA_API_KEY", "REDIS_URL"}
    clipia_ref = env["CLIPIA_API_KEY"]["valueFrom"]["secretKeyRef"]
    redis_ref = env["REDIS_URL"]["valueFrom"]["secretKeyRef"]
    assert _secret_value(docs, clipia_ref) == "ci-not-a-real-clipia-key-0002"
    assert _secret_value(docs, redis_ref).startswith("redis://:ci-redis-password@")
    dsn_ref = env["CLIPIA_LEDGER_DSN"]["valueFrom"]["secretKeyRef"]
    assert _secret_value(docs, dsn_ref).startswith("postgresql://clipia:ci-pg-password@")
    config = yaml.safe_load(find(docs, "ConfigMap")["data"]["config.yaml"])
    assert config["store"]["redis_url_env"] == "REDIS_URL"
    assert config["ledger"] == {"backend": "postgres", "postgres_dsn_env": "CLIPIA_LEDGER_DSN"}
    assert "ci-pg-password" not in find(docs, "ConfigMap")["data"]["config.yaml"]


def test_migrations_run_in_an_init_container_before_the_gateway(ci: dict[str, Rendered]) -> None:
    deployment = workload(ci["central-redis"].docs)
    (init,) = pod_spec(deployment)["initContainers"]
    gateway = container(deployment)
    assert init["args"] == ["migrate", "--config", "/etc/clipia-proxy/config.yaml"]
    assert init["image"] == gateway["image"]
    assert init["securityContext"] == gateway["securityContext"]
    env = {item["name"]: item["valueFrom"]["secretKeyRef"] for item in init["env"]}
    assert env["CLIPIA_LEDGER_DSN"] == {
        "name": find(ci["central-redis"].docs, "Secret")["metadata"]["name"],
        "key": "ledger-dsn",
    }
    assert "initContainers" not in pod_spec(workload(ci["central-sqlite"].docs))


def test_existing_secrets_are_referenced_and_no_secret_is_rendered(
    ci: dict[str, Rendered],
) -> None:
    docs = ci["existing-secret"].docs
    assert "Secret" not in kinds(docs)
    env = {item["name"]: item for item in container(workload(docs))["env"]}
    assert env["CLIPIA_API_KEY"]["valueFrom"]["secretKeyRef"] == {
        "name": "clipia-upstream",
        "key": "token",
    }
    assert env["REDIS_URL"]["valueFrom"]["secretKeyRef"] == {"name": "shared-redis", "key": "url"}
    assert env["CLIPIA_LEDGER_DSN"]["valueFrom"]["secretKeyRef"] == {
        "name": "ledger-db",
        "key": "dsn",
    }


@pytest.mark.parametrize("name", CENTRAL)
def test_pods_are_locked_down(ci: dict[str, Rendered], name: str) -> None:
    docs = ci[name].docs
    spec = pod_spec(workload(docs))
    assert spec["automountServiceAccountToken"] is False
    assert spec["securityContext"]["runAsNonRoot"] is True
    assert spec["securityContext"]["runAsUser"] > 0
    assert spec["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}
    security = container(workload(docs))["securityContext"]
    assert security["readOnlyRootFilesystem"] is True
    assert security["allowPrivilegeEscalation"] is False
    assert security["capabilities"] == {"drop": ["ALL"]}
    assert security["runAsNonRoot"] is True
    mounts = {m["mountPath"]: m["name"] for m in container(workload(docs))["volumeMounts"]}
    volumes = {v["name"]: v for v in spec["volumes"]}
    assert "emptyDir" in volumes[mounts["/tmp"]]  # noqa: S108 - the mount path, not a file
    account = find(docs, "ServiceAccount")
    assert account["automountServiceAccountToken"] is False
    assert spec["serviceAccountName"] == account["metadata"]["name"]


@pytest.mark.parametrize("name", CENTRAL)
def test_probes_are_on_the_admin_port(ci: dict[str, Rendered], name: str) -> None:
    docs = ci[name].docs
    gateway = container(workload(docs))
    ports = {port["name"]: port["containerPort"] for port in gateway["ports"]}
    config = yaml.safe_load(find(docs, "ConfigMap")["data"]["config.yaml"])
    assert ports == {"http": config["server"]["port"], "admin": config["server"]["admin_port"]}
    assert gateway["livenessProbe"]["httpGet"] == {"path": "/healthz", "port": "admin"}
    assert gateway["readinessProbe"]["httpGet"] == {"path": "/readyz", "port": "admin"}
    assert gateway["startupProbe"]["httpGet"] == {"path": "/healthz", "port": "admin"}


@pytest.mark.parametrize("name", CENTRAL)
def test_config_is_mounted_as_a_directory(ci: dict[str, Rendered], name: str) -> None:
    docs = ci[name].docs
    gateway = container(workload(docs))
    assert gateway["args"] == ["serve", "--config", "/etc/clipia-proxy/config.yaml"]
    [mount] = [m for m in gateway["volumeMounts"] if m["mountPath"] == "/etc/clipia-proxy"]
    assert "subPath" not in mount
    assert mount["readOnly"] is True
    volumes = {v["name"]: v for v in pod_spec(workload(docs))["volumes"]}
    assert (
        volumes[mount["name"]]["configMap"]["name"] == find(docs, "ConfigMap")["metadata"]["name"]
    )


@pytest.mark.parametrize("name", CENTRAL)
def test_grace_covers_prestop_shutdown_grace_and_headroom(
    chart: Chart, ci: dict[str, Rendered], name: str
) -> None:
    docs = ci[name].docs
    merged = chart.merge_values(_ci_values(name))
    spec = pod_spec(workload(docs))
    pre_stop = container(workload(docs))["lifecycle"]["preStop"]["exec"]["command"]
    assert pre_stop[0] == "sleep"
    sleep = int(pre_stop[1])
    assert sleep == merged["lifecycle"]["preStopSleepSeconds"] > 0
    config = yaml.safe_load(find(docs, "ConfigMap")["data"]["config.yaml"])
    grace = math.ceil(config["server"]["shutdown_grace_seconds"])
    headroom = merged["lifecycle"]["terminationGraceHeadroomSeconds"]
    assert headroom > 0
    assert spec["terminationGracePeriodSeconds"] >= sleep + grace + headroom


def test_grace_is_derived_from_shutdown_grace_seconds(chart: Chart) -> None:
    values = {**API_KEY, "config": {"server": {"shutdown_grace_seconds": 40.5}}}
    spec = pod_spec(find(_render(chart, values).docs, "Deployment"))
    assert spec["terminationGracePeriodSeconds"] == 5 + 41 + 10


def test_checksums_roll_pods_on_restart_only_config_and_secret_changes(chart: Chart) -> None:
    def annotations(values: dict[str, Any]) -> dict[str, str]:
        deployment = find(_render(chart, values).docs, "Deployment")
        result: dict[str, str] = deployment["spec"]["template"]["metadata"]["annotations"]
        return result

    base = annotations(API_KEY)
    assert set(base) >= {"checksum/config", "checksum/secret"}
    new_key = annotations({"clipia": {"apiKey": "test-rotated-clipia-key"}})
    assert new_key["checksum/secret"] != base["checksum/secret"]
    assert new_key["checksum/config"] == base["checksum/config"]
    # Team policy is hot-reloaded from the mounted ConfigMap: no rollout.
    new_team = annotations({**API_KEY, "config": {"teams": [{"id": "search"}]}})
    assert new_team["checksum/config"] == base["checksum/config"]
    assert new_team["checksum/secret"] == base["checksum/secret"]
    # So is logging (level, format, access log).
    new_logging = annotations({**API_KEY, "config": {"logging": {"level": "DEBUG"}}})
    assert new_logging["checksum/config"] == base["checksum/config"]
    # A restart-only setting rolls the pods.
    new_timeout = annotations(
        {**API_KEY, "config": {"upstream": {"first_byte_timeout_seconds": 30}}}
    )
    assert new_timeout["checksum/config"] != base["checksum/config"]


def test_sqlite_keeps_one_writer_on_a_volume(ci: dict[str, Rendered]) -> None:
    docs = ci["central-sqlite"].docs
    deployment = workload(docs)
    assert deployment["spec"]["replicas"] == 1
    assert deployment["spec"]["strategy"] == {"type": "Recreate"}
    config = yaml.safe_load(find(docs, "ConfigMap")["data"]["config.yaml"])
    assert config["store"] == config["store"] | {"backend": "sqlite", "replicas": 1}
    data_dir = str(Path(config["store"]["sqlite_path"]).parent)
    [mount] = [m for m in container(deployment)["volumeMounts"] if m["mountPath"] == data_dir]
    volumes = {v["name"]: v for v in pod_spec(deployment)["volumes"]}
    claim = volumes[mount["name"]]["persistentVolumeClaim"]["claimName"]
    assert find(docs, "PersistentVolumeClaim", name=claim)


def test_redis_replicas_roll_without_losing_capacity(ci: dict[str, Rendered]) -> None:
    docs = ci["central-redis"].docs
    deployment = workload(docs)
    assert "replicas" not in deployment["spec"]  # the HPA owns it
    assert deployment["spec"]["strategy"]["rollingUpdate"]["maxUnavailable"] == 0
    hpa = find(docs, "HorizontalPodAutoscaler")
    assert hpa["apiVersion"] == "autoscaling/v2"
    assert hpa["spec"]["scaleTargetRef"]["name"] == deployment["metadata"]["name"]
    config = yaml.safe_load(find(docs, "ConfigMap")["data"]["config.yaml"])
    assert config["store"]["replicas"] == hpa["spec"]["maxReplicas"] == 6


@pytest.mark.parametrize("name", CENTRAL)
def test_selectors_pick_the_gateway_pods_only(ci: dict[str, Rendered], name: str) -> None:
    docs = ci[name].docs
    deployment = workload(docs)
    pod_labels = deployment["spec"]["template"]["metadata"]["labels"]
    selector = find(docs, "Service")["spec"]["selector"]
    assert selector == deployment["spec"]["selector"]["matchLabels"]
    assert selector.items() <= pod_labels.items()
    for kind in ("PodDisruptionBudget", "NetworkPolicy"):
        for doc in find_all(docs, kind):
            key = "selector" if kind == "PodDisruptionBudget" else "podSelector"
            assert doc["spec"][key]["matchLabels"] == selector
    test_pod = find(docs, "Pod")
    assert test_pod["metadata"]["annotations"]["helm.sh/hook"] == "test"
    assert not selector.items() <= test_pod["metadata"]["labels"].items()
    assert test_pod["spec"]["containers"][0]["command"][-1].endswith("/readyz")


def test_network_policy_admits_clients_and_reaches_clipia_and_redis(
    ci: dict[str, Rendered],
) -> None:
    policy = find(ci["central-redis"].docs, "NetworkPolicy")
    assert policy["spec"]["policyTypes"] == ["Ingress", "Egress"]
    ingress_ports = [rule["ports"][0]["port"] for rule in policy["spec"]["ingress"]]
    assert ingress_ports == ["http", "admin"]
    egress_ports = {port["port"] for rule in policy["spec"]["egress"] for port in rule["ports"]}
    assert egress_ports >= {53, 443, 6379, 5432}  # DNS, Clipia, Redis, the PostgreSQL ledger
    test_pod = find(ci["central-redis"].docs, "Pod")
    admin_peers = [
        p["podSelector"]["matchLabels"]
        for p in policy["spec"]["ingress"][1]["from"]
        if "podSelector" in p
    ]
    assert [peer.items() <= test_pod["metadata"]["labels"].items() for peer in admin_peers] == [
        True
    ]


def test_long_release_names_are_cut_to_63(chart: Chart) -> None:
    name = "a-release-name-that-is-long-enough-to-overflow-a-dns-label-easily"
    for doc in _render(chart, API_KEY, name=name).docs:
        assert len(doc["metadata"]["name"]) <= 63
        assert re.fullmatch(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?", doc["metadata"]["name"])


# --- refused values -------------------------------------------------------------------------

REFUSED: dict[str, tuple[dict[str, Any], str]] = {
    "sqlite-with-replicas": (
        {"replicaCount": 2},
        "config.store.backend sqlite serves one replica only (replicaCount is 2); use redis",
    ),
    "hpa-with-sqlite": (
        {"autoscaling": {"enabled": True}},
        "autoscaling.enabled needs config.store.backend redis: sqlite serves one replica only",
    ),
    "redis-without-url": (
        {"config": {"store": {"backend": "redis"}}},
        "config.store.backend redis needs redis.url or redis.existingSecret",
    ),
    "redis-without-postgres": (
        {"redis": {"url": "redis://r:6379"}, "config": {"store": {"backend": "redis"}}},
        "config.store.backend redis needs the PostgreSQL ledger (Redis keeps no records): set "
        "postgres.dsn or postgres.existingSecret",
    ),
    "chart-owned-ledger-key": (
        {"config": {"ledger": {"postgres_dsn_env": "X"}}},
        "config.ledger.postgres_dsn_env is set by the chart",
    ),
    "servicemonitor-without-metrics": (
        {"serviceMonitor": {"enabled": True}, "metrics": {"enabled": False}},
        "serviceMonitor.enabled needs metrics.enabled",
    ),
    "fixed-without-team": (
        {"config": {"auth": {"mode": "fixed"}}},
        "config.auth.mode fixed needs config.auth.team",
    ),
    "sidecar-with-sqlite": (
        {"mode": "sidecar", "config": {"auth": {"team": "search"}, "teams": [{"id": "search"}]}},
        "mode sidecar needs config.store.backend redis",
    ),
    "sidecar-without-team": (
        {
            "mode": "sidecar",
            "redis": {"url": "redis://r:6379"},
            "config": {"store": {"backend": "redis"}},
        },
        "mode sidecar needs config.auth.team",
    ),
    "unknown-team": (
        {"config": {"auth": {"mode": "fixed", "team": "ghost"}, "teams": [{"id": "search"}]}},
        'config.auth.team "ghost" is not the id of any config.teams entry',
    ),
    "grace-too-short": (
        {"lifecycle": {"terminationGracePeriodSeconds": 20}},
        "lifecycle.terminationGracePeriodSeconds (20) must be at least",
    ),
    "chart-owned-key": (
        {"config": {"store": {"sqlite_path": "/data/x.db"}}},
        "config.store.sqlite_path is set by the chart",
    ),
    "inline-secret": (
        {"config": {"upstream": {"base_url": "https://api.clipia.ai/v1?k=clipia_live_abc"}}},
        "config holds something that looks like a secret",
    ),
    "team-without-fixed-mode": (
        {"config": {"auth": {"team": "search"}, "teams": [{"id": "search"}]}},
        "config.auth.team is only used with config.auth.mode fixed",
    ),
    "test-team-without-sandbox-key": (
        {"config": {"teams": [{"id": "lab", "environment": "test"}]}},
        "config.teams lab have environment: test and need Clipia's sandbox key",
    ),
    "chart-owned-test-key-env": (
        {"config": {"upstream": {"test_api_key_env": "MY_TEST_KEY"}}},
        "config.upstream.test_api_key_env is set by the chart",
    ),
    "chart-owned-journal-path": (
        {"config": {"store": {"journal_path": "/tmp/journal.jsonl"}}},  # noqa: S108
        "config.store.journal_path is set by the chart",
    ),
    "chart-owned-key-usage-path": (
        {"config": {"accounting": {"key_usage_path": "/data/usage.jsonl"}}},
        "config.accounting.key_usage_path is set by the chart",
    ),
    "admin-token-env-without-secret": (
        {"config": {"server": {"admin_token_env": "TOKEN"}}},
        "config.server.admin_token_env is set by the chart",
    ),
    "hash-key-env-without-secret": (
        {"config": {"attribution": {"end_user_hash_key_env": "K"}}},
        "config.attribution.end_user_hash_key_env is set by the chart",
    ),
    "proxy-url-with-password": (
        {"config": {"upstream": {"proxy_url": "http://user:pw@proxy.corp:3128"}}},
        "config.upstream.proxy_url carries a user and password",
    ),
    "two-egress-proxies": (
        {
            "egressProxy": {"existingSecret": "corp-proxy"},
            "config": {"upstream": {"proxy_url": "http://proxy.corp:3128"}},
        },
        "egressProxy.existingSecret and config.upstream.proxy_url both name the egress proxy",
    ),
    "egress-secret-without-trust-env": (
        {
            "egressProxy": {"existingSecret": "corp-proxy"},
            "config": {"upstream": {"trust_env": False}},
        },
        "egressProxy.existingSecret needs config.upstream.trust_env",
    ),
    "statefulset-with-shared-claim": (
        {"workload": "StatefulSet", "persistence": {"existingClaim": "mine"}},
        "workload StatefulSet gives each replica its own claim",
    ),
    "statefulset-sidecar": (
        {
            "mode": "sidecar",
            "workload": "StatefulSet",
            "redis": {"url": "redis://r:6379"},
            "postgres": {"dsn": "postgresql://u@h/db"},
            "config": {
                "store": {"backend": "redis"},
                "auth": {"team": "search"},
                "teams": [{"id": "search"}],
            },
        },
        "workload StatefulSet needs mode central",
    ),
    "same-ports": (
        {"config": {"server": {"port": 9090}}},
        "config.server.admin_port must differ from config.server.port",
    ),
}


@pytest.mark.parametrize("case", list(REFUSED))
def test_invalid_values_are_refused_with_the_charts_message(chart: Chart, case: str) -> None:
    values, expected = REFUSED[case]
    assert expected in _refusal(chart, {**API_KEY, **values})


def test_schema_refuses_a_plaintext_team_key(chart: Chart) -> None:
    team = {"id": "search", "keys": [{"id": "k1", "key": "not-a-hash"}]}
    with pytest.raises(HelmValuesError, match="additional properties 'key'"):
        chart.render(values={**API_KEY, "config": {"teams": [team]}}, name=RELEASE)


def test_schema_refuses_an_unknown_workload(chart: Chart) -> None:
    with pytest.raises(HelmValuesError, match="/workload"):
        chart.render(values={**API_KEY, "workload": "DaemonSet"}, name=RELEASE)


def test_a_missing_clipia_key_is_refused(chart: Chart) -> None:
    assert "the Clipia key is missing" in _refusal(chart, {})


def test_a_bare_n_in_caps_is_refused(chart: Chart) -> None:
    values = values_from_yaml(
        "clipia: {apiKey: k}\nconfig: {teams: [{id: search, caps: {n: 1}}]}\n"
    )
    assert "config.teams[0].caps: quote the key n" in _refusal(chart, values)


def test_every_problem_is_reported_at_once(chart: Chart) -> None:
    message = _refusal(
        chart,
        {
            "replicaCount": 3,
            "config": {"auth": {"mode": "fixed"}},
            "metrics": {"enabled": False},
            "serviceMonitor": {"enabled": True},
        },
    )
    problems = [line for line in message.splitlines() if line.startswith("  - ")]
    assert len(problems) == 4, message


# --- per-replica files and the StatefulSet ------------------------------------------------


def _data_volume(docs: list[dict[str, Any]], directory: str) -> dict[str, Any]:
    """The volume mounted (writable) at ``directory`` in the gateway container."""
    gateway = container(workload(docs))
    [mount] = [m for m in gateway["volumeMounts"] if m["mountPath"] == directory]
    assert not mount.get("readOnly")
    spec = workload(docs)["spec"]
    volumes = {v["name"]: v for v in spec["template"]["spec"]["volumes"]}
    claims = {c["metadata"]["name"]: c for c in spec.get("volumeClaimTemplates", [])}
    assert (mount["name"] in volumes) != (mount["name"] in claims)
    return volumes.get(mount["name"]) or {"claim": claims[mount["name"]]}


@pytest.mark.parametrize("name", CENTRAL)
def test_per_replica_files_are_on_a_writable_volume(
    chart: Chart, ci: dict[str, Rendered], name: str
) -> None:
    """The outage journal and the key usage snapshots: never on the read-only root filesystem."""
    docs = ci[name].docs
    config = yaml.safe_load(find(docs, "ConfigMap")["data"]["config.yaml"])
    journal = Path(config["store"]["journal_path"])
    usage = Path(config["accounting"]["key_usage_path"])
    assert journal.parent == usage.parent == Path("/var/lib/clipia-proxy")
    volume = _data_volume(docs, str(journal.parent))
    backend = config["store"]["backend"]
    if workload(docs)["kind"] == "StatefulSet":
        assert volume["claim"]["metadata"]["name"] == "clipia-proxy-data"
    elif backend == "sqlite" and chart.merge_values(_ci_values(name))["persistence"]["enabled"]:
        assert "persistentVolumeClaim" in volume
    elif backend == "sqlite":  # persistence off: the ledger itself resets with the pod
        assert volume["emptyDir"] == {}
    else:  # redis on a Deployment: kept across container restarts, lost with the pod
        assert volume["emptyDir"] == {"sizeLimit": "256Mi"}


def test_a_sidecar_keeps_its_journal_on_an_empty_dir(tmp_path: Path) -> None:
    with Chart.load(_app_chart(tmp_path)) as app_chart:
        rendered = Rendered.of(app_chart, {}, RELEASE, NAMESPACE)
    deployment = find(rendered.docs, "Deployment", name="app")
    gateway = container(deployment, "clipia-proxy")
    [mount] = [m for m in gateway["volumeMounts"] if m["mountPath"] == "/var/lib/clipia-proxy"]
    volumes = {v["name"]: v for v in pod_spec(deployment)["volumes"]}
    assert "emptyDir" in volumes[mount["name"]]
    config = yaml.safe_load(find(rendered.docs, "ConfigMap")["data"]["config.yaml"])
    assert config["store"]["journal_path"].startswith("/var/lib/clipia-proxy/")


def test_a_statefulset_gives_each_replica_its_own_claim(ci: dict[str, Rendered]) -> None:
    docs = ci["statefulset"].docs
    gateway = find(docs, "StatefulSet")
    assert "Deployment" not in kinds(docs)
    assert "PersistentVolumeClaim" not in kinds(docs)  # the claims come from the template
    assert gateway["spec"]["replicas"] == 2
    assert gateway["spec"]["serviceName"] == find(docs, "Service")["metadata"]["name"]
    assert gateway["spec"]["updateStrategy"] == {"type": "RollingUpdate"}
    [claim] = gateway["spec"]["volumeClaimTemplates"]
    assert claim["spec"]["resources"]["requests"]["storage"] == "2Gi"
    assert _data_volume(docs, "/var/lib/clipia-proxy")["claim"] is claim


def test_notes_warn_when_a_fail_open_journal_dies_with_the_pod(
    chart: Chart, ci: dict[str, Rendered]
) -> None:
    assert "rollout status statefulset/rel-clipia-proxy" in ci["statefulset"].notes
    assert "outage journal is on an emptyDir" not in ci["statefulset"].notes
    values = _ci_values("statefulset") | {"workload": "Deployment"}
    notes = _render(chart, values).notes
    assert "rollout status deployment/rel-clipia-proxy" in notes
    assert "outage journal is on an emptyDir" in notes
    assert "outage journal is on an emptyDir" not in ci["central-redis"].notes  # fail_closed


def test_an_autoscaled_statefulset_is_the_hpas_target(chart: Chart) -> None:
    values = _ci_values("statefulset") | {"autoscaling": {"enabled": True, "maxReplicas": 4}}
    docs = _render(chart, values).docs
    target = find(docs, "HorizontalPodAutoscaler")["spec"]["scaleTargetRef"]
    assert target == {"apiVersion": "apps/v1", "kind": "StatefulSet", "name": "rel-clipia-proxy"}
    for kube in KUBE_VERSIONS:
        kubernetes_validate.validate(find(docs, "StatefulSet"), kube, strict=True)


def test_without_persistence_a_statefulset_uses_an_empty_dir(chart: Chart) -> None:
    values = _ci_values("statefulset") | {"persistence": {"enabled": False}}
    docs = _render(chart, values).docs
    assert "volumeClaimTemplates" not in find(docs, "StatefulSet")["spec"]
    assert "emptyDir" in _data_volume(docs, "/var/lib/clipia-proxy")


# --- this round's config: sandbox key, egress proxy, attribution, /mcp, per-key limits -------


def test_new_config_reaches_the_gateway(ci: dict[str, Rendered], tmp_path: Path) -> None:
    docs = ci["statefulset"].docs
    text = find(docs, "ConfigMap")["data"]["config.yaml"]
    path = tmp_path / "config.yaml"
    path.write_text(text, encoding="utf-8")
    config = load_config(path, resolve_secrets=False)
    assert config.upstream.test_api_key_env == "CLIPIA_TEST_API_KEY"
    assert config.upstream.trust_env is True
    assert config.upstream.proxy_url is None
    assert config.upstream.transport == "aiohttp"
    assert config.upstream.max_connections_per_team == 64
    assert config.attribution.end_user_hash_key_env == "CLIPIA_PROXY_USER_HASH_KEY"
    assert set(config.attribution.tags) == {"service", "ticket"}
    assert config.mcp.allowed_origins == ("https://chat.example.com", "http://localhost:*")
    assert config.ledger.retention_months == 13
    [key] = config.teams[0].keys
    assert key.limits is not None
    assert (key.limits.rpm, key.limits.concurrency) == (30, 2)
    assert config.teams[1].environment == "test"
    env = {e["name"]: e for e in container(workload(docs))["env"]}
    refs = {
        name: item["valueFrom"]["secretKeyRef"] for name, item in env.items() if "valueFrom" in item
    }
    assert refs["CLIPIA_TEST_API_KEY"] == {"name": "clipia-sandbox", "key": "test-api-key"}
    assert refs["HTTPS_PROXY"] == refs["HTTP_PROXY"] == {"name": "corp-proxy", "key": "proxy-url"}
    assert refs["CLIPIA_PROXY_USER_HASH_KEY"] == {"name": "user-hash", "key": "user-hash-key"}
    assert env["NO_PROXY"]["value"] == ".svc,.cluster.local"


def test_the_sandbox_key_can_live_in_the_charts_secret(chart: Chart) -> None:
    values = {
        "clipia": {"apiKey": "test-not-a-real-clipia-key", "testApiKey": "ci-sandbox-key-0003"},
        "config": {"teams": [{"id": "lab", "environment": "test"}]},
    }
    docs = _render(chart, values).docs
    env = {e["name"]: e for e in container(workload(docs))["env"]}
    ref = env["CLIPIA_TEST_API_KEY"]["valueFrom"]["secretKeyRef"]
    assert _secret_value(docs, ref) == "ci-sandbox-key-0003"
    assert "ci-sandbox-key-0003" not in find(docs, "ConfigMap")["data"]["config.yaml"]


def test_optional_secret_env_is_absent_by_default(chart: Chart) -> None:
    docs = _render(chart, API_KEY).docs
    names = {e["name"] for e in container(workload(docs))["env"]}
    assert names == {"CLIPIA_API_KEY"}
    config = yaml.safe_load(find(docs, "ConfigMap")["data"]["config.yaml"])
    assert "test_api_key_env" not in config["upstream"]
    assert "trust_env" not in config["upstream"]
    assert "attribution" not in config


# --- absent when disabled -------------------------------------------------------------------


def test_optional_objects_are_absent_by_default(chart: Chart) -> None:
    docs = _render(chart, API_KEY).docs
    assert kinds(docs) == {
        "ConfigMap",
        "Secret",
        "ServiceAccount",
        "PersistentVolumeClaim",
        "Deployment",
        "Service",
        "PodDisruptionBudget",
        "Pod",
    }
    for absent in ("ServiceMonitor", "PrometheusRule", "HorizontalPodAutoscaler", "NetworkPolicy"):
        assert absent not in kinds(docs)


def test_metrics_disabled_hides_the_admin_port_and_the_test(chart: Chart) -> None:
    docs = _render(chart, {**API_KEY, "metrics": {"enabled": False}}).docs
    assert [port["name"] for port in find(docs, "Service")["spec"]["ports"]] == ["http"]
    assert "Pod" not in kinds(docs)


def test_without_persistence_sqlite_lives_on_an_empty_dir(chart: Chart) -> None:
    docs = _render(chart, {**API_KEY, "persistence": {"enabled": False}}).docs
    assert "PersistentVolumeClaim" not in kinds(docs)
    volumes = {v["name"]: v for v in pod_spec(workload(docs))["volumes"]}
    assert "emptyDir" in volumes["clipia-proxy-data"]


# --- sidecar mode ---------------------------------------------------------------------------


def test_sidecar_mode_renders_config_only(ci: dict[str, Rendered]) -> None:
    rendered = ci["sidecar"]
    assert kinds(rendered.docs) == {"ConfigMap"}  # both Secrets exist already
    config = yaml.safe_load(find(rendered.docs, "ConfigMap")["data"]["config.yaml"])
    assert config["server"]["host"] == "127.0.0.1"
    # metrics.enabled (the default): the admin port alone is open to the pod network.
    assert config["server"]["admin_host"] == "0.0.0.0"  # noqa: S104
    assert config["auth"] == config["auth"] | {"mode": "fixed", "team": "search"}
    assert config["store"]["backend"] == "redis"
    assert "OPENAI_BASE_URL" in rendered.notes
    assert "value: http://127.0.0.1:8080/v1" in rendered.notes
    assert 'include "clipia-proxy.sidecarContainer"' in rendered.notes


def test_a_sidecar_without_metrics_keeps_both_ports_on_loopback(chart: Chart) -> None:
    sidecar = yaml.safe_load((CHART_DIR / "ci" / "sidecar-values.yaml").read_text(encoding="utf-8"))
    rendered = _render(chart, {**sidecar, "metrics": {"enabled": False}})
    config = yaml.safe_load(find(rendered.docs, "ConfigMap")["data"]["config.yaml"])
    assert config["server"]["host"] == "127.0.0.1"
    assert "admin_host" not in config["server"]


def _app_chart(tmp_path: Path, **overrides: Any) -> Path:
    """An app chart that depends on clipia-proxy and adds its container to its own pod."""
    app = tmp_path / "app"
    shutil.copytree(CHART_DIR, app / "charts" / "clipia-proxy", ignore=shutil.ignore_patterns("ci"))
    (app / "templates").mkdir()
    (app / "Chart.yaml").write_text(
        "apiVersion: v2\nname: app\nversion: 1.0.0\n"
        "dependencies:\n  - name: clipia-proxy\n    version: 0.1.0\n",
        encoding="utf-8",
    )
    sidecar = yaml.safe_load((CHART_DIR / "ci" / "sidecar-values.yaml").read_text(encoding="utf-8"))
    sidecar.update(overrides)
    (app / "values.yaml").write_text(yaml.safe_dump({"clipia-proxy": sidecar}), encoding="utf-8")
    (app / "templates" / "deployment.yaml").write_text(
        """\
{{- $gw := index .Subcharts "clipia-proxy" }}
apiVersion: apps/v1
kind: Deployment
metadata:
  name: app
spec:
  selector:
    matchLabels: {app: app}
  template:
    metadata:
      labels: {app: app}
      annotations:
        {{- include "clipia-proxy.sidecarPodAnnotations" $gw | nindent 8 }}
    spec:
      terminationGracePeriodSeconds: {{ include "clipia-proxy.terminationGracePeriodSeconds" $gw }}
      containers:
        - name: app
          image: registry.example/app:1
          env:
            - name: OPENAI_BASE_URL
              value: http://127.0.0.1:{{ include "clipia-proxy.port" $gw }}/v1
        - {{ include "clipia-proxy.sidecarContainer" $gw | indent 10 | trim }}
      volumes:
        {{- include "clipia-proxy.sidecarVolumes" $gw | nindent 8 }}
""",
        encoding="utf-8",
    )
    return app


def test_an_app_chart_can_include_the_sidecar_container(
    ci: dict[str, Rendered], tmp_path: Path
) -> None:
    with Chart.load(_app_chart(tmp_path)) as app_chart:
        rendered = Rendered.of(app_chart, {}, RELEASE, NAMESPACE)
    deployment = find(rendered.docs, "Deployment", name="app")
    for kube in KUBE_VERSIONS:
        kubernetes_validate.validate(deployment, kube, strict=True)
    spec = pod_spec(deployment)
    gateway = container(deployment, "clipia-proxy")
    central = container(workload(ci["central-redis"].docs))
    # One container helper: the sidecar is the central container minus the API port, probed
    # from inside; its admin port (metrics.enabled) is named for a PodMonitor.
    for key in ("image", "args", "securityContext", "resources", "lifecycle"):
        assert gateway[key] == central[key], key
    assert gateway["ports"] == [{"name": "clipia-admin", "containerPort": 9090, "protocol": "TCP"}]
    # The admin port is on the pod network: the kubelet probes it (no python started per probe).
    assert gateway["readinessProbe"]["httpGet"] == {"path": "/readyz", "port": "clipia-admin"}
    assert gateway["livenessProbe"]["httpGet"] == {"path": "/healthz", "port": "clipia-admin"}
    env = {item["name"]: item["valueFrom"]["secretKeyRef"]["name"] for item in gateway["env"]}
    assert env == {
        "CLIPIA_API_KEY": "clipia-upstream",
        "REDIS_URL": "shared-redis",
        "CLIPIA_LEDGER_DSN": "shared-ledger",
    }
    volumes = {v["name"]: v for v in spec["volumes"]}
    config_map = find(rendered.docs, "ConfigMap")["metadata"]["name"]
    assert volumes["clipia-proxy-config"]["configMap"]["name"] == config_map
    annotations = deployment["spec"]["template"]["metadata"]["annotations"]
    assert set(annotations) == {"checksum/clipia-proxy-config", "checksum/clipia-proxy-secret"}
    assert container(deployment, "app")["env"][0]["value"] == "http://127.0.0.1:8080/v1"


# --- the image the chart runs ---------------------------------------------------------------


def test_a_sidecar_without_metrics_is_probed_from_inside(tmp_path: Path) -> None:
    """metrics.enabled false: both ports on 127.0.0.1, which the kubelet cannot reach."""
    with Chart.load(_app_chart(tmp_path, metrics={"enabled": False})) as app_chart:
        rendered = Rendered.of(app_chart, {}, RELEASE, NAMESPACE)
    gateway = container(find(rendered.docs, "Deployment", name="app"), "clipia-proxy")
    assert "ports" not in gateway
    assert gateway["readinessProbe"]["exec"]["command"][-1].endswith(
        "urlopen('http://127.0.0.1:9090/readyz', timeout=2)"
    )
    assert "httpGet" not in gateway["livenessProbe"]


def test_image_user_and_command_match_the_chart(ci: dict[str, Rendered]) -> None:
    text = (CHART_DIR.parents[2] / "Dockerfile").read_text(encoding="utf-8")
    dockerfile = text.replace("\\\n", " ")  # one line per instruction
    [user] = re.findall(r"^USER (\d+)(?::\d+)?$", dockerfile, flags=re.MULTILINE)
    gateway = container(workload(ci["central-sqlite"].docs))
    assert int(user) == gateway["securityContext"]["runAsUser"]
    assert 'ENTRYPOINT ["clipia-proxy"]' in dockerfile
    assert 'CMD ["serve", "--config", "/etc/clipia-proxy/config.yaml"]' in dockerfile
    assert gateway["args"] == ["serve", "--config", "/etc/clipia-proxy/config.yaml"]
    assert re.search(r"^HEALTHCHECK .*python.*/healthz", dockerfile, flags=re.MULTILINE)
