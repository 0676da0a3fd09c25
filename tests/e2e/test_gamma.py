"""What Gateway API's mesh conformance suite (the GAMMA profile) checks, through a real node
Envoy, for what the other e2e modules leave out: a parentRef's port, match precedence with
headers and query parameters, header modifiers that append or meet other cases, on a rule or
on a backendRef, path rewrites, every redirect field, and GRPCRoute header modifiers, mirrors
and weights.

The world is the suite's, in nodemesh's own objects: two versions of a workload, each
answering HTTP on the Service ports 80 and 8080 and gRPC on 7070; per scenario a Service of
each version (`<name>-v1`, `<name>-v2`) and one in front of both (`<name>`). An HTTP backend
answers with its name: `v1` behind port 80, `v1-alt` behind 8080. One control plane and Envoy
serve the module; each scenario applies its routes once and its cases are parameters.
"""

from __future__ import annotations

import asyncio
from collections import Counter
from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass
from typing import Any

import grpc
import pytest
import pytest_asyncio

from nodemesh.controlplane.store import ObjectKey
from tests.e2e.conftest import Backends
from tests.e2e.mesh import NODE, HttpBackend, Mesh, Seen, service
from tests.e2e.objects import grpc_route, http_route, pod, to
from tests.support import eventually

pytestmark = pytest.mark.asyncio(loop_scope="module")

VERSIONS = ("v1", "v2")
PORTS = (("http", 80, "http"), ("http-alt", 8080, "http"), ("grpc", 7070, "grpc"))
GRPC_SERVICE = "nodemesh.test.Echo"


class GrpcPod:
    """A gRPC server with two methods, `Echo` and `EchoTwo`, that take and answer raw bytes:
    it answers with its name and records each call's method and metadata."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.port = 0
        self.calls: list[tuple[str, tuple[tuple[str, str], ...]]] = []
        self._server: grpc.aio.Server | None = None

    def values(self, call: int, key: str) -> list[str]:
        return [v for k, v in self.calls[call][1] if k == key]

    async def start(self) -> GrpcPod:
        def method(name: str) -> Any:
            async def handle(request: bytes, context: grpc.aio.ServicerContext) -> bytes:
                self.calls.append((name, tuple(context.invocation_metadata() or ())))
                return self.name.encode()

            return grpc.unary_unary_rpc_method_handler(handle)

        self._server = grpc.aio.server()
        self._server.add_generic_rpc_handlers(
            (
                grpc.method_handlers_generic_handler(
                    GRPC_SERVICE, {"Echo": method("Echo"), "EchoTwo": method("EchoTwo")}
                ),
            )
        )
        self.port = self._server.add_insecure_port("127.0.0.1:0")
        await self._server.start()
        return self

    async def stop(self) -> None:
        if self._server is not None:
            await self._server.stop(0)


@dataclass
class Pods:
    http: dict[str, HttpBackend]  # "v1" (port 80), "v1-alt" (port 8080), "v2", "v2-alt"
    grpc: dict[str, GrpcPod]  # "v1", "v2"

    def ports(self, version: str) -> dict[str, int]:
        return {
            "http": self.http[version].port,
            "http-alt": self.http[f"{version}-alt"].port,
            "grpc": self.grpc[version].port,
        }


def pod_slice(svc: str, version: str, ports: Mapping[str, int]) -> dict[str, Any]:
    """The EndpointSlice of one version's pod behind `svc`: all its named ports."""
    return {
        "apiVersion": "discovery.k8s.io/v1",
        "kind": "EndpointSlice",
        "metadata": {
            "name": f"{svc}-{version}",
            "namespace": "shop",
            "labels": {"kubernetes.io/service-name": svc},
        },
        "addressType": "IPv4",
        "ports": [{"name": n, "port": p, "protocol": "TCP"} for n, p in ports.items()],
        "endpoints": [
            {"addresses": ["127.0.0.1"], "conditions": {"ready": True}, "nodeName": NODE}
        ],
    }


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def pods(backends: Backends) -> AsyncIterator[Pods]:
    http = {name: await backends.get(name) for name in ("v1", "v1-alt", "v2", "v2-alt")}
    grpcs: dict[str, GrpcPod] = {}
    try:
        for v in VERSIONS:
            grpcs[v] = await GrpcPod(v).start()
        yield Pods(http, grpcs)
    finally:
        for g in grpcs.values():
            await g.stop()


