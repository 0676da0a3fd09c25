"""Filters on a backendRef (`rules[].backendRefs[].filters`): the header modifiers become that
backend's weighted cluster's header changes, after the rule's; what Envoy cannot do per
backend, or would refuse, is refused with the field named."""

from __future__ import annotations

from typing import Any

from envoy.config.core.v3 import base_pb2
from envoy.config.route.v3 import route_components_pb2 as rc

from nodemesh.controlplane.builder import BuildResult, build
from nodemesh.controlplane.conditions import Condition
from nodemesh.controlplane.store import ObjectKey, Store
from nodemesh.xds import types
from nodemesh.xds.translate import translate_messages
from nodemesh.xds.translate.route import INVALID_BACKEND
from tests.e2e.mesh import service

SET = base_pb2.HeaderValueOption.OVERWRITE_IF_EXISTS_OR_ADD
ADD = base_pb2.HeaderValueOption.APPEND_IF_EXISTS_OR_ADD


def modifier(kind: str, **changes: Any) -> dict[str, Any]:
    spec = {
        op: [{"name": n, "value": v} for n, v in pairs.items()] if op != "remove" else pairs
        for op, pairs in changes.items()
    }
    return {"type": kind, kind[0].lower() + kind[1:]: spec}


def ref(name: str, *filters: dict[str, Any], weight: int = 1, port: int = 80) -> dict[str, Any]:
    return {"name": name, "port": port, "weight": weight, "filters": list(filters)}


def run(rule: dict[str, Any], kind: str = "HTTPRoute") -> tuple[BuildResult, rc.Route | None]:
    """Route shop/r with `rule` on Service web (backends v1, v2 on port 80, g on 9000): the
    build, and the Envoy route the rule became (None if it did not)."""
    store = Store()
    for name in ("web", "v1", "v2"):
        store.apply(service(name))
    store.apply(service("g", ports=(("grpc", 9000, "grpc"),)))
    store.apply(
        {
            "apiVersion": "gateway.networking.k8s.io/v1",
            "kind": kind,
            "metadata": {"name": "r", "namespace": "shop"},
            "spec": {
                "parentRefs": [{"group": "", "kind": "Service", "name": "web"}],
                "rules": [rule],
            },
        }
    )
    result = build(store.view())
    (config,) = translate_messages(result.mesh)[types.ROUTE]
    found = [
        r for vh in config.virtual_hosts for r in vh.routes if r.name.startswith(f"{kind}/shop/r/")
    ]
    return result, found[0] if found else None


def conditions(result: BuildResult, kind: str = "HTTPRoute") -> dict[str, Condition]:
    return {c.type: c for c in result.conditions[ObjectKey(kind, "shop", "r")]}


def changes(options: Any) -> list[tuple[str, str, int]]:
    return [(o.header.key, o.header.value, o.append_action) for o in options]


def test_header_modifiers_on_a_backend_ref_change_only_its_requests_and_responses() -> None:
    """Gateway API: "executed if and only if the request is being forwarded to the backend
    defined here". They were refused: Accepted=False/UnsupportedValue."""
    canary = ref(
        "v2",
        modifier("RequestHeaderModifier", set={"X-Canary": "yes"}, add={"x-via": "v2"},
                 remove=["x-debug"]),
        modifier("ResponseHeaderModifier", set={"x-served-by": "v2"}, remove=["x-internal"]),
    )  # fmt: skip
    result, route = run({"backendRefs": [ref("v1", weight=90), {**canary, "weight": 10}]})
    assert (conditions(result)["Accepted"].status, conditions(result)["ResolvedRefs"].status) == (
        "True",
        "True",
    )
    assert route is not None
    v1, v2 = route.route.weighted_clusters.clusters
    assert [(c.name, c.weight.value) for c in (v1, v2)] == [("shop/v1:80", 90), ("shop/v2:80", 10)]
    assert v1 == rc.WeightedCluster.ClusterWeight(name="shop/v1:80", weight=v1.weight)
    assert changes(v2.request_headers_to_add) == [("x-canary", "yes", SET), ("x-via", "v2", ADD)]
    assert list(v2.request_headers_to_remove) == ["x-debug"]
    assert changes(v2.response_headers_to_add) == [("x-served-by", "v2", SET)]
    assert list(v2.response_headers_to_remove) == ["x-internal"]
    # nothing on the route itself: it would apply to v1's requests too
    assert not (route.request_headers_to_add or route.response_headers_to_add)


