"""GAMMA consumer routes, build and translate: which nodes get a listener of their own, with
which clients, and that the incremental build and the memoizing Translator agree with a build
and translation from scratch whatever the order of changes (the real Envoy side is in
tests/e2e/test_consumer_routes.py)."""

from __future__ import annotations

from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from nodemesh.controlplane.builder import BuildMemo, build
from nodemesh.controlplane.builder.node import pod_placement
from nodemesh.controlplane.pipeline import Pipeline
from nodemesh.controlplane.store import Store, key_of
from nodemesh.xds import translate as translate_module
from nodemesh.xds import types
from nodemesh.xds.cache import SnapshotCache
from nodemesh.xds.translate import Translator, node_listeners
from nodemesh.xds.translate.route import CONSUMER_STATE

NODES = ("n1", "n2")


def service(name: str, cluster_ip: str) -> dict[str, Any]:
    return {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": {"name": name, "namespace": "faces"},
        "spec": {"clusterIP": cluster_ip, "ports": [{"name": "http", "port": 80}]},
    }


@st.composite
def consumer_route(draw: st.DrawFn) -> dict[str, Any]:
    ns = draw(st.sampled_from(["a", "b", "faces"]))  # "faces": a producer route
    parent: dict[str, Any] = {"kind": "Service", "name": draw(st.sampled_from(["s0", "s1"]))}
    parent["namespace"] = "faces"
    if draw(st.booleans()):
        parent["port"] = draw(st.sampled_from([80, 81]))  # 81: no such port, not accepted
    path = draw(st.sampled_from(["/", "/x"]))
    return {
        "apiVersion": "gateway.networking.k8s.io/v1",
        "kind": "HTTPRoute",
        "metadata": {"name": f"r{draw(st.integers(0, 1))}", "namespace": ns},
        "spec": {
            "parentRefs": [parent],
            "rules": [
                {
                    "matches": [{"path": {"type": "PathPrefix", "value": path}}],
                    "backendRefs": [{"name": "s1", "namespace": "faces", "port": 80}],
                }
            ],
        },
    }


@st.composite
def pod(draw: st.DrawFn) -> dict[str, Any]:
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {
            "name": f"p{draw(st.integers(0, 3))}",
            "namespace": draw(st.sampled_from(["a", "b", "c"])),  # c: never a consumer
        },
        "spec": {"nodeName": draw(st.sampled_from(NODES))},
        "status": {
            "podIP": f"10.244.0.{draw(st.integers(1, 3))}",
            "phase": draw(st.sampled_from(["Running", "Running", "Succeeded"])),
        },
    }


@st.composite
def endpoint_slice(draw: st.DrawFn) -> dict[str, Any]:
    return {
        "apiVersion": "discovery.k8s.io/v1",
        "kind": "EndpointSlice",
        "metadata": {
            "name": "e",
            "namespace": draw(st.sampled_from(["a", "b"])),
            "labels": {"kubernetes.io/service-name": "local"},
        },
        "addressType": "IPv4",
        "ports": [{"name": "http", "port": 8080}],
        "endpoints": [
            {"addresses": [f"10.244.1.{i}"], "nodeName": draw(st.sampled_from(NODES))}
            for i in range(draw(st.integers(0, 2)))
        ],
    }


GRANT = {
    "apiVersion": "gateway.networking.k8s.io/v1beta1",
    "kind": "ReferenceGrant",
    "metadata": {"name": "g", "namespace": "faces"},
    "spec": {
        "from": [
            {"group": "gateway.networking.k8s.io", "kind": "HTTPRoute", "namespace": ns}
            for ns in ("a", "b")
        ],
        "to": [{"group": "", "kind": "Service"}],
    },
}
# namespace a's one client, on node n1
A_CLIENT = {
    "apiVersion": "v1",
    "kind": "Pod",
    "metadata": {"name": "c", "namespace": "a"},
    "spec": {"nodeName": "n1"},
    "status": {"podIP": "10.244.0.7", "phase": "Running"},
}
objects = st.one_of(
    consumer_route(),
    pod(),
    endpoint_slice(),
    st.builds(service, st.sampled_from(["s0", "s1"]), st.sampled_from(["10.96.0.1", "None"])),
)
operations = st.tuples(st.sampled_from(["apply", "apply", "delete"]), objects)