async def scenario(mesh: Mesh, pods: Pods, name: str, *routes: dict[str, Any]) -> None:
    """Services `name`, `name-v1` and `name-v2` with their endpoints, and `routes`, programmed
    in the node Envoy; every route Accepted with its references resolved."""
    objs: list[dict[str, Any]] = [service(name, ports=PORTS)]
    for v in VERSIONS:
        objs += [
            service(f"{name}-{v}", ports=PORTS),
            pod_slice(f"{name}-{v}", v, pods.ports(v)),
            pod_slice(name, v, pods.ports(v)),
        ]
    mesh.apply(*objs, *routes)
    await mesh.converge()
    conditions = mesh.pipeline.conditions()
    for r in routes:
        key = ObjectKey(r["kind"], r["metadata"]["namespace"], r["metadata"]["name"])
        assert {(c.type, c.status) for c in conditions[key]} >= {
            ("Accepted", "True"),
            ("ResolvedRefs", "True"),
        }, conditions[key]


def lower(headers: Mapping[str, str]) -> dict[str, str]:
    return {k.lower(): v for k, v in headers.items()}


def joined(seen: Seen, name: str) -> str | None:
    """A request header's values as the suite compares them: joined by ",", None if absent."""
    values = seen.values(name)
    return ",".join(values) if values else None


def prefix(value: str) -> dict[str, Any]:
    return {"path": {"type": "PathPrefix", "value": value}}


def modifier(kind: str, **changes: Any) -> dict[str, Any]:
    """A RequestHeaderModifier (or another header modifier `kind`): set, add or remove."""
    spec = {
        op: [{"name": n, "value": v} for n, v in pairs.items()] if op != "remove" else pairs
        for op, pairs in changes.items()
    }
    field_name = kind[0].lower() + kind[1:]
    return {"type": kind, field_name: spec}


# --- A parentRef's port (MeshPorts), and a route only for its own Service (MeshFrontend) ---


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def ports_scenario(mesh: Mesh, pods: Pods) -> None:
    def tagged(value: str) -> dict[str, Any]:
        return modifier("ResponseHeaderModifier", set={"x-route": value})

    await scenario(
        mesh, pods, "ports",
        http_route("ports-v1", "ports-v1", port=80, rules=[
            {"filters": [tagged("v1")], "backendRefs": [to("ports-v1")]}]),
        http_route("ports-v2", "ports-v2", rules=[
            {"filters": [tagged("v2")], "backendRefs": [to("ports-v2")]}]),
    )  # fmt: skip


@pytest.mark.parametrize(
    ("host", "backend", "route"),
    [
        ("ports-v1.shop", "v1", "v1"),  # the route's port
        ("ports-v1.shop:8080", "v1-alt", None),  # another port: the Service's own default
        ("ports-v2.shop", "v2", "v2"),  # no port in the parentRef: every port
        ("ports-v2.shop:8080", "v2", "v2"),  # ... and its backend is the route's, port 80
    ],
)
async def test_a_parent_port_limits_the_route_to_that_port(
    mesh: Mesh, ports_scenario: None, host: str, backend: str, route: str | None
) -> None:
    reply = await mesh.get(host)
    assert (reply.status, reply.body) == (200, backend)
    assert lower(reply.headers).get("x-route") == route


async def test_a_route_applies_to_its_own_service_only(mesh: Mesh, ports_scenario: None) -> None:
    """`ports` sends to the same pods as `ports-v1` and `ports-v2`; their routes are not its."""
    for host, either in (("ports.shop", {"v1", "v2"}), ("ports.shop:8080", {"v1-alt", "v2-alt"})):
        reply = await mesh.get(host)
        assert reply.status == 200 and reply.body in either, (host, reply)
        assert "x-route" not in lower(reply.headers)


# --- A consumer route: only for its own namespace's clients (MeshConsumerRoute) ---

CONSUMER = "127.0.0.2"  # a pod of namespace `gamma-clients` on the node
PRODUCER = "127.0.0.3"  # a pod of namespace `shop`, where the Service is


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def consumer_scenario(mesh: Mesh, pods: Pods) -> None:
    mesh.apply(pod("client", "gamma-clients", CONSUMER), pod("neighbour", "shop", PRODUCER))
    route = http_route("consumer-v1", "consumer-v1", ns="gamma-clients", rules=[
        {"filters": [modifier("ResponseHeaderModifier", set={"x-route": "consumer"})],
         "backendRefs": [{**to("consumer-v1"), "namespace": "shop"}]}])  # fmt: skip
    route["spec"]["parentRefs"][0]["namespace"] = "shop"
    # the producer has no route of its own for the Service
    await scenario(mesh, pods, "consumer", route)


