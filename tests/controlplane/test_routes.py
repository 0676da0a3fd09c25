"""HTTPRoute and GRPCRoute through build (and, where the Envoy side is the point, translate):
where a route attaches, the order of its rules in the virtual host, and what its matches and
status say. Each test names one behaviour a user sees."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import pytest
import re2
import yaml
from google.protobuf import json_format

from nodemesh.controlplane.builder import BuildMemo, BuildResult, build
from nodemesh.controlplane.conditions import Condition, kubernetes_status
from nodemesh.controlplane.files import FilesSource
from nodemesh.controlplane.store import ObjectKey, Store
from nodemesh.xds import types
from nodemesh.xds.translate import Translator, ir, translate_messages
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
    assert [(c.status, c.parent) for c in accepted] == [("True", "Service/web#grpc")]


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
    assert accepted["Service/web:80#grpc"].reason == "NoMatchingParent"
    assert accepted["Service/web:9090#grpc"].status == "True"
    assert [r.name for r in routes(res, "shop/web:80")] == ["Service/shop/web:80/default"]
    assert [r.name for r in routes(res, "shop/web:9090")] == ["HTTPRoute/shop/r/rule-0/0"]


def test_status_parent_ref_echoes_section_name_port_and_namespace_as_written() -> None:
    """The namespace too: `{name: web}` and `{name: web, namespace: shop}` are two parentRefs
    to Gateway API, and each gets its entry (they once made one entry whose conditions listed
    each type twice, which the API server refuses: the list is keyed by type). And the group:
    `core`, which nodemesh takes for "", was echoed as "", so the entry matched no parentRef."""
    res = run(
        service("web", ports=WEB_PORTS),
        service("v2"),
        route(
            "r",
            [
                parent("web", sectionName="grpc"),
                parent("web", port=80),
                parent("web"),
                parent("web", namespace="shop"),
                parent("web", group="core", port=80),
            ],
            [{"backendRefs": to("v2")}],
        ),
    )
    body = kubernetes_status("HTTPRoute", conditions(res, "r"), {})
    refs = [p["parentRef"] for p in body["parents"]]
    base = {"group": "", "kind": "Service", "name": "web"}
    assert refs == [
        {**base, "group": "core", "port": 80},
        {**base, "namespace": "shop"},
        base,
        {**base, "sectionName": "grpc"},
        {**base, "port": 80},
    ]
    for entry in body["parents"]:
        types_ = [c["type"] for c in entry["conditions"]]
        assert sorted(types_) == sorted(set(types_)), entry


def test_parent_refs_naming_one_port_twice_give_it_each_rule_once() -> None:
    """`{name: web}` names every port, so `port: 80`, `sectionName: http` and
    `namespace: shop` name port 80 again: each used to add the rules to it once more."""
    res = run(
        service("web", ports=WEB_PORTS),
        service("v2"),
        route(
            "r",
            [
                parent("web", port=80),
                parent("web"),
                parent("web", sectionName="http"),
                parent("web", namespace="shop"),
            ],
            [{"backendRefs": to("v2")}],
        ),
    )
    for vhost in ("shop/web:80", "shop/web:9090"):
        assert [r.name for r in routes(res, vhost)] == ["HTTPRoute/shop/r/rule-0/0"], vhost
    accepted = [(c.parent, c.status) for c in conditions(res, "r") if c.type == "Accepted"]
    assert sorted(accepted) == [
        ("Service/shop/web", "True"),
        ("Service/web", "True"),
        ("Service/web#http", "True"),
        ("Service/web:80", "True"),
    ]


def test_a_parent_ref_written_twice_gets_one_status_entry() -> None:
    res = run(
        service("web"),
        service("v2"),
        route("r", [parent("web", port=80), parent("web", port=80)], [{"backendRefs": to("v2")}]),
    )
    (entry,) = kubernetes_status("HTTPRoute", conditions(res, "r"), {})["parents"]
    assert [c["type"] for c in entry["conditions"]] == ["Accepted", "ResolvedRefs"]
    assert [r.name for r in routes(res, "shop/web:80")] == ["HTTPRoute/shop/r/rule-0/0"]


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


def grpc_rule(backend: str, **method: str) -> dict[str, Any]:
    return {"matches": [{"method": method}], "backendRefs": to(backend, 9000)}


GRPC_PORT = (("grpc", 9000, ""),)


def test_grpc_rules_order_by_service_then_method_then_headers() -> None:
    # /pkg.Svc/Get matches every rule here: the longest service wins, then the longest method;
    # a method-only rule (a regular expression on the path) comes after any service match.
    headers = {"headers": [{"name": "x-a", "value": "1"}, {"name": "x-b", "value": "1"}]}
    res = run(
        service("g", ports=GRPC_PORT),
        *(service(n, ports=GRPC_PORT) for n in ("a", "b", "c", "d")),
        route(
            "gr",
            [parent("g")],
            [
                grpc_rule("a", method="Get"),
                grpc_rule("b", service="pkg.Svc"),
                {
                    **grpc_rule("c", service="pkg.Svc"),
                    "matches": [{"method": {"service": "pkg.Svc"}, **headers}],
                },
                grpc_rule("d", service="pkg.Svc", method="Get"),
            ],
            kind="GRPCRoute",
        ),
    )
    assert [r.name for r in routes(res, "shop/g:9000")] == [
        "GRPCRoute/shop/gr/rule-3/0",  # service + method
        "GRPCRoute/shop/gr/rule-2/0",  # service + 2 headers
        "GRPCRoute/shop/gr/rule-1/0",  # service
        "GRPCRoute/shop/gr/rule-0/0",  # method only
    ]


def run_grpc(rules: list[dict[str, Any]]) -> BuildResult:
    """GRPCRoute shop/gr with `rules` on Service g (gRPC port 9000), backends a and b."""
    grpc = [service(n, ports=GRPC_PORT) for n in ("g", "a", "b")]
    return run(*grpc, route("gr", [parent("g")], rules, kind="GRPCRoute"))


def test_grpc_regular_expression_service_counts_as_a_wildcard() -> None:
    res = run_grpc(
        [
            grpc_rule("a", type="RegularExpression", service="pkg\\.Svc.*"),
            grpc_rule("b", service="pkg.Svc"),
        ]
    )
    assert [r.name for r in routes(res, "shop/g:9000")] == [
        "GRPCRoute/shop/gr/rule-1/0",
        "GRPCRoute/shop/gr/rule-0/0",
    ]


def test_a_grpc_regular_expression_with_alternatives_matches_within_its_part() -> None:
    """`pkg.Foo|pkg.Bar` is the service's alternatives, not two halves of the path (the path
    regex once read `/pkg.Foo|pkg.Bar/[^/]+`, which matched neither service's methods)."""
    res = run_grpc(
        [grpc_rule("a", type="RegularExpression", service="pkg\\.(Foo|Bar)|other\\.Baz",
                   method="Get|List")]
    )  # fmt: skip
    ((rule,),) = [[r for r in routes(res, "shop/g:9000") if r.name.startswith("GRPCRoute")]]
    assert rule.match.path.kind == "RegularExpression"
    matched = {
        path: re.fullmatch(rule.match.path.value, path) is not None
        for path in ("/pkg.Foo/Get", "/pkg.Bar/List", "/other.Baz/Get", "/pkg.Foo/Put",
                     "/pkg.Foo", "/x.Y/Get")
    }  # fmt: skip
    assert matched == {
        "/pkg.Foo/Get": True,
        "/pkg.Bar/List": True,
        "/other.Baz/Get": True,
        "/pkg.Foo/Put": False,
        "/pkg.Foo": False,
        "/x.Y/Get": False,
    }


