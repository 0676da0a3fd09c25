"""Property: after any sequence of store changes, an incremental build (warm memo) equals a
build from scratch, IR and conditions. The object universe is small on purpose, so that random
changes often hit cross-references: routes whose parent or backend Service comes and goes,
ports that disappear, policies that target, overlap and override each other, ReferenceGrants
that allow a cross-namespace backend, slices that move between Services."""

from __future__ import annotations

from typing import Any

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from nodemesh.controlplane.builder import BuildMemo, BuildResult, build
from nodemesh.controlplane.store import ObjectKey, Store, key_of
from nodemesh.xds import types
from nodemesh.xds.translate import Translator, node_listeners

NAMESPACES = ("a", "b")
SERVICES = ("s0", "s1", "s2")
PORTS = ((80, "http"), (81, "grpc"), (9090, "admin"))

ns_ = st.sampled_from(NAMESPACES)
svc_ = st.sampled_from(SERVICES)
port_ = st.sampled_from([p for p, _ in PORTS] + [7])


@st.composite
def service(draw: st.DrawFn) -> dict[str, Any]:
    ports = draw(st.lists(st.sampled_from(PORTS), unique=True, max_size=3))
    spec: dict[str, Any] = {
        "clusterIP": draw(st.sampled_from(["10.96.0.1", "10.96.0.2", "None"])),
        "ports": [
            {"name": n, "port": p, **({"appProtocol": "grpc"} if n == "grpc" else {})}
            for p, n in ports
        ],
    }
    # settings whose effect (and notice) depends on routes and policies
    if draw(st.booleans()):
        spec["sessionAffinity"] = "ClientIP"
    if draw(st.booleans()):
        spec["internalTrafficPolicy"] = "Local"
    if draw(st.integers(0, 9)) == 0:
        spec = {"type": "ExternalName", "externalName": "example.com"}
    return {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": {"name": draw(svc_), "namespace": draw(ns_)},
        "spec": spec,
    }


@st.composite
def endpoint_slice(draw: st.DrawFn) -> dict[str, Any]:
    endpoints = []
    for _ in range(draw(st.integers(0, 3))):
        ready = draw(st.booleans())
        endpoint: dict[str, Any] = {
            "addresses": [f"10.0.0.{draw(st.integers(1, 4))}"],
            "conditions": {"ready": ready, "serving": True, "terminating": not ready},
            "nodeName": draw(st.sampled_from(["n1", "n2"])),
        }
        if draw(st.booleans()):  # topology hints, as the EndpointSlice controller writes them
            endpoint["hints"] = {
                "forZones": [{"name": draw(st.sampled_from(["z1", "z2"]))}],
                **({"forNodes": [{"name": "n1"}]} if draw(st.booleans()) else {}),
            }
        endpoints.append(endpoint)
    names = draw(st.lists(st.sampled_from([n for _, n in PORTS]), unique=True, max_size=2))
    return {
        "apiVersion": "discovery.k8s.io/v1",
        "kind": "EndpointSlice",
        "metadata": {
            "name": f"sl{draw(st.integers(0, 3))}",
            "namespace": draw(ns_),
            "labels": {"kubernetes.io/service-name": draw(svc_)},
        },
        "addressType": "IPv4",
        "ports": [{"name": n, "port": 8000 + i} for i, n in enumerate(names)],
        "endpoints": endpoints,
    }


@st.composite
def backend_ref(draw: st.DrawFn) -> dict[str, Any]:
    ref: dict[str, Any] = {"name": draw(svc_), "port": draw(port_)}
    if draw(st.booleans()):
        ref["namespace"] = draw(ns_)
    if draw(st.booleans()):
        ref["weight"] = draw(st.integers(0, 3))
    if draw(st.integers(0, 3)) == 0:  # its own header changes (a weighted cluster of its own)
        value = draw(st.sampled_from(["a", "b"]))
        ref["filters"] = [
            {"type": "RequestHeaderModifier",
             "requestHeaderModifier": {"set": [{"name": "x-to", "value": value}]}}
        ]  # fmt: skip
    return ref