@pytest.mark.parametrize(
    ("source", "route"),
    [(CONSUMER, "consumer"), (PRODUCER, None), ("127.0.0.1", None)],
    ids=["consumer-namespace", "producer-namespace", "no-pod"],
)
async def test_a_consumer_route_applies_to_its_namespace_only(
    mesh: Mesh, consumer_scenario: None, source: str, route: str | None
) -> None:
    reply = await mesh.get("consumer-v1.shop", source=source)
    assert (reply.status, reply.body) == (200, "v1")
    assert lower(reply.headers).get("x-route") == route


# --- A route on port 80 to another Service's port 8080; a named rule (MeshHTTPRouteSimple-
# SameNamespace, MeshHTTPRouteNamedRule) ---


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def simple_scenario(mesh: Mesh, pods: Pods) -> None:
    await scenario(
        mesh, pods, "simple",
        http_route("simple", "simple", port=80, rules=[
            {"name": "named-rule", "matches": [prefix("/named")],
             "backendRefs": [to("simple-v1", port=8080)]},
            {"matches": [prefix("/unnamed")], "backendRefs": [to("simple-v2", port=8080)]},
            {"backendRefs": [to("simple-v1")]},
        ]),
    )  # fmt: skip


@pytest.mark.parametrize(
    ("path", "backend"),
    [("/", "v1"), ("/named", "v1-alt"), ("/named/x", "v1-alt"), ("/unnamed", "v2-alt")],
)
async def test_rules_named_or_not_send_to_the_backend_port_they_name(
    mesh: Mesh, simple_scenario: None, path: str, backend: str
) -> None:
    reply = await mesh.get("simple.shop", path)
    assert (reply.status, reply.body, reply.headers["x-path"]) == (200, backend, path)


# --- Path and header matches, OR'd within a rule (MeshHTTPRouteMatching) ---


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def match_scenario(mesh: Mesh, pods: Pods) -> None:
    def version(value: str) -> dict[str, Any]:
        return {"headers": [{"name": "version", "value": value}]}

    await scenario(
        mesh, pods, "match",
        http_route("match", "match", port=80, rules=[
            {"matches": [prefix("/"), version("one")],
             "backendRefs": [to("match-v1", port=8080)]},
            {"matches": [prefix("/v2"), version("two")],
             "backendRefs": [to("match-v2", port=8080)]},
        ]),
    )  # fmt: skip


@pytest.mark.parametrize(
    ("path", "headers", "backend"),
    [
        ("/", {}, "v1-alt"),
        ("/example", {}, "v1-alt"),
        ("/", {"version": "one"}, "v1-alt"),
        ("/v2", {}, "v2-alt"),
        ("/v2/example", {}, "v2-alt"),
        ("/v2/", {}, "v2-alt"),
        # a header match is a match on the prefix "/" too, and it outranks the bare "/";
        # header names match in any case
        ("/", {"Version": "two"}, "v2-alt"),
        ("/v2example", {}, "v1-alt"),  # not the segment /v2
        ("/foo/v2/example", {}, "v1-alt"),
    ],
)
async def test_path_and_header_matches_pick_the_backend(
    mesh: Mesh, match_scenario: None, path: str, headers: dict[str, str], backend: str
) -> None:
    reply = await mesh.get("match.shop", path, headers)
    assert (reply.status, reply.body) == (200, backend)


# --- Query parameter matches, alone and with others (MeshHTTPRouteQueryParamMatching) ---


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def query_scenario(mesh: Mesh, pods: Pods) -> None:
    def fruit(value: str, **more: Any) -> dict[str, Any]:
        return {"queryParams": [{"name": "fruit", "value": value}], **more}

    def version(value: str) -> list[dict[str, str]]:
        return [{"name": "version", "value": value}]

    v1, v1_alt = [to("query-v1")], [to("query-v1", port=8080)]
    v2_alt = [to("query-v2", port=8080)]
    await scenario(
        mesh, pods, "query",
        http_route("query", "query", port=80, rules=[
            {"matches": [fruit("apple")], "backendRefs": v1_alt},
            {"matches": [fruit("pear")], "backendRefs": v2_alt},
            # with a path or a header: more specific than the query alone
            {"matches": [fruit("apple", **prefix("/basket"))], "backendRefs": v1},
            {"matches": [fruit("apple", headers=version("one"))], "backendRefs": v2_alt},
            # (path AND query) OR (path AND header AND query)
            {"matches": [fruit("plum", **prefix("/crate")),
                         fruit("fig", **prefix("/box"), headers=version("three"))],
             "backendRefs": v1},
            # a path outranks a query parameter, whatever the rule order
            {"matches": [prefix("/shelf")], "backendRefs": v1_alt},
            {"matches": [fruit("kiwi")], "backendRefs": v2_alt},
        ]),
    )  # fmt: skip