def test_an_anchored_grpc_regular_expression_matches_its_part() -> None:
    """Each part is matched whole, so anchors are what a user writes for that; inside the path
    expression `^pkg\\.Svc$` anchored to the path's ends and matched no request."""
    res = run_grpc(
        [grpc_rule("a", type="RegularExpression", service="^pkg\\.(Foo|Bar)$",
                   method="\\AGet$|^List\\z")]
    )  # fmt: skip
    ((rule,),) = [[r for r in routes(res, "shop/g:9000") if r.name.startswith("GRPCRoute")]]
    matched = {
        path: re2.fullmatch(rule.match.path.value, path) is not None  # Envoy's engine
        for path in ("/pkg.Foo/Get", "/pkg.Bar/List", "/pkg.Foo/Put", "/xpkg.Foo/Get")
    }
    assert matched == {
        "/pkg.Foo/Get": True,
        "/pkg.Bar/List": True,
        "/pkg.Foo/Put": False,
        "/xpkg.Foo/Get": False,
    }


def http_on_g(name: str = "http", **parent_fields: Any) -> dict[str, Any]:
    rule = {"matches": [{"path": {"type": "PathPrefix", "value": "/web"}}], "backendRefs": to("a")}
    return route(name, [parent("g", **parent_fields)], [rule])


G_PORTS = (("http", 80, ""), ("grpc", 9000, ""))


def test_a_grpcroute_takes_a_service_port_from_an_httproute() -> None:
    """GEP-1294: where routes of two kinds attach to one Service port, only one kind applies,
    GRPCRoute first, and the other is not Accepted (Conflicted). Before, both applied."""
    res = run(
        service("g", ports=GRPC_PORT),
        service("a"),
        service("b", ports=GRPC_PORT),
        http_on_g(),
        route("gr", [parent("g")], [grpc_rule("b", service="pkg.Svc")], kind="GRPCRoute"),
    )
    assert [r.name for r in routes(res, "shop/g:9000")] == ["GRPCRoute/shop/gr/rule-0/0"]
    c = accepted(res, "http")
    assert (c.status, c.reason, c.parent) == ("False", "Conflicted", "Service/g"), c
    assert "GRPCRoute/shop/gr on port 9000" in c.message, c.message
    assert accepted(res, "gr", "GRPCRoute").status == "True"


