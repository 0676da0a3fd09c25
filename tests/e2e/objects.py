"""Builders for the user objects the e2e tests write (same shapes as Kubernetes)."""

from __future__ import annotations

from typing import Any

from tests.e2e.mesh import NODE


def http_route(
    name: str, parent: str, rules: list[dict[str, Any]], ns: str = "shop", port: int | None = None
) -> dict[str, Any]:
    parent_ref: dict[str, Any] = {"group": "", "kind": "Service", "name": parent}
    if port is not None:
        parent_ref["port"] = port
    return {
        "apiVersion": "gateway.networking.k8s.io/v1",
        "kind": "HTTPRoute",
        "metadata": {"name": name, "namespace": ns},
        "spec": {"parentRefs": [parent_ref], "rules": rules},
    }


def grpc_route(
    name: str, parent: str, rules: list[dict[str, Any]], ns: str = "shop", port: int | None = None
) -> dict[str, Any]:
    obj = http_route(name, parent, rules, ns, port)
    obj["kind"] = "GRPCRoute"
    return obj


def to(name: str, weight: int | None = None, port: int = 80) -> dict[str, Any]:
    ref: dict[str, Any] = {"name": name, "port": port}
    if weight is not None:
        ref["weight"] = weight
    return ref


def policy(name: str, target: str, ns: str = "shop", **spec: Any) -> dict[str, Any]:
    return {
        "apiVersion": "nodemesh.io/v1alpha1",
        "kind": "TrafficPolicy",
        "metadata": {"name": name, "namespace": ns},
        "spec": {"targetRefs": [{"group": "", "kind": "Service", "name": target}], **spec},
    }


def pod(name: str, ns: str, ip: str, node: str = NODE) -> dict[str, Any]:
    """A running Pod on `node` with address `ip`: a client of its namespace there."""
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": name, "namespace": ns},
        "spec": {"nodeName": node, "containers": [{"name": "c", "image": "client"}]},
        "status": {"phase": "Running", "podIP": ip},
    }