@pytest.mark.parametrize(
    ("path", "headers", "backend"),
    [
        ("/?fruit=apple", {}, "v1-alt"),
        ("/?fruit=pear", {}, "v2-alt"),
        ("/?fruit=apple&other=irrelevant", {}, "v1-alt"),
        ("/?color=red&fruit=pear", {}, "v2-alt"),
        ("/?color=red", {}, None),
        ("/?fruit=grape", {}, None),
        ("/?fruit=applepear", {}, None),  # Exact: the whole value
        ("/", {}, None),
        ("/basket?fruit=apple", {}, "v1"),
        ("/?fruit=apple", {"version": "one"}, "v2-alt"),
        ("/crate?fruit=plum", {}, "v1"),
        ("/box?fruit=fig", {"version": "three"}, "v1"),
        ("/?fruit=plum", {}, None),  # without its path
        ("/box?fruit=fig", {}, None),  # without its header
        ("/shelf?fruit=kiwi", {}, "v1-alt"),
        ("/?fruit=kiwi", {}, "v2-alt"),
    ],
)
async def test_query_parameter_matches_pick_the_backend_or_none(
    mesh: Mesh, query_scenario: None, path: str, headers: dict[str, str], backend: str | None
) -> None:
    reply = await mesh.get("query.shop", path, headers)
    if backend is None:
        assert reply.status == 404, reply
    else:
        assert (reply.status, reply.body) == (200, backend)


# --- RequestHeaderModifier on the rule (MeshHTTPRouteRequestHeaderModifier) and on the
# backendRef (MeshHTTPRouteBackendRequestHeaderModifier): the same cases ---


@pytest_asyncio.fixture(scope="module", loop_scope="module", params=["rule", "backendRef"])
async def headers_scenario(mesh: Mesh, pods: Pods, request: pytest.FixtureRequest) -> str:
    """The Service whose route has the modifiers in its rules' filters, or its backendRefs'."""
    name = "headers" if request.param == "rule" else "backend-headers"

    def rule(path: str, **changes: Any) -> dict[str, Any]:
        filters = [modifier("RequestHeaderModifier", **changes)]
        backend = to(f"{name}-v1", port=8080)
        if request.param == "rule":
            return {"matches": [prefix(path)], "filters": filters, "backendRefs": [backend]}
        return {"matches": [prefix(path)], "backendRefs": [{**backend, "filters": filters}]}

    await scenario(
        mesh, pods, name,
        http_route(name, name, port=80, rules=[
            rule("/set", set={"X-Fixed": "fixed-value"}),
            rule("/add", add={"X-Extra": "extra-value"}),
            rule("/remove", remove=["X-Drop"]),
            rule("/multiple",
                 set={"X-Fixed-1": "fixed-1", "X-Fixed-2": "fixed-2"},
                 add={"X-Extra-1": "extra-1", "X-Extra-2": "extra-2", "X-Extra-3": "extra-3"},
                 remove=["X-Drop-1", "X-Drop-2"]),
            rule("/any-case", set={"X-Fixed": "fixed"}, add={"X-Extra": "extra"},
                 remove=["X-Drop"]),
        ]),
    )  # fmt: skip
    return name


@pytest.mark.parametrize(
    ("path", "sent", "arrived", "absent"),
    [
        ("/set", {"X-Other": "val"}, {"X-Other": "val", "X-Fixed": "fixed-value"}, []),
        ("/set", {"X-Fixed": "sent"}, {"X-Fixed": "fixed-value"}, []),  # set overwrites
        ("/add", {"X-Other": "val"}, {"X-Other": "val", "X-Extra": "extra-value"}, []),
        ("/add", {"X-Extra": "sent"}, {"X-Extra": "sent,extra-value"}, []),  # add appends
        ("/remove", {"X-Drop": "val"}, {}, ["X-Drop"]),
        (
            "/multiple",
            {"X-Fixed-2": "sent-2", "X-Extra-2": "sent-2", "X-Drop-2": "sent-2",
             "X-Other": "val"},
            {"X-Fixed-1": "fixed-1", "X-Fixed-2": "fixed-2", "X-Extra-1": "extra-1",
             "X-Extra-2": "sent-2,extra-2", "X-Extra-3": "extra-3", "X-Other": "val"},
            ["X-Drop-1", "X-Drop-2"],
        ),
        # the filter names headers in one case, the request in another: the same headers
        (
            "/any-case",
            {"x-fixed": "sent", "x-extra": "sent", "x-drop": "sent", "X-Other": "val"},
            {"X-Fixed": "fixed", "X-Extra": "sent,extra", "X-Other": "val"},
            ["X-Drop"],
        ),
    ],
)  # fmt: skip
async def test_request_header_modifier_sets_adds_and_removes(
    mesh: Mesh,
    pods: Pods,
    headers_scenario: str,
    path: str,
    sent: dict[str, str],
    arrived: dict[str, str],
    absent: list[str],
) -> None:
    reply = await mesh.get(f"{headers_scenario}.shop", path, sent)
    assert (reply.status, reply.body) == (200, "v1-alt")
    seen = pods.http["v1-alt"].seen[-1]
    assert {name: joined(seen, name) for name in arrived} == arrived
    assert {name: joined(seen, name) for name in absent} == dict.fromkeys(absent)