def test_an_httproute_keeps_the_ports_no_grpcroute_takes() -> None:
    res = run(
        service("g", ports=G_PORTS),
        service("a"),
        service("b", ports=GRPC_PORT),
        http_on_g(),  # every port of g
        route("gr", [parent("g", port=9000)], [grpc_rule("b", service="pkg.Svc")],
              kind="GRPCRoute"),
    )  # fmt: skip
    assert [r.name for r in routes(res, "shop/g:80")] == ["HTTPRoute/shop/http/rule-0/0"]
    assert [r.name for r in routes(res, "shop/g:9000")] == ["GRPCRoute/shop/gr/rule-0/0"]
    c = accepted(res, "http")
    assert c.status == "True" and "not applied on port 9000: GRPCRoute/shop/gr" in c.message, c


def test_an_httproute_gets_its_port_back_when_the_grpcroute_goes() -> None:
    store, memo = Store(), BuildMemo()
    for obj in (
        service("g", ports=GRPC_PORT),
        service("a"),
        service("b", ports=GRPC_PORT),
        http_on_g(),
        route("gr", [parent("g")], [grpc_rule("b", service="pkg.Svc")], kind="GRPCRoute"),
    ):
        store.apply(obj)
    assert accepted(build(store.view(), memo=memo), "http").reason == "Conflicted"
    store.delete(ObjectKey("GRPCRoute", "shop", "gr"))
    res = build(store.view(), memo=memo)
    assert accepted(res, "http").status == "True"
    assert [r.name for r in routes(res, "shop/g:9000")] == ["HTTPRoute/shop/http/rule-0/0"]
    # and the other way: the GRPCRoute coming back takes the port again
    store.apply(route("gr", [parent("g")], [grpc_rule("b", service="pkg.Svc")], kind="GRPCRoute"))
    assert accepted(build(store.view(), memo=memo), "http").reason == "Conflicted"


def test_a_consumer_httproute_does_not_conflict_with_the_producers_grpcroute() -> None:
    """The kinds are compared within each group that routes are merged in (GEP-1294): the
    producer's routes, and each consumer namespace's."""
    consumer = http_on_g("mine", namespace="shop")
    consumer["metadata"]["namespace"] = "props"
    res = run(
        service("g", ports=GRPC_PORT),
        service("a"),
        service("b", ports=GRPC_PORT),
        consumer,
        route("gr", [parent("g")], [grpc_rule("b", service="pkg.Svc")], kind="GRPCRoute"),
    )
    mine = next(
        c for c in res.conditions[ObjectKey("HTTPRoute", "props", "mine")] if c.type == "Accepted"
    )
    assert mine.status == "True", mine
    names = [r.name for r in routes(res, "shop/g:9000")]
    assert "HTTPRoute/props/mine/rule-0/0" in names and "GRPCRoute/shop/gr/rule-0/0" in names


# -- matches --------------------------------------------------------------------------------


def envoy_match(res: BuildResult, vhost: str, route_name: str) -> dict[str, Any]:
    for m in translate_messages(res.mesh)[types.ROUTE]:
        for v in json_format.MessageToDict(m, preserving_proto_field_name=True).get(
            "virtual_hosts", []
        ):
            if v["name"] == vhost:
                return next(r["match"] for r in v["routes"] if r["name"] == route_name)
    raise AssertionError(f"no route {route_name} in {vhost}")


def test_only_the_first_header_and_query_param_of_a_name_count() -> None:
    # Header names compare case-insensitively, query param names exactly.
    match = {
        "headers": [{"name": "X-Env", "value": "a"}, {"name": "x-env", "value": "b"}],
        "queryParams": [
            {"name": "v", "value": "1"},
            {"name": "v", "value": "2"},
            {"name": "V", "value": "3"},
        ],
    }
    res = run(
        service("web"),
        service("v1"),
        route("r", [parent("web")], [{"matches": [match], "backendRefs": to("v1")}]),
    )
    m = envoy_match(res, "shop/web:80", "HTTPRoute/shop/r/rule-0/0")
    assert m["headers"] == [{"name": "x-env", "string_match": {"exact": "a"}}]
    assert m["query_parameters"] == [
        {"name": "v", "string_match": {"exact": "1"}},
        {"name": "V", "string_match": {"exact": "3"}},
    ]


