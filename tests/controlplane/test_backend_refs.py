"""What a rule's invalid backendRefs do to its traffic: Gateway API has the share of requests
that would have gone to an invalid backend answered with an error (500 for HTTPRoute,
UNAVAILABLE for GRPCRoute), never spread over the valid backends."""

from __future__ import annotations

from typing import Any

from envoy.config.route.v3 import route_components_pb2 as rc

from nodemesh.controlplane.builder import build
from nodemesh.controlplane.store import ObjectKey, Store
from nodemesh.xds import types
from nodemesh.xds.translate import Translator, translate_messages
from nodemesh.xds.translate.route import INVALID_BACKEND
from tests.e2e.mesh import service


def route(kind: str, backend_refs: list[dict[str, Any]]) -> dict[str, Any]:
    return {
        "apiVersion": "gateway.networking.k8s.io/v1",
        "kind": kind,
        "metadata": {"name": "r", "namespace": "shop"},
        "spec": {
            "parentRefs": [{"group": "", "kind": "Service", "name": "web"}],
            "rules": [{"backendRefs": backend_refs}],
        },
    }


def envoy_route(*objs: dict[str, Any]) -> tuple[rc.Route, Any]:
    """The Envoy route the rule of HTTPRoute/GRPCRoute shop/r became, and the build result."""
    store = Store()
    # v1's port speaks HTTP/2, as a GRPCRoute's backends must
    for obj in (service("web"), service("v1", ports=(("http", 80, "kubernetes.io/h2c"),)), *objs):
        store.apply(obj)
    result = build(store.view())
    (config,) = translate_messages(result.mesh)[types.ROUTE]
    prefix = f"{objs[0]['kind']}/shop/r/"
    (found,) = [r for vh in config.virtual_hosts for r in vh.routes if r.name.startswith(prefix)]
    return found, result


def split(r: rc.Route) -> list[tuple[str, int]]:
    return [(c.name, c.weight.value) for c in r.route.weighted_clusters.clusters]


def conditions(result: Any, kind: str) -> dict[str, tuple[str, str]]:
    return {c.type: (c.status, c.reason) for c in result.conditions[ObjectKey(kind, "shop", "r")]}


def test_a_missing_service_keeps_its_share_and_that_share_gets_500() -> None:
    r, result = envoy_route(
        route(
            "HTTPRoute",
            [
                {"name": "v1", "port": 80, "weight": 50},
                {"name": "missing", "port": 80, "weight": 50},
            ],
        )
    )
    assert split(r) == [("shop/v1:80", 50), (INVALID_BACKEND, 50)]
    assert r.route.cluster_not_found_response_code == rc.RouteAction.INTERNAL_SERVER_ERROR
    assert conditions(result, "HTTPRoute") == {
        "Accepted": ("True", "Accepted"),
        "ResolvedRefs": ("False", "BackendNotFound"),
    }
    # No cluster is made for the invalid share (the parent Service keeps its own), and the
    # snapshot still checks out.
    assert [c.name for c in result.mesh.clusters] == ["shop/v1:80", "shop/web:80"]
    assert Translator().translate(result.mesh).snapshot().consistent() == []


def test_a_backend_port_that_is_not_http_keeps_its_share_and_that_share_gets_500() -> None:
    """Gateway API's UnsupportedProtocol: HTTP sent to a Postgres port would fail there, less
    clearly (nodemesh sent it)."""
    db = service("db", ports=[("http", 80, ""), ("sql", 5432, "postgresql")])
    r, result = envoy_route(
        route(
            "HTTPRoute",
            [{"name": "v1", "port": 80, "weight": 3}, {"name": "db", "port": 5432, "weight": 1}],
        ),
        db,
    )
    assert split(r) == [("shop/v1:80", 3), (INVALID_BACKEND, 1)]
    assert conditions(result, "HTTPRoute") == {
        "Accepted": ("True", "Accepted"),
        "ResolvedRefs": ("False", "UnsupportedProtocol"),
    }
    (resolved,) = [
        c
        for c in result.conditions[ObjectKey("HTTPRoute", "shop", "r")]
        if c.type == "ResolvedRefs"
    ]
    assert "Service shop/db port 5432 is not HTTP (appProtocol 'postgresql')" in resolved.message


