"""GAMMA consumer routes through a real node Envoy: a route in namespace `fast-clients` that
attaches to `faces/smiley` applies to requests from that namespace's pods on this node, and
only to them; for those clients it replaces the producer's routes of that Service.

The node Envoy knows a pod by its source address: the "pods" here are loopback addresses
(127.0.0.2, 127.0.0.3) that the client binds to before it connects, named by Pod objects on the
test's node."""

from __future__ import annotations

import time
from typing import Any

import aiohttp
import pytest

from nodemesh.controlplane.store import ObjectKey
from tests.e2e.conftest import Backends
from tests.e2e.mesh import NODE, Mesh, Reply, endpoint_slice, service

pytestmark = pytest.mark.asyncio(loop_scope="module")

CLIENT = "127.0.0.2"  # a pod of fast-clients
OTHER = "127.0.0.3"  # a pod of another namespace


def pod(name: str, ns: str, ip: str, node: str = NODE) -> dict[str, Any]:
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": name, "namespace": ns},
        "spec": {"nodeName": node, "containers": [{"name": "c", "image": "client"}]},
        "status": {"phase": "Running", "podIP": ip},
    }


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


GRANT = {
    "apiVersion": "gateway.networking.k8s.io/v1beta1",
    "kind": "ReferenceGrant",
    "metadata": {"name": "fast-clients", "namespace": "faces"},
    "spec": {
        "from": [
            {"group": "gateway.networking.k8s.io", "kind": "HTTPRoute", "namespace": "fast-clients"}
        ],
        "to": [{"group": "", "kind": "Service"}],
    },
}


async def get_from(mesh: Mesh, source: str, host: str, path: str = "/") -> Reply:
    """GET through the node Envoy from `source` (a local address the client binds to)."""
    connector = aiohttp.TCPConnector(force_close=True, local_addr=(source, 0))
    async with aiohttp.ClientSession(connector=connector) as session:
        started = time.monotonic()
        async with session.get(
            f"http://127.0.0.1:{mesh.outbound_port}{path}",
            headers={"Host": host},
            timeout=aiohttp.ClientTimeout(total=10),
        ) as resp:
            body = (await resp.text()).strip()
            return Reply(resp.status, body, dict(resp.headers), time.monotonic() - started)


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
        pod("client", "fast-clients", CLIENT), pod("other", "shop", OTHER), GRANT,
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
        reply = await get_from(mesh, source, host, path)
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
    assert (await get_from(mesh, CLIENT, "smiley.faces", "/fast")).body == "smiley2"
    # /api is the producer's; for fast-clients the consumer's routes replace them: no match
    assert (await get_from(mesh, CLIENT, "smiley.faces", "/api")).status == 404
    assert (await get_from(mesh, OTHER, "smiley.faces", "/api")).body == "smiley"


async def test_a_pod_that_leaves_and_a_deleted_route_stop_the_consumer_routing(
    mesh: Mesh, backends: Backends
) -> None:
    mesh.apply(pod("client-2", "fast-clients", "127.0.0.4"))
    await mesh.converge()
    assert (await get_from(mesh, "127.0.0.4", "smiley.faces", "/fast")).body == "smiley2"

    mesh.store.delete(ObjectKey("Pod", "fast-clients", "client"))
    await mesh.converge()
    # 127.0.0.2 is no pod of fast-clients any more: the producer's routes
    assert (await get_from(mesh, CLIENT, "smiley.faces", "/api")).body == "smiley"
    assert (await get_from(mesh, CLIENT, "smiley.faces", "/fast")).status == 404
    assert (await get_from(mesh, "127.0.0.4", "smiley.faces", "/fast")).body == "smiley2"

    mesh.store.delete(ObjectKey("HTTPRoute", "fast-clients", "smiley-fast"))
    await mesh.converge()
    assert (await get_from(mesh, "127.0.0.4", "smiley.faces", "/api")).body == "smiley"
    assert mesh.cache.get_snapshot(NODE) is mesh.pipeline.snapshot  # no listener of its own
