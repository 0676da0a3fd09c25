"""GAMMA consumer routes through a real node Envoy: a route in namespace `fast-clients` that
attaches to `faces/smiley` applies to requests from that namespace's pods on this node, and
only to them; for those clients it replaces the producer's routes of that Service.

The node Envoy knows a pod by its source address: the "pods" here are loopback addresses
(127.0.0.2, 127.0.0.3) that the client binds to before it connects, named by Pod objects on the
test's node."""

from __future__ import annotations

from typing import Any

import pytest

from nodemesh.controlplane.store import ObjectKey
from nodemesh.xds import types
from tests.e2e.conftest import Backends
from tests.e2e.mesh import NODE, Mesh, endpoint_slice, service
from tests.e2e.objects import pod

pytestmark = pytest.mark.asyncio(loop_scope="module")

CLIENT = "127.0.0.2"  # a pod of fast-clients
OTHER = "127.0.0.3"  # a pod of another namespace


def route(name: str, ns: str, rules: list[dict[str, Any]]) -> dict[str, Any]:
    return {
        "apiVersion": "gateway.networking.k8s.io/v1",
        "kind": "HTTPRoute",
        "metadata": {"name": name, "namespace": ns},
        "spec": {
            "parentRefs": [
                {"group": "", "kind": "Service", "name": "smiley", "namespace": "faces"}
            ],
            "rules": rules,
        },
    }


def to(name: str) -> dict[str, Any]:
    return {"name": name, "namespace": "faces", "port": 80}


async def test_consumer_route_applies_to_its_namespace_clients_only(
    mesh: Mesh, backends: Backends
) -> None:
    smiley, smiley2 = await backends.get("smiley"), await backends.get("smiley2")
    face = await backends.get("face")
    mesh.apply(
        service("smiley", ns="faces"), service("smiley2", ns="faces"), service("face", ns="faces"),
        endpoint_slice("smiley", smiley.port, ns="faces"),
        endpoint_slice("smiley2", smiley2.port, ns="faces"),
        endpoint_slice("face", face.port, ns="faces"),
        # no ReferenceGrant: a consumer route reaches the producer's Services (GEP-1294)
        pod("client", "fast-clients", CLIENT), pod("other", "shop", OTHER),
        # the producer's route: /api only; anything else is answered 404
        {**route("smiley", "faces", [
            {"matches": [{"path": {"type": "PathPrefix", "value": "/api"}}],
             "backendRefs": [to("smiley")]},
        ])},
        # the consumer's: every request of fast-clients to smiley goes to smiley2
        route("smiley-fast", "fast-clients", [{"backendRefs": [to("smiley2")]}]),
    )  # fmt: skip
    await mesh.converge()

    async def body(source: str, host: str, path: str = "/") -> tuple[int, str]:
        reply = await mesh.get(host, path, source=source)
        return reply.status, reply.body

    # fast-clients' pod: its own route, for every name of the Service
    for host in ("smiley.faces", "smiley.faces.svc.cluster.local:80"):
        assert await body(CLIENT, host, "/") == (200, "smiley2"), host
        assert await body(CLIENT, host, "/api") == (200, "smiley2"), host
    # everyone else: the producer's route
    for source in (OTHER, "127.0.0.1"):
        assert await body(source, "smiley.faces", "/api") == (200, "smiley"), source
        assert (await body(source, "smiley.faces", "/"))[0] == 404, source
    # a Service without consumer routes of fast-clients is routed as for anyone
    assert await body(CLIENT, "face.faces") == (200, "face")
    conditions = mesh.pipeline.conditions()[ObjectKey("HTTPRoute", "fast-clients", "smiley-fast")]
    accepted = next(c for c in conditions if c.type == "Accepted")
    assert (accepted.status, accepted.parent) == ("True", "Service/faces/smiley")


async def test_consumer_routes_replace_the_producers_and_404_the_rest(
    mesh: Mesh, backends: Backends
) -> None:
    mesh.apply(route("smiley-fast", "fast-clients", [
        {"matches": [{"path": {"type": "PathPrefix", "value": "/fast"}}],
         "backendRefs": [to("smiley2")]},
    ]))  # fmt: skip
    await mesh.converge()
    assert (await mesh.get("smiley.faces", "/fast", source=CLIENT)).body == "smiley2"
    # /api is the producer's; for fast-clients the consumer's routes replace them: no match
    assert (await mesh.get("smiley.faces", "/api", source=CLIENT)).status == 404
    assert (await mesh.get("smiley.faces", "/api", source=OTHER)).body == "smiley"