def test_a_service_in_another_namespace_needs_no_reference_grant() -> None:
    """GEP-1294: mesh routes reach backendRefs in any namespace without a ReferenceGrant (they
    augment Services every client can reach). nodemesh once asked for one, so the usual
    consumer route, to the producer's own Service, answered 500 until the producer granted."""
    r, result = envoy_route(
        route(
            "HTTPRoute",
            [
                {"name": "v1", "port": 80, "weight": 1},
                {"name": "x", "namespace": "other", "port": 80, "weight": 9},
            ],
        ),
        service("x", ns="other"),
    )
    assert split(r) == [("shop/v1:80", 1), ("other/x:80", 9)]
    assert conditions(result, "HTTPRoute")["ResolvedRefs"] == ("True", "ResolvedRefs")


def test_grpcroute_answers_the_invalid_share_with_unavailable() -> None:
    # Envoy's local reply to a gRPC request says grpc-status UNAVAILABLE for HTTP 503.
    r, _ = envoy_route(
        route(
            "GRPCRoute",
            [{"name": "v1", "port": 80, "weight": 1}, {"name": "missing", "port": 80, "weight": 1}],
        )
    )
    assert split(r) == [("shop/v1:80", 1), (INVALID_BACKEND, 1)]
    assert r.route.cluster_not_found_response_code == rc.RouteAction.SERVICE_UNAVAILABLE


def test_grpcroute_with_only_an_invalid_backend_answers_unavailable() -> None:
    r, _ = envoy_route(route("GRPCRoute", [{"name": "missing", "port": 80}]))
    assert r.WhichOneof("action") == "direct_response" and r.direct_response.status == 503


def test_only_invalid_or_zero_weight_backends_answer_500_directly() -> None:
    for refs in (
        [{"name": "missing", "port": 80}],
        [{"name": "v1", "port": 80, "weight": 0}],
        [{"name": "v1", "port": 80, "weight": 0}, {"name": "missing", "port": 80}],
    ):
        r, _ = envoy_route(route("HTTPRoute", refs))
        assert r.WhichOneof("action") == "direct_response", refs
        assert r.direct_response.status == 500, refs


def test_valid_backends_alone_send_to_their_clusters() -> None:
    r, _ = envoy_route(route("HTTPRoute", [{"name": "v1", "port": 80}]))
    assert r.route.cluster == "shop/v1:80"
    assert r.route.cluster_not_found_response_code == rc.RouteAction.SERVICE_UNAVAILABLE


def test_a_rule_without_backend_refs_answers_500_and_the_route_stays_accepted() -> None:
    obj = route("HTTPRoute", [{"name": "v1", "port": 80}])
    obj["spec"]["rules"] = [
        {
            "matches": [{"path": {"type": "PathPrefix", "value": "/api"}}],
            "backendRefs": [{"name": "v1", "port": 80}],
        },
        {"matches": [{"path": {"type": "PathPrefix", "value": "/maintenance"}}]},
    ]
    store = Store()
    for o in (service("web"), service("v1"), obj):
        store.apply(o)
    result = build(store.view())
    (config,) = translate_messages(result.mesh)[types.ROUTE]
    actions = {
        r.match.path_separated_prefix: r
        for vh in config.virtual_hosts
        for r in vh.routes
        if r.name.startswith("HTTPRoute/shop/r/")
    }
    assert actions["/api"].route.cluster == "shop/v1:80"
    assert actions["/maintenance"].direct_response.status == 500
    assert conditions(result, "HTTPRoute") == {
        "Accepted": ("True", "Accepted"),
        "ResolvedRefs": ("True", "ResolvedRefs"),
    }