def test_only_the_first_grpc_header_of_a_name_counts() -> None:
    match = {
        "method": {"service": "pkg.Svc"},
        "headers": [{"name": "X-Env", "value": "a"}, {"name": "x-env", "value": "b"}],
    }
    res = run(
        service("g", ports=GRPC_PORT),
        service("a", ports=GRPC_PORT),
        route(
            "gr",
            [parent("g")],
            [{"matches": [match], "backendRefs": to("a", 9000)}],
            kind="GRPCRoute",
        ),
    )
    m = envoy_match(res, "shop/g:9000", "GRPCRoute/shop/gr/rule-0/0")
    assert m["headers"] == [{"name": "x-env", "string_match": {"exact": "a"}}]


def test_header_precedence_counts_distinct_names() -> None:
    def rule(backend: str, *names: str) -> dict[str, Any]:
        headers = [{"name": n, "value": "1"} for n in names]
        return {"matches": [{"headers": headers}], "backendRefs": to(backend)}

    res = run(
        service("web"),
        service("a"),
        service("b"),
        route("r", [parent("web")], [rule("a", "X-A", "x-a", "x-A"), rule("b", "x-a", "x-b")]),
    )
    assert [r.name for r in routes(res, "shop/web:80")] == [
        "HTTPRoute/shop/r/rule-1/0",
        "HTTPRoute/shop/r/rule-0/0",
    ]


# -- where a route lands --------------------------------------------------------------------


def test_ipv6_cluster_ip_domains_are_bracketed_as_in_a_host_header() -> None:
    web = service("web")
    web["spec"]["clusterIPs"] = ["10.96.0.5", "fd00::5"]
    res = run(web)
    domains = next(
        v["domains"]
        for m in translate_messages(res.mesh)[types.ROUTE]
        for v in json_format.MessageToDict(m).get("virtualHosts", [])
        if v["name"] == "shop/web:80"
    )
    assert {"10.96.0.5:80", "10.96.0.5", "[fd00::5]:80", "[fd00::5]"} <= set(domains)
    assert not [d for d in domains if d.startswith("fd00")]


def test_the_cluster_domain_ends_every_services_fqdn() -> None:
    """A cluster whose kubelets run with `--cluster-domain corp.example`: its Services' FQDNs
    end in it (given as `Corp.Example.`, as a user may write it), a memo built for another
    domain starts again, and a name that is no DNS domain is refused."""
    store = Store()
    store.apply(service("web"))

    def domains(res: BuildResult) -> set[str]:
        return set(next(v for v in res.mesh.virtual_hosts if v.name == "shop/web:80").domains)

    memo = BuildMemo()
    assert "web.shop.svc.cluster.local" in domains(build(store.view(), memo=memo))
    res = build(store.view(), domain="Corp.Example.", memo=memo)
    engine = memo.engine
    assert build(store.view(), domain="Corp.Example.", memo=memo).mesh is res.mesh
    assert memo.engine is engine  # the same domain, written alike: no build from scratch
    assert {"web.shop.svc.corp.example", "web.shop.svc.corp.example:80"} <= domains(res)
    assert not [d for d in domains(res) if "cluster.local" in d]
    assert res.mesh == build(store.view(), domain="corp.example").mesh
    bad_ones = ("", ".", "corp..example", "-corp.example", "corp_example", "a" * 64 + ".x",
                "\u212a8s.local")  # (a Kelvin sign, which lower() makes a k)  # fmt: skip
    for bad in bad_ones:
        with pytest.raises(ValueError, match="is not a DNS domain"):
            build(store.view(), domain=bad)


def test_port_names_that_mean_http2_without_an_app_protocol() -> None:
    """`<protocol>[-<suffix>]`: the docs once said "starts with grpc", which `grpcs` does;
    grpc-web servers may speak HTTP/1.1 only."""
    names = ("grpc", "grpc-api", "h2c", "http2-admin", "grpcs", "http2c", "grpc-web",
             "grpc-web-ui", "http", "web")  # fmt: skip
    res = run(service("p", ports=tuple((n, 8000 + i, "") for i, n in enumerate(names))))
    model = {c.port: c.http2 for c in res.mesh.clusters if c.service == "shop/p"}
    assert [n for i, n in enumerate(names) if model[8000 + i]] == [
        "grpc",
        "grpc-api",
        "h2c",
        "http2-admin",
    ]


def test_a_condition_message_is_cut_to_what_the_crd_allows() -> None:
    """Many invalid matches make a message longer than the CRDs' 32,768 characters; the API
    server would refuse the whole status and the route would keep its old one."""
    bad = [{"path": {"type": "RegularExpression", "value": "(" * 40}} for _ in range(8)]
    rules = [{"matches": bad, "backendRefs": to("a")} for _ in range(100)]
    res = run(service("web"), service("a"), route("r", [parent("web")], rules))
    (accepted,) = [c for c in conditions(res, "r") if c.type == "Accepted"]
    assert accepted.status == "False" and len(accepted.message) > 32768
    body = kubernetes_status("HTTPRoute", conditions(res, "r"), {})
    (entry,) = body["parents"]
    message = next(c["message"] for c in entry["conditions"] if c["type"] == "Accepted")
    assert len(message) == 32768 and message.endswith("...")