# --- Header modifiers on one backendRef of a split: its requests and responses only ---


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def backend_split_scenario(mesh: Mesh, pods: Pods) -> None:
    canary = [
        modifier("RequestHeaderModifier", set={"X-Canary": "yes"}),
        modifier("ResponseHeaderModifier", set={"X-Served-By": "canary"}, remove=["X-Backend"]),
    ]
    await scenario(
        mesh, pods, "bsplit",
        http_route("bsplit", "bsplit", port=80, rules=[
            {"backendRefs": [to("bsplit-v1", 1), {**to("bsplit-v2", 1), "filters": canary}]}]),
    )  # fmt: skip


async def test_a_backend_refs_header_modifiers_change_only_its_share_of_a_split(
    mesh: Mesh, pods: Pods, backend_split_scenario: None
) -> None:
    """Gateway API: a backendRef's filters are "executed if and only if the request is being
    forwarded to the backend defined here". nodemesh refused them (Accepted=False)."""
    v1, v2 = pods.http["v1"], pods.http["v2"]
    before = len(v1.seen), len(v2.seen)
    replies = [await mesh.get("bsplit.shop", "/") for _ in range(40)]
    # 1:1, 40 requests: one backend getting none has probability 2**-39
    assert {r.body for r in replies} == {"v1", "v2"}, replies
    for reply in replies:
        headers = lower(reply.headers)
        canary = reply.body == "v2"
        assert headers.get("x-served-by") == ("canary" if canary else None), reply
        assert headers.get("x-backend") == (None if canary else "v1"), reply
    assert {joined(seen, "x-canary") for seen in v1.seen[before[0] :]} == {None}
    assert {joined(seen, "x-canary") for seen in v2.seen[before[1] :]} == {"yes"}


# --- The rule's header modifiers and a backendRef's, on the same headers ---


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def backend_order_scenario(mesh: Mesh, pods: Pods) -> None:
    rule_filters = [
        modifier(
            "RequestHeaderModifier",
            set={"X-Both": "rule", "X-Gone": "rule"},
            add={"X-List": "rule"},
        ),
        modifier("ResponseHeaderModifier", set={"X-Both": "rule"}),
        {"type": "URLRewrite", "urlRewrite": {"hostname": "rule.internal"}},
    ]
    backend_filters = [
        modifier(
            "RequestHeaderModifier",
            set={"X-Both": "backend", "Host": "backend.internal"},
            add={"X-List": "backend"},
            remove=["X-Gone"],
        ),
        modifier("ResponseHeaderModifier", set={"X-Both": "backend"}),
    ]
    await scenario(
        mesh, pods, "border",
        http_route("border", "border", port=80, rules=[
            {"filters": rule_filters,
             "backendRefs": [{**to("border-v1"), "filters": backend_filters}]}]),
    )  # fmt: skip


async def test_a_backend_refs_header_modifiers_apply_after_the_rules(
    mesh: Mesh, pods: Pods, backend_order_scenario: None
) -> None:
    """Gateway API applies a rule's filters, then the backend's: where both change a header,
    the backend's change is the later one (its set wins, its remove takes out what the rule
    set, its add appends after the rule's). Envoy by itself does the opposite: it applies a
    weighted cluster's changes before the route's."""
    reply = await mesh.get("border.shop", "/", {"X-List": "sent"})
    assert (reply.status, reply.body) == (200, "v1")
    seen = pods.http["v1"].seen[-1]
    assert {h: joined(seen, h) for h in ("x-both", "x-gone", "x-list", "host")} == {
        "x-both": "backend",
        "x-gone": None,
        "x-list": "sent,rule,backend",
        "host": "backend.internal",
    }
    assert lower(reply.headers)["x-both"] == "backend"