def expected_sources(store: Store, namespaces: set[str]) -> dict[tuple[str, str], tuple[str, ...]]:
    """(node, namespace) -> pod IPs, read directly from the Pods (EndpointSlices never count:
    a hostNetwork pod's endpoint is the node's address); an IP that Pods of two namespaces
    (any two) claim on one node belongs to neither."""
    claims: dict[tuple[str, str], set[str]] = {}  # (node, IP) -> namespaces
    for key, obj in store.view().items():
        if key.kind == "Pod":
            for node, ip in pod_placement(obj):
                claims.setdefault((node, ip), set()).add(key.namespace)
    out: dict[tuple[str, str], set[str]] = {}
    for (node, ip), owners in claims.items():
        if len(owners) == 1 and (ns := owners.pop()) in namespaces:
            out.setdefault((node, ns), set()).add(ip)
    return {k: tuple(sorted(v)) for k, v in out.items()}


def chain_matches(listener: Any) -> list[tuple[Any, ...]]:
    """Each filter chain's match, as Envoy compares them (two equal ones: Envoy refuses)."""
    return [
        (
            m.destination_port.value,
            tuple(r.address_prefix for r in m.prefix_ranges),
            tuple(r.address_prefix for r in m.source_prefix_ranges),
        )
        for m in (c.filter_chain_match for c in listener.filter_chains)
    ]


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(st.lists(operations, min_size=1, max_size=4), min_size=1, max_size=8))
def test_consumer_listeners_follow_routes_and_pods(
    batches: list[list[tuple[str, dict[str, Any]]]],
) -> None:
    store, memo, translator = Store(), BuildMemo(), Translator()
    store.apply(GRANT)
    store.apply(service("s1", "10.96.0.2"))
    for batch in batches:
        for op, obj in batch:
            if op == "apply":
                store.apply(obj)
            else:
                store.delete(key_of(obj))
        view = store.view()
        warm, cold = build(view, memo=memo), build(view)
        assert warm.mesh == cold.mesh
        mesh = cold.mesh
        # consumer namespaces: those with a route accepted by a Service in another namespace
        consumers = {
            key.namespace
            for key, conds in cold.conditions.items()
            if key.namespace != "faces"
            and any(c.type == "Accepted" and c.status == "True" for c in conds)
        }
        assert {(c.node, c.namespace): c.addresses for c in mesh.consumers} == expected_sources(
            store, consumers
        )
        # every consumer route's rules match on its namespace only
        for vh in mesh.virtual_hosts:
            for r in vh.routes:
                origin_ns = r.origins[0].split("/")[1]
                if r.origins[0].startswith("HTTPRoute/") and origin_ns != "faces":
                    assert r.match.consumer == origin_ns
        got, want = translator.translate(warm.mesh), Translator().translate(mesh)
        plain = node_listeners(mesh)
        assert set(plain) == {c.node for c in mesh.consumers}
        for listener in plain.values():
            matches = chain_matches(listener)
            assert len(set(matches)) == len(matches), matches
        for node in (None, *NODES):
            a, b = got.snapshot(node), want.snapshot(node)
            for t in b.type_urls:
                assert a.version(t) == b.version(t)
                assert dict(a.resources(t)) == dict(b.resources(t))
            listener = a.resources(types.LISTENER)["outbound"]
            if node in plain:
                assert listener.payload == plain[node].SerializeToString(deterministic=True)
            else:
                assert listener is got.shared[types.LISTENER][0]