def test_a_headless_service_is_no_parent() -> None:
    """GEP-1294: headless Services SHOULD NOT be parents, having no frontend: their clients
    look up the pods and connect to them, where no route applies. It was Accepted and did
    nothing for them."""
    headless = {**service("db"), "spec": {"clusterIP": "None", "ports": [{"port": 80}]}}
    res = run(headless, service("v2"), route("r", [parent("db")], [{"backendRefs": to("v2")}]))
    (c,) = conditions(res, "r")
    assert (c.type, c.status, c.reason) == ("Accepted", "False", "NoMatchingParent")
    assert "headless" in c.message
    # a Service that only leaves its ClusterIP out (files mode) still is one
    plain = {**service("web"), "spec": {"ports": [{"port": 80}]}}
    res = run(plain, service("v2"), route("r", [parent("web")], [{"backendRefs": to("v2")}]))
    assert {c.type: c.status for c in conditions(res, "r")}["Accepted"] == "True"


# -- regular expressions: what Envoy's RE2 takes ----------------------------------------------
BIG = "(alpha|bravo|charlie|delta|echo|foxtrot|golf|hotel)"  # RE2 program size 45 a repeat


def path_regex_route(value: str) -> dict[str, Any]:
    match = {"path": {"type": "RegularExpression", "value": value}}
    return route("re", [parent("web")], [{"matches": [match], "backendRefs": to("web")}])


def accepted(res: BuildResult, name: str, kind: str = "HTTPRoute") -> Condition:
    return next(c for c in conditions(res, name, kind) if c.type == "Accepted")


def test_regular_expressions_envoy_refuses_are_refused_with_re2s_reason() -> None:
    """Python's re took these, Envoy's RE2 does not: the NACK of the RouteConfiguration that
    every Service's routes share held back every route change in the mesh."""
    for value, reason in [
        ("/a(?=b)", "invalid perl operator: (?="),
        ("/(a)\\1", "invalid escape sequence: \\1"),
        ("/a\\Z", "invalid escape sequence: \\Z"),
        ("/a{1001}", "invalid repetition size: {1001}"),
        (f"/{BIG}{{1,800}}", "its RE2 program size is 36004, over the 32768"),
    ]:
        c = accepted(run(service("web"), path_regex_route(value)), "re")
        assert c.status == "False" and reason in c.message, (value, c.message)


def test_regular_expressions_re2_takes_are_accepted() -> None:
    """Python's re refused these: inline flags after the leading `/`, Unicode classes, `\\z`,
    `(?<name>...)`, and a program over Envoy's default limit of 100."""
    for value in ["/(?i)api/.*", "/\\pL+", "/a\\z", "/(?<n>v[0-9]+)", f"/{BIG}{{1,8}}"]:
        c = accepted(run(service("web"), path_regex_route(value)), "re")
        assert c.status == "True", (value, c.message)


def test_a_grpc_regular_expression_is_checked_whole() -> None:
    """Service and method each fit; the path expression Envoy compiles from both does not."""
    half = f"{BIG}{{1,400}}"  # 18,003 each
    res = run_grpc([grpc_rule("a", type="RegularExpression", service=half, method=half)])
    c = accepted(res, "gr", "GRPCRoute")
    assert c.status == "False" and "spec.rules[0].matches[0].method: regular" in c.message, c


def test_a_redirect_scheme_outside_gateway_apis_enum_is_refused() -> None:
    """Files mode has no schema to keep it out: Envoy took any scheme, `a\\nb` too, and the
    clients got a broken Location header."""
    redirect = {"type": "RequestRedirect", "requestRedirect": {"scheme": "ftp"}}
    res = run(service("web"), route("rd", [parent("web")], [{"filters": [redirect]}]))
    c = accepted(res, "rd")
    assert c.status == "False", c
    assert "spec.rules[0].filters[0].requestRedirect.scheme: unsupported value 'ftp'" in c.message


def test_exact_and_prefix_paths_follow_gateway_apis_rules() -> None:
    """Files mode has no schema: `//` became the prefix `/`, which matches every request."""
    for value in ("//", "/a//b", "/a/./b", "/a/../b", "/a%2fb", "/a/..", "/a/."):
        for kind in ("PathPrefix", "Exact"):
            match = {"path": {"type": kind, "value": value}}
            res = run(
                service("web"),
                route("p", [parent("web")], [{"matches": [match], "backendRefs": to("web")}]),
            )
            c = accepted(res, "p")
            assert c.status == "False" and "path.value: must not contain" in c.message, c