# --- URLRewrite of the path, alone and with a header modifier (MeshHTTPRouteRewritePath) ---


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def rewrite_scenario(mesh: Mesh, pods: Pods) -> None:
    def rewrite(kind: str, value: str) -> dict[str, Any]:
        key = "replacePrefixMatch" if kind == "ReplacePrefixMatch" else "replaceFullPath"
        return {"type": "URLRewrite", "urlRewrite": {"path": {"type": kind, key: value}}}

    headers = modifier(
        "RequestHeaderModifier", set={"X-Fixed": "fixed"}, add={"X-Extra": "extra"},
        remove=["X-Drop"],
    )  # fmt: skip

    def rule(path: str, *filters: dict[str, Any]) -> dict[str, Any]:
        return {"matches": [prefix(path)], "filters": list(filters),
                "backendRefs": [to("rewrite-v1")]}  # fmt: skip

    await scenario(
        mesh, pods, "rewrite",
        http_route("rewrite", "rewrite", port=80, rules=[
            rule("/old/one", rewrite("ReplacePrefixMatch", "/one")),
            rule("/strip", rewrite("ReplacePrefixMatch", "/")),
            rule("/whole/one", rewrite("ReplaceFullPath", "/one")),
            rule("/whole/and-headers", rewrite("ReplaceFullPath", "/test"), headers),
            rule("/old/and-headers", rewrite("ReplacePrefixMatch", "/old"), headers),
        ]),
    )  # fmt: skip


@pytest.mark.parametrize(
    ("path", "arrived"),
    [
        ("/old/one/two", "/one/two"),
        ("/old/one", "/one"),
        ("/strip/three", "/three"),
        ("/strip", "/"),
        ("/whole/one/two", "/one"),
        ("/whole/one?q=1", "/one?q=1"),
        ("/whole/and-headers/test", "/test"),
        ("/old/and-headers/one", "/old/one"),
    ],
)
async def test_url_rewrite_changes_the_path_the_backend_gets(
    mesh: Mesh, pods: Pods, rewrite_scenario: None, path: str, arrived: str
) -> None:
    reply = await mesh.get("rewrite.shop", path, {"X-Drop": "val", "X-Extra": "sent"})
    assert (reply.status, reply.body, reply.headers["x-path"]) == (200, "v1", arrived)
    seen = pods.http["v1"].seen[-1]
    if "and-headers" in path:  # the rewrite and the header changes both apply
        assert (joined(seen, "x-fixed"), joined(seen, "x-extra"), joined(seen, "x-drop")) == (
            "fixed",
            "sent,extra",
            None,
        )
    else:
        assert (joined(seen, "x-fixed"), joined(seen, "x-drop")) == (None, "val")


# --- RequestRedirect: status codes, hostname, path, port and scheme (the redirect tests) ---


def _redirects() -> list[dict[str, Any]]:
    """One route per group of the suite's redirect tests (a route takes at most 16 rules)."""
    full = {"type": "ReplaceFullPath", "replaceFullPath": "/replaced"}
    swap = {"type": "ReplacePrefixMatch", "replacePrefixMatch": "/new-prefix"}
    groups: dict[str, list[tuple[str, dict[str, Any]]]] = {
        "status": [
            ("/see-other", {"statusCode": 303}),
            ("/temporary", {"statusCode": 307}),
            ("/permanent", {"statusCode": 308}),
        ],
        "host": [
            ("/host", {"hostname": "example.org"}),
            *((f"/host-{c}", {"hostname": "example.org", "statusCode": c})
              for c in (301, 302, 303, 307, 308)),
        ],
        "path": [
            ("/old-prefix", {"path": swap}),
            ("/prefix-and-host", {"path": swap, "hostname": "example.org"}),
            ("/prefix-and-status", {"path": swap, "statusCode": 301}),
            ("/whole", {"path": full}),
            ("/whole-and-host", {"path": full, "hostname": "example.org"}),
            ("/whole-and-status", {"path": full, "statusCode": 301}),
        ],
        "port": [
            ("/port", {"port": 8083}),
            ("/port-and-host", {"port": 8083, "hostname": "example.org"}),
            ("/port-and-status", {"port": 8083, "statusCode": 301}),
            ("/port-host-status", {"port": 8083, "hostname": "example.org", "statusCode": 302}),
        ],
        "scheme": [
            ("/secure", {"scheme": "https"}),
            ("/secure-and-host", {"scheme": "https", "hostname": "example.org"}),
            ("/secure-and-status", {"scheme": "https", "statusCode": 301}),
            ("/secure-host-status",
             {"scheme": "https", "hostname": "example.org", "statusCode": 302}),
        ],
    }  # fmt: skip
    return [
        http_route(f"redirect-{group}", "redirect", port=80, rules=[
            {"matches": [prefix(path)],
             "filters": [{"type": "RequestRedirect", "requestRedirect": spec}]}
            for path, spec in cases
        ])
        for group, cases in groups.items()
    ]  # fmt: skip


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def redirect_scenario(mesh: Mesh, pods: Pods) -> None:
    await scenario(mesh, pods, "redirect", *_redirects())


HERE = "http://redirect.shop"
ELSEWHERE = "http://example.org"


