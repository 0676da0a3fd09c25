"""The chart's RBAC (charts/nodemesh/templates/rbac.yaml) is exactly what the operator needs:
equal to the rules derived from its resource table, and, against the emulator, every request
the operator makes is allowed and every rule is used by some request."""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import yaml

from nodemesh.controlplane.kube import FINALIZER
from nodemesh.controlplane.kube._rbac import Rule, cluster_rules, lease_rules
from nodemesh.controlplane.store import ObjectKey, Store
from tests.kube.conftest import Kube, eventually

CHART = Path(__file__).resolve().parents[2] / "charts/nodemesh/templates/rbac.yaml"
NAMESPACE = "nodemesh"  # the operator's own namespace (the test connection's default)

Permission = tuple[str, str, str, str]  # (group, resource[/sub], verb, name or "")


def chart() -> dict[str, dict[str, Any]]:
    text = CHART.read_text().replace("{{ .Release.Namespace }}", NAMESPACE)
    return {doc["kind"]: doc for doc in yaml.safe_load_all(text) if doc}


def from_yaml(rules: Iterable[Mapping[str, Any]]) -> set[Permission]:
    return {
        (group, resource, verb, name)
        for rule in rules
        for group in rule["apiGroups"]
        for resource in rule["resources"]
        for verb in rule["verbs"]
        for name in rule.get("resourceNames") or [""]
    }


def from_rules(rules: Iterable[Rule]) -> set[Permission]:
    return {
        (r.group, r.resource, verb, name)
        for r in rules
        for verb in r.verbs
        for name in sorted(r.names) or [""]
    }


def test_chart_rbac_is_exactly_the_derived_rules() -> None:
    docs = chart()
    assert from_yaml(docs["ClusterRole"]["rules"]) == from_rules(cluster_rules())
    assert from_yaml(docs["Role"]["rules"]) == from_rules(lease_rules())
    sa = docs["ServiceAccount"]["metadata"]
    for binding in ("ClusterRoleBinding", "RoleBinding"):
        subject = docs[binding]["subjects"][0]
        assert (subject["name"], subject["namespace"]) == (sa["name"], sa["namespace"])
    assert docs["ClusterRoleBinding"]["roleRef"]["name"] == docs["ClusterRole"]["metadata"]["name"]
    assert docs["RoleBinding"]["roleRef"]["name"] == docs["Role"]["metadata"]["name"]


_PATH = re.compile(
    r"^/(?:api/(?P<core>v1)|apis/(?P<group>[^/]+)/(?P<version>[^/]+))"
    r"(?:/namespaces/(?P<ns>[^/]+))?/(?P<plural>[^/]+)(?:/(?P<name>[^/]+)(?:/(?P<sub>[^/]+))?)?$"
)


def permission(method: str, path: str, watch: bool) -> tuple[Permission, str | None] | None:
    """The RBAC permission a request needs, and its namespace; None for discovery."""
    m = _PATH.match(path)
    if m is None:
        return None  # /api, /apis, /apis/<group>/<version>: discovery, open to everyone
    group = m["group"] or ""
    name = m["name"] or ""
    resource = m["plural"] + (f"/{m['sub']}" if m["sub"] else "")
    verb = {"POST": "create", "PATCH": "patch", "PUT": "update", "DELETE": "delete"}.get(method)
    if verb is None:
        verb = "watch" if watch else ("get" if name else "list")
    return (group, resource, verb, name if verb in ("get", "patch", "update", "delete") else ""), m[
        "ns"
    ]


def allowed(perm: Permission, namespace: str | None, cluster: set[Permission]) -> bool:
    group, resource, verb, name = perm
    if (group, resource, verb, "") in cluster:
        return True
    role = from_yaml(chart()["Role"]["rules"])
    if namespace != NAMESPACE:
        return False
    return (group, resource, verb, "") in role or (group, resource, verb, name) in role


def one_of_each(ns: str = "shop") -> list[dict[str, Any]]:
    meta = {"namespace": ns}
    ref = {"parentRefs": [{"group": "", "kind": "Service", "name": "web"}], "rules": []}
    return [
        {"apiVersion": "v1", "kind": "Node", "metadata": {"name": "node-1"}},
        {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "web-0", **meta}},
        {"apiVersion": "v1", "kind": "Service", "metadata": {"name": "web", **meta}, "spec": {}},
        {
            "apiVersion": "discovery.k8s.io/v1",
            "kind": "EndpointSlice",
            "metadata": {"name": "web-1", **meta},
            "endpoints": [],
        },
        {
            "apiVersion": "gateway.networking.k8s.io/v1",
            "kind": "HTTPRoute",
            "metadata": {"name": "web", **meta},
            "spec": ref,
        },
        {
            "apiVersion": "gateway.networking.k8s.io/v1",
            "kind": "GRPCRoute",
            "metadata": {"name": "web", **meta},
            "spec": ref,
        },
        {
            "apiVersion": "nodemesh.io/v1alpha1",
            "kind": "TrafficPolicy",
            "metadata": {"name": "web", **meta},
            "spec": {"targetRefs": [{"group": "", "kind": "Service", "name": "web"}]},
        },
    ]


def accepted(key: ObjectKey) -> dict[str, Any]:
    return {"conditions": [{"type": "Accepted", "status": "True", "reason": "Accepted"}]}


async def test_every_request_is_allowed_and_every_rule_is_used(
    kube: Kube, start_operator: Any
) -> None:
    for obj in one_of_each():
        if obj["kind"] in ("HTTPRoute", "GRPCRoute", "TrafficPolicy"):
            # upgraded from a nodemesh whose status timers needed it
            obj = {**obj, "metadata": {**obj["metadata"], "finalizers": [FINALIZER]}}
        await kube.create(obj)
    handle = await start_operator(Store(), accepted, token="rbac")
    for kind in ("HTTPRoute", "GRPCRoute", "TrafficPolicy"):

        async def has_status(kind: str = kind) -> bool:
            obj = await kube.get(kind, "shop", "web")
            return bool(obj and (obj.get("status") or {}).get("conditions"))

        await eventually(has_status, f"{kind} status written")

        async def released(kind: str = kind) -> bool:  # kopf removes the old finalizer: a patch
            obj = await kube.get(kind, "shop", "web")
            return not ((obj or {}).get("metadata") or {}).get("finalizers")

        await eventually(released, f"{kind}: the old finalizer removed")
    await handle.stop()  # releases the Lease: a patch

    cluster = from_yaml(chart()["ClusterRole"]["rules"])
    role = from_yaml(chart()["Role"]["rules"])
    used: set[Permission] = set()
    for auth, method, path, watch in kube.emulator.calls:
        if auth != "Bearer rbac":
            continue
        found = permission(method, path, watch)
        if found is None:
            continue
        perm, namespace = found
        assert allowed(perm, namespace, cluster), f"{method} {path} is not allowed by the chart"
        group, resource, verb, name = perm
        used.add(perm if (group, resource, verb, name) in role else (group, resource, verb, ""))
    unused = (cluster | role) - used
    assert not unused, f"rules the operator never needed: {sorted(unused)}"