def test_one_backend_with_filters_is_a_weighted_cluster_of_one() -> None:
    """RouteAction.cluster has no header changes of its own; the route's would do for one
    backend, but not in the order Gateway API gives (see the rule's changes below)."""
    result, route = run({"backendRefs": [ref("v1", modifier("RequestHeaderModifier",
                                                            set={"x-a": "1"}))]})  # fmt: skip
    assert route is not None and route.route.WhichOneof("cluster_specifier") == "weighted_clusters"
    (only,) = route.route.weighted_clusters.clusters
    assert (only.name, changes(only.request_headers_to_add)) == ("shop/v1:80", [("x-a", "1", SET)])


def test_the_rules_header_changes_come_before_the_backends() -> None:
    """Gateway API applies the rule's filters, then the backend's. Envoy applies a weighted
    cluster's changes before its route's (whatever most_specific_header_mutations_wins says),
    so the rule's go into each weighted cluster, followed by the backend's: a header both set
    gets the backend's value, one the backend removes is gone, the backend's add appends."""
    rule = {
        "filters": [
            modifier("RequestHeaderModifier", set={"x-both": "rule", "x-rule": "rule"},
                     add={"x-gone": "rule", "x-list": "rule"}, remove=["x-drop"]),
            modifier("ResponseHeaderModifier", set={"x-both": "rule"}),
            {"type": "URLRewrite", "urlRewrite": {"hostname": "rule.internal"}},
        ],
        "backendRefs": [
            ref("v1", modifier("RequestHeaderModifier", set={"x-both": "v1", "Host": "v1.internal"},
                               add={"x-list": "v1"}, remove=["x-gone"]),
                modifier("ResponseHeaderModifier", set={"x-both": "v1"})),
            ref("v2"),
        ],
    }  # fmt: skip
    result, route = run(rule)
    assert conditions(result)["Accepted"].status == "True"
    assert route is not None
    v1, v2 = route.route.weighted_clusters.clusters
    assert changes(v1.request_headers_to_add) == [
        ("x-rule", "rule", SET),
        ("x-both", "v1", SET),
        ("x-list", "rule", ADD),
        ("x-list", "v1", ADD),
    ]
    assert list(v1.request_headers_to_remove) == ["x-drop", "x-gone"]
    assert v1.host_rewrite_literal == "v1.internal"  # the backend's Host, not the rewrite's
    assert changes(v1.response_headers_to_add) == [("x-both", "v1", SET)]
    # a backend without filters of its own gets the rule's alone
    assert changes(v2.request_headers_to_add) == [
        ("x-both", "rule", SET),
        ("x-rule", "rule", SET),
        ("x-gone", "rule", ADD),
        ("x-list", "rule", ADD),
    ]
    assert list(v2.request_headers_to_remove) == ["x-drop"]
    assert v2.host_rewrite_literal == "rule.internal"
    assert changes(v2.response_headers_to_add) == [("x-both", "rule", SET)]
    # the route's own would be applied after the clusters', and win
    assert not (route.request_headers_to_add or route.request_headers_to_remove)
    assert not (route.response_headers_to_add or route.route.host_rewrite_literal)


def test_the_share_of_an_invalid_backend_keeps_the_rules_header_changes() -> None:
    """Envoy answers that share itself (500); its response gets the rule's header changes, as
    when they were on the route."""
    rule = {
        "filters": [modifier("ResponseHeaderModifier", set={"x-rule": "1"})],
        "backendRefs": [
            ref("v1", modifier("ResponseHeaderModifier", set={"x-v1": "1"})),
            ref("missing"),
        ],
    }
    _, route = run(rule)
    assert route is not None
    v1, invalid = route.route.weighted_clusters.clusters
    assert invalid.name == INVALID_BACKEND
    assert changes(invalid.response_headers_to_add) == [("x-rule", "1", SET)]
    assert changes(v1.response_headers_to_add) == [("x-rule", "1", SET), ("x-v1", "1", SET)]


def test_a_grpc_route_backend_ref_takes_header_modifiers() -> None:
    filters = modifier("RequestHeaderModifier", set={"x-a": "1"})
    result, route = run({"backendRefs": [ref("g", filters, port=9000)]}, kind="GRPCRoute")
    assert conditions(result, "GRPCRoute")["Accepted"].status == "True"
    assert route is not None
    (only,) = route.route.weighted_clusters.clusters
    assert (only.name, changes(only.request_headers_to_add)) == ("shop/g:9000", [("x-a", "1", SET)])