# Gateway API lets a Location leave out the scheme's own port or name it: Envoy names 443.
@pytest.mark.parametrize(
    ("path", "status", "location"),
    [
        ("/see-other", 303, f"{HERE}/see-other"),
        ("/temporary/x", 307, f"{HERE}/temporary/x"),
        ("/permanent", 308, f"{HERE}/permanent"),
        ("/host/x", 302, f"{ELSEWHERE}/host/x"),
        *((f"/host-{c}", c, f"{ELSEWHERE}/host-{c}") for c in (301, 302, 303, 307, 308)),
        ("/old-prefix/lemon", 302, f"{HERE}/new-prefix/lemon"),
        ("/prefix-and-host", 302, f"{ELSEWHERE}/new-prefix"),
        ("/prefix-and-status/x", 301, f"{HERE}/new-prefix/x"),
        ("/whole/path/original", 302, f"{HERE}/replaced"),
        ("/whole-and-host", 302, f"{ELSEWHERE}/replaced"),
        ("/whole-and-status", 301, f"{HERE}/replaced"),
        ("/port", 302, "http://redirect.shop:8083/port"),
        ("/port-and-host", 302, "http://example.org:8083/port-and-host"),
        ("/port-and-status", 301, "http://redirect.shop:8083/port-and-status"),
        ("/port-host-status", 302, "http://example.org:8083/port-host-status"),
        ("/secure", 302, "https://redirect.shop:443/secure"),
        ("/secure-and-host", 302, "https://example.org:443/secure-and-host"),
        ("/secure-and-status", 301, "https://redirect.shop:443/secure-and-status"),
        ("/secure-host-status", 302, "https://example.org:443/secure-host-status"),
    ],
)
async def test_request_redirect_answers_with_status_and_location(
    mesh: Mesh, redirect_scenario: None, path: str, status: int, location: str
) -> None:
    reply = await mesh.get("redirect.shop", path)
    assert (reply.status, reply.headers.get("Location")) == (status, location)


# --- GRPCRoute: RequestHeaderModifier on the rule (MeshGRPCRouteRequestHeaderModifier) and on
# the backendRef: the same cases ---


async def call(mesh: Mesh, authority: str, method: str = "Echo",
               metadata: Mapping[str, str] | None = None) -> str:  # fmt: skip
    """One unary call through the node Envoy; the answer is the name of the pod that served."""
    options = [("grpc.default_authority", authority)]
    async with grpc.aio.insecure_channel(f"127.0.0.1:{mesh.outbound_port}", options=options) as ch:
        stub = ch.unary_unary(f"/{GRPC_SERVICE}/{method}")
        answer: bytes = await stub(b"", metadata=tuple((metadata or {}).items()), timeout=5)
        return answer.decode()


@pytest_asyncio.fixture(scope="module", loop_scope="module", params=["rule", "backendRef"])
async def grpc_headers_scenario(mesh: Mesh, pods: Pods, request: pytest.FixtureRequest) -> str:
    """The Service whose GRPCRoute has the modifiers in its rules' filters, or its
    backendRefs'."""
    name = "rpc" if request.param == "rule" else "rpc-backend"

    def rule(method: str, case: str, version: str, **changes: Any) -> dict[str, Any]:
        filters = [modifier("RequestHeaderModifier", **changes)]
        backend = to(f"{name}-{version}", port=7070)
        return {
            "matches": [{"method": {"service": GRPC_SERVICE, "method": method},
                         "headers": [{"name": "x-case", "value": case}]}],
            **({"filters": filters, "backendRefs": [backend]} if request.param == "rule"
               else {"backendRefs": [{**backend, "filters": filters}]}),
        }  # fmt: skip

    await scenario(
        mesh, pods, name,
        grpc_route(name, name, port=7070, rules=[
            rule("Echo", "set", "v1", set={"X-Fixed": "fixed-value"}),
            rule("Echo", "add", "v1", add={"X-Extra": "extra-value"}),
            rule("Echo", "remove", "v1", remove=["X-Drop"]),
            rule("EchoTwo", "multi", "v2",
                 set={"X-Fixed-1": "fixed-1", "X-Fixed-2": "fixed-2"},
                 add={"X-Extra-1": "extra-1", "X-Extra-2": "extra-2"},
                 remove=["X-Drop-1", "X-Drop-2"]),
        ]),
    )  # fmt: skip
    return name