def test_a_grpc_service_in_fully_qualified_form_matches_its_path() -> None:
    """Gateway API takes `.pkg.Svc` (protobuf's fully-qualified name); it was refused as an
    invalid gRPC name, and a request's path (`/pkg.Svc/Get`) has no dot to match anyway."""
    res = run_grpc([grpc_rule("a", service=".pkg.Svc", method="Get")])
    assert accepted(res, "gr", "GRPCRoute").status == "True"
    (r,) = [r for r in routes(res, "shop/g:9000") if r.name.startswith("GRPCRoute/")]
    assert r.match.path == ir.PathMatch("Exact", "/pkg.Svc/Get")


# -- filters nodemesh does not implement ----------------------------------------------------


def test_a_filter_type_nodemesh_does_not_implement_makes_the_route_not_accepted() -> None:
    """Gateway API: an unknown filter type gives Accepted=False/UnsupportedValue. Such a rule
    was Accepted and answered 500, with ResolvedRefs=False as if a reference were missing."""
    cors = {"type": "CORS", "cors": {"allowOrigins": ["https://shop.example"]}}
    auth = {"type": "ExternalAuth", "externalAuth": {"protocol": "HTTP", "backendRef": to("a")[0]}}
    for f in (cors, auth, {"type": "Compress"}):
        rules = [{"backendRefs": to("web")}, {"filters": [f], "backendRefs": to("web")}]
        res = run(service("web"), service("a"), route("r", [parent("web")], rules))
        c = accepted(res, "r")
        assert (c.status, c.reason) == ("False", "UnsupportedValue"), c
        assert f"spec.rules[1].filters[0].type: unsupported value {f['type']!r}" in c.message
        assert [r.name for r in routes(res, "shop/web:80")] == ["Service/shop/web:80/default"]
    rewrite = {"type": "URLRewrite", "urlRewrite": {"hostname": "b"}}  # not in GRPCRoute's enum
    c = accepted(
        run_grpc([{"filters": [rewrite], "backendRefs": to("a", 9000)}]), "gr", "GRPCRoute"
    )
    assert (c.status, c.reason) == ("False", "UnsupportedValue"), c
    assert "spec.rules[0].filters[0].type: unsupported value 'URLRewrite'" in c.message


def test_session_persistence_makes_the_route_not_accepted() -> None:
    """Gateway API's sessionPersistence (a rule's, extended): nodemesh does not implement it.
    It was ignored, the route Accepted while no request kept to an endpoint."""
    persistence = {"sessionName": "s", "type": "Cookie"}
    rules = [{"backendRefs": to("web"), "sessionPersistence": persistence}]
    res = run(service("web"), route("r", [parent("web")], rules))
    c = accepted(res, "r")
    assert (c.status, c.reason) == ("False", "UnsupportedValue"), c
    assert c.message.startswith("spec.rules[0].sessionPersistence: not implemented"), c
    assert [r.name for r in routes(res, "shop/web:80")] == ["Service/shop/web:80/default"]
    c = accepted(
        run_grpc([{"backendRefs": to("a", 9000), "sessionPersistence": persistence}]),
        "gr",
        "GRPCRoute",
    )
    assert (c.status, c.reason) == ("False", "UnsupportedValue"), c
    # written as null: absent
    rules = [{"backendRefs": to("web"), "sessionPersistence": None}]
    assert accepted(run(service("web"), route("r", [parent("web")], rules)), "r").status == "True"


def test_an_extension_ref_filter_fails_closed_with_invalid_kind() -> None:
    """nodemesh has no custom filters. Gateway API: the filter MUST NOT be skipped, its requests
    get an error; GEP-1364: Accepted, with ResolvedRefs=False/InvalidKind (the reason was
    UnsupportedValue, which is not one of ResolvedRefs')."""
    ext = {"group": "example.com", "kind": "Auth", "name": "a"}
    rules = [
        {
            "matches": [{"path": {"type": "PathPrefix", "value": "/ext"}}],
            "filters": [{"type": "ExtensionRef", "extensionRef": ext}],
            "backendRefs": to("web"),
        },
        {"backendRefs": to("web")},
    ]
    res = run(service("web"), route("ext", [parent("web")], rules))
    by_type = {c.type: c for c in conditions(res, "ext")}
    assert by_type["Accepted"].status == "True"
    resolved = by_type["ResolvedRefs"]
    assert (resolved.status, resolved.reason) == ("False", "InvalidKind"), resolved
    assert "spec.rules[0].filters[0].extensionRef: example.com/Auth 'a'" in resolved.message
    ext_route, rest = routes(res, "shop/web:80")
    assert ext_route.name == "HTTPRoute/shop/ext/rule-0/0"
    assert (ext_route.backends, ext_route.direct_status) == ((), 500)
    assert rest.backends == (ir.Backend("shop/web:80"),)