async def test_a_pod_that_leaves_and_a_deleted_route_stop_the_consumer_routing(
    mesh: Mesh, backends: Backends
) -> None:
    mesh.apply(pod("client-2", "fast-clients", "127.0.0.4"))
    await mesh.converge()
    assert (await mesh.get("smiley.faces", "/fast", source="127.0.0.4")).body == "smiley2"

    mesh.store.delete(ObjectKey("Pod", "fast-clients", "client"))
    await mesh.converge()
    # 127.0.0.2 is no pod of fast-clients any more: the producer's routes
    assert (await mesh.get("smiley.faces", "/api", source=CLIENT)).body == "smiley"
    assert (await mesh.get("smiley.faces", "/fast", source=CLIENT)).status == 404
    assert (await mesh.get("smiley.faces", "/fast", source="127.0.0.4")).body == "smiley2"

    mesh.store.delete(ObjectKey("HTTPRoute", "fast-clients", "smiley-fast"))
    await mesh.converge()
    assert (await mesh.get("smiley.faces", "/api", source="127.0.0.4")).body == "smiley"
    assert mesh.cache.get_snapshot(NODE) is mesh.pipeline.snapshot  # no listener of its own


def node_listener_nacked(mesh: Mesh) -> str:
    node = mesh.server.status.node(NODE)
    ts = node.types.get(types.LISTENER) if node is not None else None
    return ts.last_nack.message if ts is not None and ts.last_nack is not None else ""


async def test_a_host_network_endpoint_does_not_make_the_node_a_client(
    mesh: Mesh, backends: Backends
) -> None:
    """A hostNetwork pod of fast-clients behind a Service: its EndpointSlice endpoint is the
    node's own address (here 127.0.0.1). Clients are Pods only, so everything else on the node
    that talks from that address keeps the producer's routes."""
    mesh.apply(
        route("smiley-fast", "fast-clients", [
            {"matches": [{"path": {"type": "PathPrefix", "value": "/fast"}}],
             "backendRefs": [to("smiley2")]},
        ]),
        {**pod("exporter", "fast-clients", "127.0.0.1"),
         "spec": {"nodeName": NODE, "hostNetwork": True, "containers": [{"name": "e"}]}},
        service("exporter", ns="fast-clients"),
        endpoint_slice("exporter", 9100, ns="fast-clients", address="127.0.0.1"),
    )  # fmt: skip
    await mesh.converge()
    assert (await mesh.get("smiley.faces", "/fast", source="127.0.0.4")).body == "smiley2"
    assert (await mesh.get("smiley.faces", "/api", source="127.0.0.1")).body == "smiley"


async def test_an_address_two_consumer_namespaces_claim_is_neither_s_and_envoy_accepts(
    mesh: Mesh, backends: Backends
) -> None:
    """A pod IP reused while the old Pod object lingers: 127.0.0.4 is claimed by pods of two
    namespaces that both have consumer routes. Two chains for one source would make Envoy
    refuse the node's Listener (and every later one); the address is nobody's client."""
    mesh.apply(
        route("smiley-b", "b-clients", [{"backendRefs": [to("face")]}]),
        pod("b-pod", "b-clients", "127.0.0.5"),
        pod("stale", "b-clients", "127.0.0.4"),  # 127.0.0.4 is fast-clients' client-2 too
    )  # fmt: skip
    await mesh.converge()
    assert node_listener_nacked(mesh) == ""
    assert (await mesh.get("smiley.faces", "/", source="127.0.0.5")).body == "face"
    assert (await mesh.get("smiley.faces", "/api", source="127.0.0.4")).body == "smiley"
    mesh.store.delete(ObjectKey("Pod", "b-clients", "stale"))
    await mesh.converge()
    assert (await mesh.get("smiley.faces", "/fast", source="127.0.0.4")).body == "smiley2"


async def test_a_pod_coming_does_not_drain_its_namespace_s_connections(
    mesh: Mesh, backends: Backends
) -> None:
    """Each client pod has chains of its own: a pod that comes adds its chains, and Envoy
    drains no chain (one listing the namespace's pods would change, and be drained, with every
    pod that comes or goes)."""
    assert mesh.envoy is not None
    before = mesh.envoy.stats("listener_manager")
    mesh.apply(pod("client-3", "fast-clients", "127.0.0.6"))
    await mesh.converge()
    assert (await mesh.get("smiley.faces", "/fast", source="127.0.0.6")).body == "smiley2"
    after = mesh.envoy.stats("listener_manager")
    assert after["listener_manager.listener_in_place_updated"] > before.get(
        "listener_manager.listener_in_place_updated", 0
    )
    # a gauge: chains drained by earlier tests (deleted pods and routes) may still be draining
    draining = "listener_manager.total_filter_chains_draining"
    assert after.get(draining, 0) == before.get(draining, 0), (before, after)


async def test_status_shows_the_node_s_own_listener_version(mesh: Mesh, backends: Backends) -> None:
    """/status lists the shared snapshot's versions, and for a node with a Listener of its own
    that Listener's version: the one the node ACKs."""
    await mesh.converge()
    status = mesh.pipeline.status_json()
    own = status["node_snapshots"][NODE]
    assert set(own) == {"lds"} and own["lds"] != status["snapshot"]["lds"]
    assert status["nodes"][NODE]["types"]["lds"]["version_acked"] == own["lds"]
