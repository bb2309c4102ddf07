"""Rendering the chart with Helm's engine and finding objects in what it produced."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import yaml
from helm_python.chart import Chart

Manifest = dict[str, Any]


@dataclass(frozen=True)
class Rendered:
    """One render of the chart: its Kubernetes objects and its NOTES.txt."""

    docs: list[Manifest]
    notes: str

    @classmethod
    def of(cls, chart: Chart, values: dict[str, Any], name: str, namespace: str) -> Rendered:
        """Render ``chart`` with ``values`` as release ``name`` in ``namespace``."""
        docs: list[Manifest] = []
        notes = ""
        for path, text in sorted(
            chart.render(values=values, name=name, namespace=namespace).items()
        ):
            if path.endswith("NOTES.txt"):
                notes += text
                continue
            docs.extend(doc for doc in yaml.safe_load_all(text) if doc)
        return cls(docs=docs, notes=notes)


def kinds(docs: list[Manifest]) -> set[str]:
    """Return the kinds present."""
    return {doc["kind"] for doc in docs}


def find_all(docs: list[Manifest], kind: str) -> list[Manifest]:
    """Return every object of ``kind``."""
    return [doc for doc in docs if doc["kind"] == kind]


def find(docs: list[Manifest], kind: str, *, name: str | None = None) -> Manifest:
    """Return the one object of ``kind`` (named ``name`` when given)."""
    found = [d for d in find_all(docs, kind) if name is None or d["metadata"]["name"] == name]
    assert len(found) == 1, f"expected one {kind} {name or ''}, found {len(found)}"
    return found[0]


def workload(docs: list[Manifest]) -> Manifest:
    """Return the one gateway workload: the Deployment or the StatefulSet."""
    found = [doc for doc in docs if doc["kind"] in {"Deployment", "StatefulSet"}]
    assert len(found) == 1, f"expected one Deployment or StatefulSet, found {len(found)}"
    return found[0]


def pod_spec(workload: Manifest) -> Manifest:
    """Return the pod spec of a Deployment or StatefulSet."""
    spec: Manifest = workload["spec"]["template"]["spec"]
    return spec


def container(workload: Manifest, name: str = "clipia-proxy") -> Manifest:
    """Return the container ``name`` of a Deployment or StatefulSet."""
    found: list[Manifest] = [c for c in pod_spec(workload)["containers"] if c["name"] == name]
    assert len(found) == 1, f"expected one container {name}, found {len(found)}"
    return found[0]