def test_an_extension_ref_filter_fails_a_redirect_closed_too() -> None:
    """Gateway API: a filter that cannot be resolved is not skipped. The rule's redirect
    still answered 301 beside it, where the reference says 500."""
    redirect = {"type": "RequestRedirect", "requestRedirect": {"statusCode": 301}}
    ext = {"type": "ExtensionRef", "extensionRef": {"group": "x.io", "kind": "F", "name": "f"}}
    res = run(service("web"), route("rx", [parent("web")], [{"filters": [redirect, ext]}]))
    (r,) = [r for r in routes(res, "shop/web:80") if r.name.startswith("HTTPRoute/")]
    assert (r.redirect, r.backends, r.direct_status) == (None, (), 500)


def mirror(**fields: Any) -> dict[str, Any]:
    return {"type": "RequestMirror", "requestMirror": {"backendRef": to("web")[0], **fields}}


HEADERS = {
    "type": "RequestHeaderModifier",
    "requestHeaderModifier": {"set": [{"name": "x-a", "value": "1"}]},
}
REWRITE = {"type": "URLRewrite", "urlRewrite": {"hostname": "b"}}
REDIRECT = {"type": "RequestRedirect", "requestRedirect": {"hostname": "b"}}


@pytest.mark.parametrize(
    ("rule", "where", "message"),
    [
        ({"filters": [mirror(fraction={"numerator": -1, "denominator": 100})]},
         "filters[0].requestMirror.fraction", "needs 0 <= numerator <= denominator"),
        ({"filters": [mirror(percent=10, fraction={"numerator": 1})]},
         "filters[0].requestMirror", "takes percent or fraction, not both"),
        ({"filters": [HEADERS, HEADERS], "backendRefs": to("web")},
         "filters[1].type", "a RequestHeaderModifier filter cannot be repeated"),
        ({"filters": [REWRITE, REWRITE], "backendRefs": to("web")},
         "filters[1].type", "a URLRewrite filter cannot be repeated"),
        ({"filters": [REDIRECT, REWRITE]},
         "filters[1].type", "either RequestRedirect or URLRewrite, not both"),
        ({"filters": [REDIRECT], "backendRefs": to("web")},
         "backendRefs", "a rule with a RequestRedirect filter takes no backendRefs"),
        ({"filters": [{"type": "URLRewrite", "urlRewrite": {"path": {
            "type": "ReplaceFullPath", "replaceFullPath": "full"}}}], "backendRefs": to("web")},
         "filters[0].urlRewrite.path.replaceFullPath", "must start with '/'"),
        ({"filters": [{"type": "URLRewrite", "urlRewrite": {"path": {
            "type": "ReplacePrefixMatch", "replacePrefixMatch": "xyz"}}}],
          "backendRefs": to("web")},
         "filters[0].urlRewrite.path.replacePrefixMatch", "must be empty or start with '/'"),
        ({"backendRefs": [{**to("web")[0], "filters": [HEADERS, HEADERS]}]},
         "backendRefs[0].filters[1].type", "a RequestHeaderModifier filter cannot be repeated"),
    ],
    ids=["negative-fraction", "percent-and-fraction", "repeated-header-modifier",
         "repeated-rewrite", "redirect-and-rewrite", "redirect-and-backends",
         "relative-full-path", "relative-prefix", "repeated-on-a-backend"],
)  # fmt: skip
def test_filters_gateway_apis_validation_refuses_are_refused(
    rule: dict[str, Any], where: str, message: str
) -> None:
    """Files mode has no API server to enforce Gateway API's rules. A negative mirror fraction
    failed the whole build (no Service in the mesh got config); the others were Accepted and
    lost part of the rule (the first of two header modifiers, a redirect's backendRefs) or
    sent `GET xyz/bar` upstream, which backends answer with 400."""
    res = run(service("web"), route("f", [parent("web")], [rule]))
    c = accepted(res, "f")
    assert (c.status, c.reason) == ("False", "UnsupportedValue"), c
    assert f"spec.rules[0].{where}: " in c.message and message in c.message, c.message
    assert Translator().translate(res.mesh).snapshot().consistent() == []


def test_an_empty_prefix_replacement_is_accepted() -> None:
    """Gateway API's way to drop the matched prefix ("/foo/bar" -> "/bar")."""
    rewrite = {"type": "URLRewrite", "urlRewrite": {"path": {
        "type": "ReplacePrefixMatch", "replacePrefixMatch": ""}}}  # fmt: skip
    match = [{"path": {"type": "PathPrefix", "value": "/foo"}}]
    rule = {"matches": match, "filters": [rewrite], "backendRefs": to("web")}
    assert accepted(run(service("web"), route("e", [parent("web")], [rule])), "e").status == "True"