@st.composite
def route(draw: st.DrawFn) -> dict[str, Any]:
    kind = draw(st.sampled_from(["HTTPRoute", "GRPCRoute"]))
    parents = []
    for _ in range(draw(st.integers(1, 2))):
        parent: dict[str, Any] = {"kind": "Service", "name": draw(svc_)}
        if draw(st.booleans()):
            parent["port"] = draw(port_)
        if draw(st.integers(0, 4)) == 0:
            parent["namespace"] = draw(ns_)
        parents.append(parent)
    rules = []
    for _ in range(draw(st.integers(1, 2))):
        rule: dict[str, Any] = {"backendRefs": draw(st.lists(backend_ref(), max_size=2))}
        if kind == "HTTPRoute" and draw(st.booleans()):
            rule["matches"] = [{"path": {"type": "PathPrefix", "value": "/x"}}]
        if kind == "HTTPRoute" and draw(st.booleans()):
            rule["retry"] = {"attempts": draw(st.integers(0, 3))}
        if draw(st.integers(0, 3)) == 0:
            rule["filters"] = [
                {"type": "RequestMirror", "requestMirror": {"backendRef": draw(backend_ref())}}
            ]
        rules.append(rule)
    return {
        "apiVersion": "gateway.networking.k8s.io/v1",
        "kind": kind,
        "metadata": {
            "name": f"r{draw(st.integers(0, 2))}",
            "namespace": draw(ns_),
            "creationTimestamp": f"2026-01-0{draw(st.integers(1, 3))}T00:00:00Z",
        },
        "spec": {"parentRefs": parents, "rules": rules},
    }


@st.composite
def policy(draw: st.DrawFn) -> dict[str, Any]:
    targets = []
    for _ in range(draw(st.integers(1, 2))):
        t: dict[str, Any] = {"group": "", "kind": "Service", "name": draw(svc_)}
        if draw(st.booleans()):
            t["sectionName"] = draw(st.sampled_from([n for _, n in PORTS] + ["nope"]))
        targets.append(t)
    spec: dict[str, Any] = {"targetRefs": targets}
    if draw(st.booleans()):
        spec["outlierDetection"] = {"consecutive5xx": draw(st.integers(1, 5))}
    if draw(st.booleans()):
        spec["loadBalancer"] = draw(
            st.sampled_from(
                [
                    {"type": "RingHash", "hashOn": {"header": "x-user"}},
                    {"type": "LeastRequest"},
                ]
            )
        )
    if draw(st.booleans()):
        spec["retry"] = {"attempts": draw(st.integers(1, 3)), "retryOn": ["5xx"]}
    if draw(st.booleans()):
        spec["timeouts"] = {"request": draw(st.sampled_from(["1s", "2s", "bad"]))}
    return {
        "apiVersion": "nodemesh.io/v1alpha1",
        "kind": "TrafficPolicy",
        "metadata": {
            "name": f"p{draw(st.integers(0, 2))}",
            "namespace": draw(ns_),
            "creationTimestamp": f"2026-01-0{draw(st.integers(1, 3))}T00:00:00Z",
        },
        "spec": spec,
    }


@st.composite
def grant(draw: st.DrawFn) -> dict[str, Any]:
    to: dict[str, Any] = {"group": "", "kind": "Service"}
    if draw(st.booleans()):
        to["name"] = draw(svc_)
    return {
        "apiVersion": "gateway.networking.k8s.io/v1beta1",
        "kind": "ReferenceGrant",
        "metadata": {"name": f"g{draw(st.integers(0, 1))}", "namespace": draw(ns_)},
        "spec": {
            "from": [
                {
                    "group": "gateway.networking.k8s.io",
                    "kind": draw(st.sampled_from(["HTTPRoute", "GRPCRoute"])),
                    "namespace": draw(ns_),
                }
            ],
            "to": [to],
        },
    }