def test_filters_envoy_cannot_apply_per_backend_are_refused_on_a_backend_ref() -> None:
    """A weighted cluster has header changes but no rewrite, redirect or mirror of its own (and
    a redirect answers before a backend is picked): the route is not Accepted, with the field
    named, as for a filter type nodemesh does not implement, and it is not programmed."""
    for f in (
        {"type": "RequestMirror", "requestMirror": {"backendRef": {"name": "v2", "port": 80}}},
        {"type": "URLRewrite", "urlRewrite": {"hostname": "b"}},
        {"type": "RequestRedirect", "requestRedirect": {"statusCode": 301}},
        {"type": "CORS", "cors": {"allowOrigins": ["https://shop.example"]}},
    ):
        result, route = run({"backendRefs": [ref("v1", f)]})
        c = conditions(result)["Accepted"]
        assert (c.status, c.reason, route) == ("False", "UnsupportedValue", None), c
        assert c.message == (
            f"spec.rules[0].backendRefs[0].filters[0].type: unsupported value {f['type']!r}; on"
            " a backendRef nodemesh implements RequestHeaderModifier, ResponseHeaderModifier"
            " (per backend, Envoy changes headers only)"
        )


def test_backend_ref_header_changes_envoy_would_refuse_are_refused() -> None:
    """The rule's modifiers' checks: Envoy refuses NUL, CR and LF, pseudo-headers and empty
    names, and Host in a response or removed (its NACK would hold back every Service's
    routes)."""
    bad = ref(
        "v1",
        modifier("RequestHeaderModifier", set={"x-a": "a\r\nx-injected: 1", ":path": "/x"},
                 add={"x-b\x00": "b"}, remove=[":authority", "", "Host"]),
        modifier("ResponseHeaderModifier", set={"Host": "h"}),
    )  # fmt: skip
    result, route = run({"backendRefs": [bad]})
    c = conditions(result)["Accepted"]
    assert (c.status, c.reason, route) == ("False", "UnsupportedValue", None), c
    at = "spec.rules[0].backendRefs[0].filters"
    cannot = "(NUL, CR and LF cannot be in HTTP headers)"
    assert c.message.split("; ") == [
        f"{at}[0].requestHeaderModifier.set[0].value: must not contain '\\r' {cannot}",
        f"{at}[0].requestHeaderModifier.set[1].name: the pseudo-header ':path' cannot be changed",
        f"{at}[0].requestHeaderModifier.add[0].name: must not contain '\\x00' {cannot}",
        f"{at}[0].requestHeaderModifier.remove[0]: the pseudo-header ':authority' cannot be"
        " removed",
        f"{at}[0].requestHeaderModifier.remove[1]: a header name cannot be empty",
        f"{at}[0].requestHeaderModifier.remove: the Host header cannot be removed",
        f"{at}[1].responseHeaderModifier.set[0]: the Host header cannot be changed in a response",
    ]


def test_a_percent_sign_in_a_backend_ref_header_value_stays_literal() -> None:
    """Envoy reads `%` as the start of a variable, and refuses a lone one."""
    _, route = run({"backendRefs": [ref("v1", modifier("RequestHeaderModifier",
                                                       set={"x-share": "50%"}))]})  # fmt: skip
    assert route is not None
    (only,) = route.route.weighted_clusters.clusters
    assert changes(only.request_headers_to_add) == [("x-share", "50%%", SET)]


def test_an_extension_ref_on_a_backend_ref_fails_that_backends_share_closed() -> None:
    """As in a rule (Gateway API: the filter MUST NOT be skipped; GEP-1364: Accepted, with
    ResolvedRefs=False/InvalidKind): the requests that would go to that backend get 500."""
    ext = {"type": "ExtensionRef", "extensionRef": {"group": "example.com", "kind": "Auth",
                                                     "name": "a"}}  # fmt: skip
    result, route = run({"backendRefs": [ref("v1", weight=3), ref("v2", ext, weight=1)]})
    by_type = conditions(result)
    assert by_type["Accepted"].status == "True"
    resolved = by_type["ResolvedRefs"]
    assert (resolved.status, resolved.reason) == ("False", "InvalidKind"), resolved
    assert resolved.message.startswith(
        "spec.rules[0].backendRefs[1].filters[0].extensionRef: example.com/Auth 'a'"
    )
    assert route is not None
    assert [(c.name, c.weight.value) for c in route.route.weighted_clusters.clusters] == [
        ("shop/v1:80", 3),
        (INVALID_BACKEND, 1),
    ]
    assert route.route.cluster_not_found_response_code == rc.RouteAction.INTERNAL_SERVER_ERROR
