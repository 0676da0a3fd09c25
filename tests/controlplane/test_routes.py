"""HTTPRoute and GRPCRoute through build (and, where the Envoy side is the point, translate):
where a route attaches, the order of its rules in the virtual host, and what its matches and
status say. Each test names one behaviour a user sees."""

from __future__ import annotations

from typing import Any

from nodemesh.controlplane.builder import BuildResult, build
from nodemesh.controlplane.conditions import Condition, kubernetes_status
from nodemesh.controlplane.store import ObjectKey, Store
from nodemesh.xds.translate import ir
from tests.e2e.mesh import service

WEB_PORTS = (("http", 80, ""), ("grpc", 9090, ""))


def route(
    name: str,
    parents: list[dict[str, Any]],
    rules: list[dict[str, Any]],
    kind: str = "HTTPRoute",
    created: str = "2026-01-01T00:00:00Z",
) -> dict[str, Any]:
    return {
        "apiVersion": "gateway.networking.k8s.io/v1",
        "kind": kind,
        "metadata": {"name": name, "namespace": "shop", "creationTimestamp": created},
        "spec": {"parentRefs": parents, "rules": rules},
    }


def parent(name: str, **fields: Any) -> dict[str, Any]:
    return {"group": "", "kind": "Service", "name": name, **fields}


def to(name: str, port: int = 80) -> list[dict[str, Any]]:
    return [{"name": name, "port": port}]


def run(*objs: dict[str, Any]) -> BuildResult:
    store = Store()
    for o in objs:
        store.apply(o)
    return build(store.view())


def routes(res: BuildResult, vhost: str) -> list[ir.Route]:
    return list(next(v for v in res.mesh.virtual_hosts if v.name == vhost).routes)


def conditions(res: BuildResult, name: str, kind: str = "HTTPRoute") -> list[Condition]:
    return list(res.conditions[ObjectKey(kind, "shop", name)])


# -- parentRefs[].sectionName ---------------------------------------------------------------


def test_section_name_attaches_the_route_to_the_named_port_only() -> None:
    res = run(
        service("web", ports=WEB_PORTS),
        service("v2"),
        route("r", [parent("web", sectionName="grpc")], [{"backendRefs": to("v2")}]),
    )
    assert [r.name for r in routes(res, "shop/web:9090")] == ["HTTPRoute/shop/r/rule-0/0"]
    assert [r.name for r in routes(res, "shop/web:80")] == ["Service/shop/web:80/default"]
    accepted = [c for c in conditions(res, "r") if c.type == "Accepted"]
    assert [(c.status, c.parent) for c in accepted] == [("True", "Service/shop/web/grpc")]


def test_section_name_that_names_no_port_is_no_matching_parent() -> None:
    res = run(
        service("web", ports=WEB_PORTS),
        service("v2"),
        route("r", [parent("web", sectionName="nope")], [{"backendRefs": to("v2")}]),
    )
    (c,) = conditions(res, "r")
    assert (c.type, c.status, c.reason) == ("Accepted", "False", "NoMatchingParent")
    assert "no port named 'nope'" in c.message
    for vhost in ("shop/web:80", "shop/web:9090"):
        assert [r.name for r in routes(res, vhost)] == [f"Service/{vhost}/default"]


def test_port_and_section_name_must_name_the_same_port() -> None:
    res = run(
        service("web", ports=WEB_PORTS),
        service("v2"),
        route(
            "r",
            [
                parent("web", port=80, sectionName="grpc"),
                parent("web", port=9090, sectionName="grpc"),
            ],
            [{"backendRefs": to("v2")}],
        ),
    )
    accepted = {c.parent: c for c in conditions(res, "r") if c.type == "Accepted"}
    assert accepted["Service/shop/web:80/grpc"].reason == "NoMatchingParent"
    assert accepted["Service/shop/web:9090/grpc"].status == "True"
    assert [r.name for r in routes(res, "shop/web:80")] == ["Service/shop/web:80/default"]
    assert [r.name for r in routes(res, "shop/web:9090")] == ["HTTPRoute/shop/r/rule-0/0"]


def test_status_parent_ref_echoes_section_name_and_port() -> None:
    res = run(
        service("web", ports=WEB_PORTS),
        service("v2"),
        route(
            "r",
            [parent("web", sectionName="grpc"), parent("web", port=80), parent("web")],
            [{"backendRefs": to("v2")}],
        ),
    )
    body = kubernetes_status("HTTPRoute", conditions(res, "r"), {})
    refs = [p["parentRef"] for p in body["parents"]]
    base = {"group": "", "kind": "Service", "namespace": "shop", "name": "web"}
    assert refs == [base, {**base, "sectionName": "grpc"}, {**base, "port": 80}]


# -- rule order (precedence) ----------------------------------------------------------------


def test_prefix_with_trailing_slash_does_not_outrank_the_same_prefix_with_a_method() -> None:
    # "/api/" matches exactly what "/api" matches, so the GET rule is the more specific one.
    res = run(
        service("web"),
        service("a"),
        service("b"),
        route(
            "slash",
            [parent("web")],
            [
                {
                    "matches": [{"path": {"type": "PathPrefix", "value": "/api/"}}],
                    "backendRefs": to("a"),
                }
            ],
            created="2024-01-01T00:00:00Z",
        ),
        route(
            "get",
            [parent("web")],
            [
                {
                    "matches": [{"path": {"type": "PathPrefix", "value": "/api"}, "method": "GET"}],
                    "backendRefs": to("b"),
                }
            ],
        ),
    )
    assert [r.name for r in routes(res, "shop/web:80")] == [
        "HTTPRoute/shop/get/rule-0/0",
        "HTTPRoute/shop/slash/rule-0/0",
    ]