@st.composite
def node_or_pod(draw: st.DrawFn) -> dict[str, Any]:
    if draw(st.booleans()):
        return {
            "apiVersion": "v1",
            "kind": "Node",
            "metadata": {
                "name": draw(st.sampled_from(["n1", "n2"])),
                # its zone (the node agents follow the hints for it) may change
                **(
                    {"labels": {"topology.kubernetes.io/zone": draw(st.sampled_from(["z1", "z2"]))}}
                    if draw(st.booleans())
                    else {}
                ),
            },
            "status": {"addresses": [{"type": "InternalIP", "address": "192.168.0.1"}]},
        }
    metadata: dict[str, Any] = {"name": f"pod{draw(st.integers(0, 2))}", "namespace": draw(ns_)}
    choice = draw(st.sampled_from([None, "on", "off", "On ", "maybe"]))
    if choice is not None:  # the node agent's socket short cut (two Pods may claim one IP)
        metadata["annotations"] = {"nodemesh.io/socket-redirect": choice}
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": metadata,
        "spec": {"nodeName": draw(st.sampled_from(["n1", "n2"]))},
        "status": {"podIP": f"10.0.0.{draw(st.integers(1, 4))}", "phase": "Running"},
    }


objects = st.one_of(service(), endpoint_slice(), route(), policy(), grant(), node_or_pod())
# An operation: apply an object, or delete the object with that key.
operations = st.tuples(st.sampled_from(["apply", "apply", "delete"]), objects)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(st.lists(operations, min_size=1, max_size=4), min_size=1, max_size=10))
def test_incremental_build_equals_a_build_from_scratch(
    batches: list[list[tuple[str, dict[str, Any]]]],
) -> None:
    store, memo, translator = Store(), BuildMemo(), Translator()
    translator.translate(build(store.view(), memo=memo).mesh).snapshot()
    for batch in batches:
        for op, obj in batch:
            if op == "apply":
                store.apply(obj)
            else:
                store.delete(key_of(obj))
        view = store.view()
        warm = build(view, memo=memo)
        cold = build(view)
        assert warm.mesh == cold.mesh
        assert dict(warm.conditions) == dict(cold.conditions)
        # Envoy refuses a RouteConfiguration with a domain twice (two Services of one
        # ClusterIP and port, which files mode may hold)
        domains = [d for v in warm.mesh.virtual_hosts for d in v.domains]
        assert len(domains) == len(set(domains))
        # The memoizing Translator and the snapshot derived from the previous one agree with a
        # fresh translation, version for version.
        got, want = translator.translate(warm.mesh), Translator().translate(cold.mesh)
        assert got.origins == want.origins
        assert got.per_node.keys() == want.per_node.keys()
        for node in (None, *want.per_node):
            a, b = got.snapshot(node), want.snapshot(node)
            assert a.type_urls == b.type_urls
            for t in b.type_urls:
                assert a.version(t) == b.version(t)
                assert dict(a.resources(t)) == dict(b.resources(t))
        # A node's own listener (consumer chains spliced into the shared bytes) is what
        # protobuf makes of the plain translation.
        plain = node_listeners(cold.mesh)
        assert plain.keys() == {n for n, own in want.per_node.items() if types.LISTENER in own}
        for node, listener in plain.items():
            (resource,) = got.per_node[node][types.LISTENER]
            assert resource.payload == listener.SerializeToString(deterministic=True)


@settings(max_examples=100, deadline=None)
@given(st.lists(st.lists(operations, min_size=1, max_size=4), min_size=1, max_size=6))
def test_incremental_build_of_plain_mappings_equals_a_build_from_scratch(
    batches: list[list[tuple[str, dict[str, Any]]]],
) -> None:
    """Inputs that are not store views (no change log) are diffed by identity per kind."""
    store, memo = Store(), BuildMemo()
    for batch in batches:
        for op, obj in batch:
            if op == "apply":
                store.apply(obj)
            else:
                store.delete(key_of(obj))
        objs: dict[ObjectKey, Any] = dict(store.view())
        assert build(objs, memo=memo) == build(objs)


