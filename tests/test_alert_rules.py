"""The alert rules through Debian's ``promtool`` (``.ci/run`` installs the ``prometheus`` package).

``promtool check rules`` on the rules file and the chart's copy; ``promtool test rules`` on the
unit tests in ``deploy/prometheus/tests/``, which must give every alert a case where it fires
and a case where it stays silent.
"""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path
from typing import Any, Final

import pytest
import yaml

ROOT: Final = Path(__file__).resolve().parent.parent
RULES: Final = ROOT / "deploy" / "prometheus" / "clipia-proxy-rules.yaml"
CHART_RULES: Final = ROOT / "deploy" / "helm" / "clipia-proxy" / "files" / "clipia-proxy-rules.yaml"
UNIT_TESTS: Final = sorted((ROOT / "deploy" / "prometheus" / "tests").glob("*.yaml"))


def promtool() -> str:
    found = shutil.which("promtool")
    assert found is not None, "promtool is missing: apt-get install -y prometheus (see .ci/run)"
    return found


def run(*args: str | Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [promtool(), *map(str, args)], capture_output=True, text=True, timeout=120, check=False
    )


@pytest.mark.parametrize("path", [RULES, CHART_RULES], ids=["rules", "chart copy"])
def test_promtool_checks_the_rules(path: Path) -> None:
    done = run("check", "rules", path)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "SUCCESS" in done.stdout


def test_promtool_unit_tests_pass() -> None:
    assert UNIT_TESTS
    done = run("test", "rules", *UNIT_TESTS)
    assert done.returncode == 0, done.stdout + done.stderr


def test_every_alert_has_a_firing_and_a_silent_case() -> None:
    rules: dict[str, Any] = yaml.safe_load(RULES.read_text(encoding="utf-8"))
    alerts = {rule["alert"] for group in rules["groups"] for rule in group["rules"]}
    firing: set[str] = set()
    silent: set[str] = set()
    for path in UNIT_TESTS:
        suite: dict[str, Any] = yaml.safe_load(path.read_text(encoding="utf-8"))
        for case in suite["tests"]:
            for check in case.get("alert_rule_test", []):
                (firing if check.get("exp_alerts") else silent).add(check["alertname"])
    assert alerts - firing == set(), "alerts no unit test makes fire"
    assert alerts - silent == set(), "alerts no unit test keeps silent"


def test_a_broken_rule_fails_promtool(tmp_path: Path) -> None:
    """The checks above can fail: promtool refuses an expression that does not parse."""
    broken = tmp_path / "broken.yaml"
    broken.write_text(
        "groups:\n  - name: x\n    rules:\n      - alert: X\n        expr: sum by (team (x)\n",
        encoding="utf-8",
    )
    assert run("check", "rules", broken).returncode != 0


def test_every_alert_has_a_runbook_line_in_the_readme() -> None:
    rules: dict[str, Any] = yaml.safe_load(RULES.read_text(encoding="utf-8"))
    rows = {
        line.split("|")[1].strip().strip("`"): [cell.strip() for cell in line.split("|")[2:-1]]
        for line in (ROOT / "README.md").read_text(encoding="utf-8").splitlines()
        if line.startswith("| `ClipiaProxy")
    }
    for group in rules["groups"]:
        for rule in group["rules"]:
            cells = rows.get(rule["alert"])
            assert cells is not None, f"{rule['alert']} is not in the README's alert table"
            when, severity, runbook = cells[0], cells[1], cells[-1]
            assert when, rule["alert"]
            assert severity == rule["labels"]["severity"], rule["alert"]
            assert len(runbook) > 20, rule["alert"]