def test_a_redirected_connection_from_a_consumer_pod_gets_its_own_chain() -> None:
    """The chains a node gets: one for connections to the listener, one per L7 destination
    its namespace has routes for (here only s0), each marking the connection; other nodes and
    other destinations keep the shared chains."""
    store = Store()
    for obj in (
        GRANT,
        service("s0", "10.96.0.1"),
        service("s1", "10.96.0.2"),
        {
            "apiVersion": "gateway.networking.k8s.io/v1",
            "kind": "HTTPRoute",
            "metadata": {"name": "r", "namespace": "a"},
            "spec": {
                "parentRefs": [{"kind": "Service", "name": "s0", "namespace": "faces"}],
                "rules": [{"backendRefs": [{"name": "s1", "namespace": "faces", "port": 80}]}],
            },
        },
        {
            "apiVersion": "gateway.networking.k8s.io/v1",
            "kind": "HTTPRoute",
            "metadata": {"name": "p", "namespace": "faces"},
            "spec": {
                "parentRefs": [{"kind": "Service", "name": "s1"}],
                "rules": [{"backendRefs": [{"name": "s1", "port": 80}]}],
            },
        },
        A_CLIENT,
    ):
        store.apply(obj)
    mesh = build(store.view()).mesh
    listeners = node_listeners(mesh)
    assert set(listeners) == {"n1"}
    chains = {c.name: c for c in listeners["n1"].filter_chains}
    assert list(chains) == [
        "by-host/direct",
        "10.96.0.1:80",
        "10.96.0.2:80",
        "consumer/a/10.244.0.7",
        "10.96.0.1:80/consumer/a/10.244.0.7",
    ]
    for name in ("consumer/a/10.244.0.7", "10.96.0.1:80/consumer/a/10.244.0.7"):
        match = chains[name].filter_chain_match
        assert [r.address_prefix for r in match.source_prefix_ranges] == ["10.244.0.7"]
        assert chains[name].filters[0].name == "envoy.filters.network.set_filter_state"
    assert chains["consumer/a/10.244.0.7"].filter_chain_match.destination_port.value == 15001
    # the route configuration of s0's destination holds a's routes, marked
    t = Translator().translate(mesh)
    (rc,) = [r for r in t.shared[types.ROUTE] if r.name == "outbound/faces/s0:80"]
    routes = rc.message.virtual_hosts[0].routes
    assert [r.match.filter_state[0].key for r in routes[:2]] == [CONSUMER_STATE] * 2
    assert [r.match.filter_state[0].string_match.exact for r in routes[:2]] == ["a", "a"]
    assert routes[1].direct_response.status == 404 and not routes[2].match.filter_state


def test_a_node_listener_follows_the_listener_port_and_route_configuration() -> None:
    """The memoized chains are made again when what they name changes (the listener's port
    goes into the chain for connections to the listener itself)."""
    store = Store()
    for obj in (
        GRANT,
        service("s0", "10.96.0.1"),
        _route_a_to_s0(),
        A_CLIENT,
    ):
        store.apply(obj)
    translator = Translator()
    for port in (15001, 15002, 15001):
        mesh = build(store.view(), outbound_port=port).mesh
        (own,) = translator.translate(mesh).per_node["n1"][types.LISTENER]
        want = node_listeners(mesh)["n1"]
        assert own.payload == want.SerializeToString(deterministic=True), port
        chain = next(c for c in want.filter_chains if c.name == "consumer/a/10.244.0.7")
        assert chain.filter_chain_match.destination_port.value == port


def _route_a_to_s0() -> dict[str, Any]:
    return {
        "apiVersion": "gateway.networking.k8s.io/v1",
        "kind": "HTTPRoute",
        "metadata": {"name": "r", "namespace": "a"},
        "spec": {
            "parentRefs": [{"kind": "Service", "name": "s0", "namespace": "faces"}],
            "rules": [{"backendRefs": [{"name": "s0", "namespace": "faces", "port": 80}]}],
        },
    }


async def test_a_node_listener_naming_a_missing_route_configuration_keeps_the_last_good_config(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The pipeline checks every node's own Listener, not only the shared snapshot: one whose
    consumer chain names a route configuration no snapshot has (a translator bug, simulated
    here) would leave that node's Listener warming for good. The build is refused, and the
    node keeps the config it had."""
    store = Store()
    for obj in (GRANT, service("s0", "10.96.0.1"), A_CLIENT):
        store.apply(obj)
    pipeline = Pipeline(store, SnapshotCache())
    await pipeline.rebuild()
    assert pipeline.last_error == ""
    before = pipeline.cache.get_snapshot("n1")

    real = translate_module.consumer_destinations

    def misnamed(*args: Any) -> dict[str, list[Any]]:
        return {
            ns: [(*d[:2], "outbound/nowhere", *d[3:]) for d in ds] for ns, ds in real(*args).items()
        }

    monkeypatch.setattr(translate_module, "consumer_destinations", misnamed)
    store.apply(_route_a_to_s0())
    await pipeline.rebuild()
    assert pipeline.last_error.endswith(
        "inconsistent snapshot: node n1: a listener needs route configuration 'outbound/nowhere'"
    ), pipeline.last_error
    assert pipeline.cache.get_snapshot("n1") is before