def _svc(name: str, ns: str = "a") -> dict[str, Any]:
    return {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": {"name": name, "namespace": ns},
        "spec": {"clusterIP": "10.96.0.9", "ports": [{"name": "http", "port": 80}]},
    }


def _route(parent: str, backend: str, backend_ns: str | None = None) -> dict[str, Any]:
    ref: dict[str, Any] = {"name": backend, "port": 80}
    if backend_ns:
        ref["namespace"] = backend_ns
    return {
        "apiVersion": "gateway.networking.k8s.io/v1",
        "kind": "HTTPRoute",
        "metadata": {"name": "r", "namespace": "a"},
        "spec": {
            "parentRefs": [{"kind": "Service", "name": parent}],
            "rules": [{"backendRefs": [ref]}],
        },
    }


def _steps_agree(steps: list[tuple[str, dict[str, Any]]]) -> list[BuildResult]:
    """Apply the steps; after each, the incremental build equals a build from scratch.
    Returns the build after each step."""
    store, memo = Store(), BuildMemo()
    results = []
    for op, obj in steps:
        if op == "apply":
            store.apply(obj)
        else:
            store.delete(key_of(obj))
        result = build(store.view(), memo=memo)
        assert result == build(store.view()), (op, obj)
        results.append(result)
    return results


def _route_hash_headers(result: BuildResult) -> set[str]:
    """Hash headers on the routes of the `a/s0` virtual hosts."""
    return {
        route.hash_header
        for vh in result.mesh.virtual_hosts
        if vh.name.startswith("a/s0:")
        for route in vh.routes
    }


def _resolved_refs(result: BuildResult) -> str:
    (status,) = {
        c.status
        for c in result.conditions[ObjectKey("HTTPRoute", "a", "r")]
        if c.type == "ResolvedRefs"
    }
    return status


def test_a_hash_policy_on_a_backend_reaches_the_routes_of_other_services() -> None:
    ring = {
        "apiVersion": "nodemesh.io/v1alpha1",
        "kind": "TrafficPolicy",
        "metadata": {"name": "p", "namespace": "a"},
        "spec": {
            "targetRefs": [{"group": "", "kind": "Service", "name": "s1"}],
            "loadBalancer": {"type": "RingHash", "hashOn": {"header": "x-user"}},
        },
    }
    *_, routed, hashed, unhashed = _steps_agree(
        [
            ("apply", _svc("s0")),
            ("apply", _svc("s1")),
            ("apply", _route("s0", "s1")),
            ("apply", ring),
            ("delete", ring),
        ]
    )
    assert _route_hash_headers(routed) == {""}
    assert _route_hash_headers(hashed) == {"x-user"}  # s1's policy hashes s0's route to s1
    assert _route_hash_headers(unhashed) == {""}


def test_a_cross_namespace_backend_resolves_with_or_without_a_reference_grant() -> None:
    """GEP-1294: mesh routes need no ReferenceGrant; one that comes and goes changes nothing."""
    grant_obj = {
        "apiVersion": "gateway.networking.k8s.io/v1beta1",
        "kind": "ReferenceGrant",
        "metadata": {"name": "g", "namespace": "b"},
        "spec": {
            "from": [{"group": "gateway.networking.k8s.io", "kind": "HTTPRoute", "namespace": "a"}],
            "to": [{"group": "", "kind": "Service"}],
        },
    }
    *_, routed, granted, revoked = _steps_agree(
        [
            ("apply", _svc("s0")),
            ("apply", _svc("s1", ns="b")),
            ("apply", _route("s0", "s1", backend_ns="b")),
            ("apply", grant_obj),
            ("delete", grant_obj),
        ]
    )
    assert [_resolved_refs(r) for r in (routed, granted, revoked)] == ["True", "True", "True"]