@pytest.mark.parametrize(
    ("method", "case", "sent", "arrived", "absent", "served_by"),
    [
        ("Echo", "set", {"x-other": "val", "x-fixed": "sent"},
         {"x-other": "val", "x-fixed": "fixed-value"}, [], "v1"),
        ("Echo", "add", {"x-extra": "sent"}, {"x-extra": "sent,extra-value"}, [], "v1"),
        ("Echo", "remove", {"x-drop": "sent"}, {}, ["x-drop"], "v1"),
        ("EchoTwo", "multi", {"x-fixed-2": "sent", "x-extra-2": "sent", "x-drop-2": "sent"},
         {"x-fixed-1": "fixed-1", "x-fixed-2": "fixed-2", "x-extra-1": "extra-1",
          "x-extra-2": "sent,extra-2"}, ["x-drop-1", "x-drop-2"], "v2"),
    ],
)  # fmt: skip
async def test_grpc_request_header_modifier_changes_the_metadata(
    mesh: Mesh,
    pods: Pods,
    grpc_headers_scenario: str,
    method: str,
    case: str,
    sent: dict[str, str],
    arrived: dict[str, str],
    absent: list[str],
    served_by: str,
) -> None:
    served = pods.grpc[served_by]
    before = len(served.calls)
    authority = f"{grpc_headers_scenario}.shop:7070"
    assert await call(mesh, authority, method, {"x-case": case, **sent}) == served_by
    assert served.calls[before][0] == method
    got = {k: ",".join(served.values(before, k)) or None for k in (*arrived, *absent)}
    assert got == {**arrived, **dict.fromkeys(absent)}


# --- GRPCRoute: RequestMirror (MeshGRPCRouteRequestMirror) ---


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def grpc_mirror_scenario(mesh: Mesh, pods: Pods) -> None:
    mirror = {"type": "RequestMirror",
              "requestMirror": {"backendRef": to("rpcm-v2", port=7070)}}  # fmt: skip
    await scenario(
        mesh, pods, "rpcm",
        grpc_route("rpcm", "rpcm", port=7070, rules=[
            {"matches": [{"headers": [{"name": "x-mirror-only", "value": "true"}]}],
             "filters": [mirror], "backendRefs": [to("rpcm-v1", port=7070)]},
            {"matches": [{"headers": [{"name": "x-mirror-and-modify", "value": "true"}]}],
             "filters": [modifier("RequestHeaderModifier", set={"X-Fixed": "fixed"},
                                  add={"X-Extra": "extra"}, remove=["X-Drop"]), mirror],
             "backendRefs": [to("rpcm-v1", port=7070)]},
        ]),
    )  # fmt: skip


@pytest.mark.parametrize("modify", [False, True], ids=["mirror-only", "mirror-and-modify"])
async def test_grpc_request_mirror_copies_calls_to_another_service(
    mesh: Mesh, pods: Pods, grpc_mirror_scenario: None, modify: bool
) -> None:
    main, shadow = pods.grpc["v1"], pods.grpc["v2"]
    main_before, shadow_before = len(main.calls), len(shadow.calls)
    header = "x-mirror-and-modify" if modify else "x-mirror-only"
    sent = {header: "true", "x-drop": "val", "x-extra": "sent"}
    assert await call(mesh, "rpcm.shop:7070", "Echo", sent) == "v1"
    await eventually(lambda: len(shadow.calls) == shadow_before + 1, what="the mirrored call")
    assert shadow.calls[shadow_before][0] == "Echo"
    assert len(main.calls) == main_before + 1
    for served, at in ((main, main_before), (shadow, shadow_before)):
        got = tuple(
            ",".join(served.values(at, k)) or None for k in ("x-fixed", "x-extra", "x-drop")
        )
        assert got == (("fixed", "sent,extra", None) if modify else (None, "sent", "val"))


# --- GRPCRoute: weighted backends (MeshGRPCRouteWeight) ---


async def test_grpc_weights_split_calls(mesh: Mesh, pods: Pods) -> None:
    await scenario(
        mesh, pods, "rpcw",
        grpc_route("rpcw", "rpcw", port=7070, rules=[
            {"backendRefs": [to("rpcw-v1", 70, port=7070), to("rpcw-v2", 30, port=7070)]}]),
    )  # fmt: skip
    n = 400
    options = [("grpc.default_authority", "rpcw.shop:7070")]
    async with grpc.aio.insecure_channel(f"127.0.0.1:{mesh.outbound_port}", options=options) as ch:
        stub = ch.unary_unary(f"/{GRPC_SERVICE}/Echo")
        answers = await asyncio.gather(*(stub(b"", timeout=10) for _ in range(n)))
    counts = Counter(a.decode() for a in answers)
    assert set(counts) == {"v1", "v2"}
    # Binomial(n=400, p=0.3): mean 120, sd 9.2; +-5 sd gives a false failure rate below 1e-6.
    assert 74 <= counts["v2"] <= 166, counts