def test_a_grpcroute_with_timeouts_or_retry_is_refused_in_files_mode(tmp_path: Path) -> None:
    """GRPCRoute rules have no `timeouts` or `retry` (HTTPRoute rules do): the API server
    refuses them. Files mode applied them (the builder reads both kinds' rules alike), so a
    route that worked from a directory failed `kubectl apply`, as examples/ did."""
    rule: dict[str, Any] = {
        "matches": [{"method": {"service": "shop.Catalog"}}],
        "backendRefs": [{"name": "catalog", "port": 50051}],
    }
    route = {
        "apiVersion": "gateway.networking.k8s.io/v1",
        "kind": "GRPCRoute",
        "metadata": {"name": "catalog", "namespace": "shop"},
        "spec": {"parentRefs": [{"kind": "Service", "name": "catalog"}], "rules": [rule]},
    }
    (tmp_path / "route.yaml").write_text(yaml.safe_dump(route))
    store = Store()
    source = FilesSource(tmp_path, store)
    source.scan()
    assert source.errors == {}
    assert store.get(ObjectKey("GRPCRoute", "shop", "catalog")) is not None

    rule["timeouts"] = {"request": "5s"}
    rule["retry"] = {"attempts": 2}
    (tmp_path / "route.yaml").write_text(yaml.safe_dump(route))
    source.scan()
    assert source.errors["route.yaml"] == (
        "route.yaml: GRPCRoute/shop/catalog: spec.rules[0].timeouts: GRPCRoute has no such "
        "field (HTTPRoute has); use a TrafficPolicy's timeouts on the Service; "
        "spec.rules[0].retry: GRPCRoute has no such field (HTTPRoute has); use a "
        "TrafficPolicy's retry on the Service; route.yaml: keeping the objects from its last "
        "good version"
    )
    # the last good version stays
    kept = store.get(ObjectKey("GRPCRoute", "shop", "catalog"))
    assert kept is not None and "timeouts" not in kept["spec"]["rules"][0]


# Boundaries a mutation review found unguarded by the fast tests.


def test_a_backend_request_timeout_equal_to_the_request_timeout_is_accepted() -> None:
    """Gateway API forbids backendRequest longer than request, not equal to it."""
    rules = [{"backendRefs": to("web"), "timeouts": {"request": "1s", "backendRequest": "1s"}}]
    res = run(service("web"), route("r", [parent("web")], rules))
    assert accepted(res, "r").status == "True"
    (r,) = routes(res, "shop/web:80")
    assert r.retry is not None and r.retry.per_try_timeout_ms == 1000


def test_a_backend_request_timeout_alone_asks_for_no_retry() -> None:
    """Without retry (route or policy), a per-try timeout must not bring Envoy's default
    retry (1, on connect-failure, refused-stream and reset): num_retries 0."""
    rules = [{"backendRefs": to("web"), "timeouts": {"backendRequest": "2s"}}]
    (r,) = routes(run(service("web"), route("r", [parent("web")], rules)), "shop/web:80")
    assert r.retry is not None and r.retry.num_retries == 0 and r.retry.per_try_timeout_ms == 2000


def test_mirror_fractions_at_their_bounds() -> None:
    """A fraction without a denominator is out of 100 (Gateway API's default); numerator equal
    to denominator mirrors everything."""
    for fraction, percent in (({"numerator": 5}, 5.0), ({"numerator": 3, "denominator": 3}, 100.0)):
        mirror = {"type": "RequestMirror",
                  "requestMirror": {"backendRef": to("a")[0], "fraction": fraction}}  # fmt: skip
        rules = [{"backendRefs": to("web"), "filters": [mirror]}]
        res = run(service("web"), service("a"), route("r", [parent("web")], rules))
        assert accepted(res, "r").status == "True", fraction
        (r,) = routes(res, "shop/web:80")
        assert [m.percent for m in r.mirrors] == [percent], fraction


def test_resolved_refs_gives_the_first_problems_reason() -> None:
    refs = [{"group": "x.example", "kind": "Thing", "name": "t"}, {"name": "nope", "port": 80}]
    res = run(service("web"), route("r", [parent("web")], [{"backendRefs": refs}]))
    c = next(c for c in conditions(res, "r") if c.type == "ResolvedRefs")
    assert (c.status, c.reason) == ("False", "InvalidKind"), c
    assert "not a Service" in c.message and "nope" in c.message


def test_a_query_param_name_of_256_characters_is_the_longest_taken() -> None:
    for length, status in ((256, "True"), (257, "False")):
        match = {"queryParams": [{"name": "q" * length, "value": "1"}]}
        rules = [{"matches": [match], "backendRefs": to("web")}]
        c = accepted(run(service("web"), route("r", [parent("web")], rules)), "r")
        assert c.status == status, (length, c)
        if status == "False":
            assert "longer than 256 characters" in c.message, c
