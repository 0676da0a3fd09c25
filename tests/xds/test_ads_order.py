"""Make before break on one ADS stream, over real gRPC: Listeners, routes and endpoints do not
overtake the Clusters they may name.

The client is scripted as Envoy behaves (it answers each response, and holds the answer to a
CDS response while its clusters warm). Negative checks never wait for silence: `Client.probe`
subscribes to a Secret no response carried yet, whose answer must come; a stream answers in
order, so what was read before it is everything the stream had sent.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Iterable
from dataclasses import dataclass
from typing import Any

import grpc
import pytest
from envoy.config.cluster.v3 import cluster_pb2
from envoy.config.endpoint.v3 import endpoint_pb2
from envoy.config.listener.v3 import listener_pb2
from envoy.config.route.v3 import route_pb2
from envoy.extensions.transport_sockets.tls.v3 import secret_pb2
from google.protobuf.message import Message

from nodemesh.xds import types
from nodemesh.xds.cache import Resource, Snapshot
from nodemesh.xds.server import _streams
from tests.xds import resources as R
from tests.xds.conftest import ControlPlane
from tests.xds.test_ads_protocol import DDR, DR, delta_call, sotw_call

_MESSAGES: dict[str, type[Message]] = {
    types.CLUSTER: cluster_pb2.Cluster,
    types.ENDPOINT: endpoint_pb2.ClusterLoadAssignment,
    types.LISTENER: listener_pb2.Listener,
    types.ROUTE: route_pb2.RouteConfiguration,
    types.SECRET: secret_pb2.Secret,
}


def snap(
    clusters: dict[str, int],
    routes: Iterable[tuple[str, str]] = (("/", "a"),),
    *,
    port: int = 80,
    listener: str = "web",
    listener_port: int = 15001,
    extra_routes: Iterable[route_pb2.RouteConfiguration] = (),
) -> Snapshot:
    """Clusters by name with their connect timeout (a change of it changes the cluster), each
    with endpoints on `port`; one Listener on route configuration "routes"; a Secret type for
    the probes."""
    msgs: list[Message] = [R.http_listener(listener, listener_port, "routes")]
    msgs += [R.routes("routes", *routes), *extra_routes]
    for name, timeout in clusters.items():
        msgs += [R.eds_cluster(name, timeout), R.endpoints(name, port)]
    grouped: dict[str, list[Resource]] = {t: [] for t in _MESSAGES}
    for m in msgs:
        r = Resource.from_message(m)
        grouped[r.type_url].append(r)
    return Snapshot(grouped)


@dataclass(frozen=True)
class Got:
    """One response, SotW or delta."""

    type_url: str
    nonce: str
    version: str
    messages: tuple[Any, ...]
    removed: tuple[str, ...]

    @property
    def names(self) -> list[str]:
        return [types.resource_name(m) for m in self.messages]

    def route_clusters(self) -> list[str]:
        return [
            r.route.cluster for rc in self.messages for vh in rc.virtual_hosts for r in vh.routes
        ]


class Client:
    """One ADS stream (SotW or delta) of node `node`. It keeps each type's subscription and
    last response, so that its ACKs and subscription changes repeat what SotW needs, and what
    it holds of the endpoints."""

    def __init__(self, channel: grpc.aio.Channel, mode: str, node: str = "n") -> None:
        self.mode = mode
        self.node = node
        self.call = sotw_call(channel) if mode == "sotw" else delta_call(channel)
        self.names: dict[str, list[str]] = {}
        self.last: dict[str, Got] = {}
        self.endpoints: dict[str, bytes] = {}
        self.probes = 0

    async def ask(self, type_url: str, *names: str, held: Snapshot | None = None) -> None:
        """The first request for a type (wildcard without names). A reconnecting client states
        what it holds of `held` (delta: the resources' versions, SotW: the type's version)."""
        self.names[type_url] = list(names)
        if type_url == types.ENDPOINT and held is not None:
            self.endpoints = {
                n: r.message.SerializeToString()
                for n, r in held.resources(type_url).items()
                if n in names
            }
        if self.mode == "sotw":
            version = (held.version(type_url) or "") if held is not None else ""
            await self._write(DR(type_url=type_url, resource_names=names, version_info=version))
        else:
            versions = {
                n: r.version
                for n, r in (held.resources(type_url).items() if held is not None else ())
                if not names or n in names
            }
            await self._write(
                DDR(
                    type_url=type_url,
                    resource_names_subscribe=names,
                    initial_resource_versions=versions,
                )
            )

    async def start(self, held: Snapshot | None = None) -> list[Got]:
        """Ask for every type at once, as Envoy does on a new stream (its first requests come
        one after the other as it initialises; after a reconnect, all at once). Returns what
        comes before the probe's Secret."""
        await self.ask(types.CLUSTER, held=held)
        await self.ask(types.ENDPOINT, "a", held=held)
        await self.ask(types.LISTENER, held=held)
        await self.ask(types.ROUTE, "routes", held=held)
        await self.ask(types.SECRET, "probe0")
        return await self._until_secret()

    async def ack(self, got: Got) -> None:
        await self._answer(got, None)

    async def nack(self, got: Got, message: str) -> None:
        await self._answer(got, message)

    async def _answer(self, got: Got, error: str | None) -> None:
        if self.mode == "sotw":
            r = DR(
                type_url=got.type_url,
                version_info=got.version,
                response_nonce=got.nonce,
                resource_names=self.names[got.type_url],
            )
        else:
            r = DDR(type_url=got.type_url, response_nonce=got.nonce)
        if error is not None:
            r.error_detail.message = error
        await self._write(r)

    async def subscribe(self, type_url: str, *names: str) -> None:
        self.names[type_url] += names
        if self.mode == "sotw":
            last = self.last.get(type_url)
            await self._write(
                DR(
                    type_url=type_url,
                    resource_names=self.names[type_url],
                    response_nonce=last.nonce if last else "",
                    version_info=last.version if last else "",
                )
            )
        else:
            await self._write(DDR(type_url=type_url, resource_names_subscribe=names))

    async def _write(self, r: Any) -> None:
        r.node.id = self.node
        await self.call.write(r)

    async def read(self) -> Got:
        r = await asyncio.wait_for(self.call.read(), 10)
        if self.mode == "sotw":
            msgs = tuple(_MESSAGES[r.type_url].FromString(a.value) for a in r.resources)
            got = Got(r.type_url, r.nonce, r.version_info, msgs, ())
        else:
            msgs = tuple(_MESSAGES[r.type_url].FromString(x.resource.value) for x in r.resources)
            got = Got(r.type_url, r.nonce, r.system_version_info, msgs, tuple(r.removed_resources))
        self.last[got.type_url] = got
        return got

    async def _until_secret(self) -> list[Got]:
        """The responses read before the next Secret. Endpoints that change nothing the client
        holds (SotW answers every new EDS version whole; the server resends a changed
        cluster's endpoints) are ACKed here and left out."""
        before = []
        while (got := await self.read()).type_url != types.SECRET:
            if got.type_url == types.ENDPOINT:
                now = dict(self.endpoints) if self.mode == "delta" else {}
                now.update((m.cluster_name, m.SerializeToString()) for m in got.messages)
                for name in got.removed:
                    now.pop(name, None)
                news, self.endpoints = now != self.endpoints, now
                if not news:
                    await self.ack(got)
                    continue
            before.append(got)
        await self.ack(got)
        return before

    async def probe(self) -> list[Got]:
        """What the stream sent that was not read yet."""
        self.probes += 1
        await self.subscribe(types.SECRET, f"probe{self.probes}")
        return await self._until_secret()

    async def settle(self, got: list[Got]) -> list[Got]:
        """ACK `got` and whatever comes after, until nothing more does; returns it all."""
        acked: list[Got] = []
        while got:
            for g in got:
                await self.ack(g)
            acked += got
            got = await self.probe()
        return acked


def kinds(got: list[Got]) -> list[str]:
    return [types.short_name(g.type_url) for g in got]


@pytest.fixture
async def channel(control_plane: ControlPlane) -> AsyncIterator[grpc.aio.Channel]:
    async with grpc.aio.insecure_channel(control_plane.address) as ch:
        yield ch


async def test_a_route_to_a_new_cluster_waits_for_the_answer_to_its_cluster(
    control_plane: ControlPlane, channel: grpc.aio.Channel, mode: str
) -> None:
    """A CDS response is unanswered (so the CDS watch is closed) when cluster x and a route to
    it come: the route was sent at once, and Envoy routed to a cluster it did not have (503).
    It waits for x's CDS response, and for the client's answer to it, which Envoy sends once x
    has warmed. x's endpoints do not wait for that answer (x warms on them); and a route change
    that needs no new cluster does not wait at all."""
    cache = control_plane.cache
    cache.set_snapshot("n", snap({"a": 1}))
    c = Client(channel, mode)
    assert kinds(await c.settle(await c.start())) == ["cds", "eds", "lds", "rds"]

    cache.set_snapshot("n", snap({"a": 2}))  # a changes
    (cds1,) = await c.probe()  # left unanswered
    cache.set_snapshot("n", snap({"a": 2, "x": 1}, [("/", "a"), ("/x", "x")]))
    assert await c.probe() == [], "nothing may overtake the CDS response that brings x"

    await c.ack(cds1)
    (cds2,) = await c.probe()
    assert cds2.type_url == types.CLUSTER and "x" in cds2.names, "x, and not the route yet"
    await c.subscribe(types.ENDPOINT, "x")  # Envoy asks for x's endpoints as x warms
    (eds_x,) = await c.probe()
    assert eds_x.type_url == types.ENDPOINT and "x" in eds_x.names
    await c.ack(eds_x)
    assert await c.probe() == []

    await c.ack(cds2)  # x warmed: Envoy answers
    (rds,) = await c.probe()
    assert rds.type_url == types.ROUTE and rds.route_clusters() == ["a", "x"]
    await c.ack(rds)

    cache.set_snapshot("n", snap({"a": 2, "x": 1}, [("/", "x")]))  # no new cluster
    (rds,) = await c.probe()
    assert rds.type_url == types.ROUTE and rds.route_clusters() == ["x"]


async def test_the_endpoints_of_a_changed_cluster_follow_it_without_waiting_for_its_answer(
    control_plane: ControlPlane, channel: grpc.aio.Channel, mode: str
) -> None:
    """Cluster a and its endpoints change while a CDS response is unanswered: the new
    endpoints went to the old cluster first. They follow a's CDS response, and do not wait for
    its answer, which Envoy sends only once a has warmed on them."""
    cache = control_plane.cache
    cache.set_snapshot("n", snap({"a": 1}))
    c = Client(channel, mode)
    await c.settle(await c.start())

    cache.set_snapshot("n", snap({"a": 1, "b": 1}))
    (cds1,) = await c.probe()  # left unanswered
    cache.set_snapshot("n", snap({"a": 2, "b": 1}, port=81))
    assert await c.probe() == [], "a's new endpoints may not overtake a's CDS response"

    await c.ack(cds1)
    cds2, eds = await c.probe()
    assert (cds2.type_url, eds.type_url) == (types.CLUSTER, types.ENDPOINT)
    port = eds.messages[0].endpoints[0].lb_endpoints[0].endpoint.address.socket_address
    assert eds.names == ["a"] and port.port_value == 81


async def test_a_nack_of_the_clusters_does_not_hold_routes_back(
    control_plane: ControlPlane, channel: grpc.aio.Channel, mode: str
) -> None:
    """A NACK answers the CDS response: the client keeps its last good clusters, and routes go
    on (the one to the rejected cluster answers 503 as it would anyway; holding every route
    change until the clusters are fixed would stall all of them). While the rejected version
    is held, route changes are sent at once."""
    cache = control_plane.cache
    cache.set_snapshot("n", snap({"a": 1}))
    c = Client(channel, mode)
    await c.settle(await c.start())

    cache.set_snapshot("n", snap({"a": 1, "x": 1}, [("/", "a"), ("/x", "x")]))
    (cds,) = await c.probe()
    assert cds.type_url == types.CLUSTER
    assert await c.probe() == [], "the route to x waits for the answer to x's CDS response"
    await c.nack(cds, "cluster x: rejected")
    (rds,) = await c.probe()
    assert rds.type_url == types.ROUTE and rds.route_clusters() == ["a", "x"]
    await c.ack(rds)

    cache.set_snapshot("n", snap({"a": 1, "x": 1}, [("/", "a"), ("/y", "a")]))
    (rds,) = await c.probe()  # the clusters are still the rejected version: not resent
    assert rds.type_url == types.ROUTE and rds.route_clusters() == ["a", "a"]
    nack = control_plane.server.status.type_status("n", types.CLUSTER).last_nack
    assert nack is not None and nack.version == cds.version


async def test_a_route_waits_while_a_delta_client_leaves_two_cds_responses_unanswered(
    control_plane: ControlPlane, channel: grpc.aio.Channel
) -> None:
    """At MAX_UNANSWERED CDS responses no CDS watch is open, so the stream cannot send x: the
    route to x waits for that. When the client answers one, x goes, and the route waits for
    the answer to x's response; the answers to the two before do not let it pass."""
    cache = control_plane.cache
    cache.set_snapshot("n", snap({"a": 1}))
    c = Client(channel, "delta")
    await c.settle(await c.start())

    cache.set_snapshot("n", snap({"a": 2}))
    (cds1,) = await c.probe()
    await c.subscribe(types.CLUSTER, "gone")  # a subscription change: answered at once
    (cds2,) = await c.probe()
    assert cds2.type_url == types.CLUSTER and cds2.removed == ("gone",)
    cache.set_snapshot("n", snap({"a": 2, "x": 1}, [("/", "a"), ("/x", "x")]))
    assert await c.probe() == [], "two CDS responses are unanswered: neither x nor its route"

    await c.ack(cds1)
    (cds3,) = await c.probe()
    assert cds3.type_url == types.CLUSTER and cds3.names == ["x"]
    await c.ack(cds2)
    assert await c.probe() == []
    await c.ack(cds3)
    (rds,) = await c.probe()
    assert rds.type_url == types.ROUTE and rds.route_clusters() == ["a", "x"]


async def test_a_reconnecting_client_gets_routes_after_the_answer_to_clusters_it_lacks(
    control_plane: ControlPlane, channel: grpc.aio.Channel, mode: str
) -> None:
    """Envoy reconnects and asks for every type at once, stating what it holds. The control
    plane has cluster x and a route to it since: the route waits for the answer to x. A client
    that holds the current clusters is not held back."""
    cache = control_plane.cache
    s1 = snap({"a": 1})
    cache.set_snapshot("n", s1)
    first = Client(channel, mode)
    await first.settle(await first.start())
    first.call.cancel()

    s2 = snap({"a": 1, "x": 1}, [("/", "a"), ("/x", "x")])
    cache.set_snapshot("n", s2)
    c = Client(channel, mode)
    got = await c.start(held=s1)
    assert kinds(got) == ["cds"], "the route to x waits for the answer to x's CDS response"
    assert "x" in got[0].names
    await c.ack(got[0])
    (rds,) = await c.probe()
    assert rds.type_url == types.ROUTE and rds.route_clusters() == ["a", "x"]
    c.call.cancel()

    current = Client(channel, mode)
    assert await current.start(held=s2) == []
    cache.set_snapshot("n", snap({"a": 1, "x": 1}, [("/", "x")]))
    (rds,) = await current.probe()
    assert rds.type_url == types.ROUTE and rds.route_clusters() == ["x"]


async def test_each_node_is_ordered_by_its_own_snapshot(
    control_plane: ControlPlane, channel: grpc.aio.Channel, mode: str
) -> None:
    """Node n has a snapshot of its own (its own Listener, as a node with consumer routes
    does); node m has the shared one. n's new cluster holds n's Listener back until n answers
    it, not m's route change; and m's unanswered clusters do not hold n back."""
    cache = control_plane.cache
    cache.set_fallback_snapshot(snap({"a": 1}))
    cache.set_snapshot("n", snap({"a": 1}, listener="n-web"))
    n, m = Client(channel, mode, "n"), Client(channel, mode, "m")
    for c in (n, m):
        await c.settle(await c.start())

    cache.set_fallback_snapshot(snap({"a": 1, "y": 1}))  # m: a new cluster, unanswered
    (cds_m,) = await m.probe()
    assert cds_m.type_url == types.CLUSTER
    cache.set_snapshot("n", snap({"a": 1, "x": 1}, listener="n-web", listener_port=15002))
    (cds_n,) = await n.probe()
    assert cds_n.type_url == types.CLUSTER and "x" in cds_n.names
    assert await n.probe() == [], "n's Listener waits for the answer to n's clusters"
    await n.ack(cds_n)
    (lds,) = await n.probe()
    assert lds.type_url == types.LISTENER and lds.names == ["n-web"]

    cache.set_fallback_snapshot(snap({"a": 1, "y": 1}, [("/", "a"), ("/y", "y")]))
    assert await m.probe() == [], "m's route to y waits for m's answer"
    await m.ack(cds_m)
    (rds,) = await m.probe()
    assert rds.route_clusters() == ["a", "y"]


async def test_a_subscription_made_while_routes_wait_is_answered_with_them(
    control_plane: ControlPlane, channel: grpc.aio.Channel, mode: str
) -> None:
    """Envoy subscribes to another route configuration while the routes wait for the answer to
    new clusters: the subscription is kept, and one response answers both once they may go."""
    cache = control_plane.cache
    more = R.routes("more", ("/", "x"))
    cache.set_snapshot("n", snap({"a": 1}, extra_routes=[more]))
    c = Client(channel, mode)
    await c.settle(await c.start())

    cache.set_snapshot("n", snap({"a": 1, "x": 1}, [("/x", "x")], extra_routes=[more]))
    (cds,) = await c.probe()
    await c.subscribe(types.ROUTE, "more")
    assert await c.probe() == [], "the routes wait for the answer to x's CDS response"
    await c.ack(cds)
    (rds,) = await c.probe()
    assert sorted(rds.names) == ["more", "routes"]
    assert await c.probe() == []


async def test_a_route_waits_for_the_answer_to_clusters_added_after_it_began_to_wait(
    control_plane: ControlPlane, channel: grpc.aio.Channel, mode: str
) -> None:
    """Two builds within one CDS round trip: routes held for the answer to the CDS response
    that added x were let go by it, with the newer build's content, a route to y, which the
    CDS response still unanswered had just added. Envoy answered that route with 503 (no
    cluster) for as long as y warmed (a real Envoy: 1,691 of them in a second). A route now
    waits again for the answer to a newer CDS response that added clusters. A CDS response
    that only removes clusters holds nothing back."""
    cache = control_plane.cache
    cache.set_snapshot("n", snap({"a": 1}))
    c = Client(channel, mode)
    await c.settle(await c.start())

    cache.set_snapshot("n", snap({"a": 1, "x": 1}, [("/", "a"), ("/x", "x")]))
    (cds_x,) = await c.probe()
    cache.set_snapshot("n", snap({"a": 1, "x": 1, "y": 1}, [("/x", "x"), ("/y", "y")]))
    assert await c.probe() == []
    await c.ack(cds_x)
    (cds_y,) = await c.probe()
    assert cds_y.type_url == types.CLUSTER and "y" in cds_y.names, "y, and not the route yet"
    await c.ack(cds_y)  # y warmed
    (rds,) = await c.probe()
    assert rds.type_url == types.ROUTE and rds.route_clusters() == ["x", "y"]
    await c.ack(rds)

    cache.set_snapshot("n", snap({"a": 1, "y": 1}, [("/y", "y")]))  # x goes
    cds, rds = await c.probe()
    assert cds.type_url == types.CLUSTER and "x" not in cds.names
    assert cds.removed == (("x",) if mode == "delta" else ())
    assert rds.type_url == types.ROUTE and rds.route_clusters() == ["y"]


class _Clock:
    """`time` for the stream module: `monotonic()` moves only when the test says."""

    def __init__(self) -> None:
        self.now = 1000.0

    def monotonic(self) -> float:
        return self.now

    def time(self) -> float:
        return self.now


async def test_clusters_added_without_pause_hold_routes_back_for_a_while_only(
    control_plane: ControlPlane, channel: grpc.aio.Channel, mode: str, monkeypatch: Any
) -> None:
    """A route waits again for newer added clusters however long the first answer took (a
    cluster warming for its first health check: the wait's clock counted that, and a first
    answer after 5 s let the route go right behind the newer cluster). Clusters added faster
    than the client warms them do not hold routes back for good: `ADDED_CLUSTERS_WAIT` after
    the route first waited again, the next answer lets it follow the newer clusters."""
    clock = _Clock()
    monkeypatch.setattr(_streams, "time", clock)
    cache = control_plane.cache
    cache.set_snapshot("n", snap({"a": 1}))
    c = Client(channel, mode)
    await c.settle(await c.start())

    cache.set_snapshot("n", snap({"a": 1, "x": 1}, [("/", "a"), ("/x", "x")]))
    (cds_x,) = await c.probe()
    cache.set_snapshot("n", snap({"a": 1, "x": 1, "y": 1}, [("/x", "x"), ("/y", "y")]))
    assert await c.probe() == []
    clock.now += 3 * _streams.ADDED_CLUSTERS_WAIT  # x warms slowly
    await c.ack(cds_x)
    (cds_y,) = await c.probe()
    assert cds_y.type_url == types.CLUSTER and "y" in cds_y.names, "y, and not the route yet"

    # z comes before y has warmed, and y's answer after the bound: the route follows z
    cache.set_snapshot("n", snap({"a": 1, "x": 1, "y": 1, "z": 1}, [("/y", "y"), ("/z", "z")]))
    assert await c.probe() == []  # z's Clusters go with the client's next CDS request
    clock.now += _streams.ADDED_CLUSTERS_WAIT
    await c.ack(cds_y)
    cds_z, rds = await c.probe()
    assert cds_z.type_url == types.CLUSTER and "z" in cds_z.names
    assert rds.type_url == types.ROUTE and rds.route_clusters() == ["y", "z"]


async def test_a_warming_cluster_gets_its_endpoints_while_newer_clusters_wait(
    control_plane: ControlPlane, channel: grpc.aio.Channel, mode: str
) -> None:
    """Envoy answers a CDS response once its new clusters have warmed, and a cluster warms on
    its endpoints, which Envoy asks for after the cluster came. Clusters that change before
    that request must not hold the endpoints back: their CDS response waits for the answer,
    the answer waited for the endpoints, and Envoy was left to give up after the cluster's
    initial_fetch_timeout (15 s), routes waiting all that time."""
    cache = control_plane.cache
    cache.set_snapshot("n", snap({"a": 1}))
    c = Client(channel, mode)
    await c.settle(await c.start())

    cache.set_snapshot("n", snap({"a": 1, "x": 1}, [("/", "a"), ("/x", "x")]))
    (cds_x,) = await c.probe()  # left unanswered: x warms
    cache.set_snapshot("n", snap({"a": 1, "x": 1, "y": 1}, [("/x", "x"), ("/y", "y")]))
    await c.subscribe(types.ENDPOINT, "x")  # Envoy asks for x's endpoints as x warms
    (eds_x,) = await c.probe()
    assert eds_x.type_url == types.ENDPOINT and "x" in eds_x.names
    await c.ack(eds_x)

    await c.ack(cds_x)  # x warmed: Envoy answers
    (cds_y,) = await c.probe()
    assert cds_y.type_url == types.CLUSTER and "y" in cds_y.names
    await c.ack(cds_y)
    (rds,) = await c.probe()
    assert rds.type_url == types.ROUTE and rds.route_clusters() == ["x", "y"]


async def test_a_changed_cluster_gets_its_endpoints_again_while_newer_clusters_wait(
    control_plane: ControlPlane, channel: grpc.aio.Channel, mode: str
) -> None:
    """Cluster a changes while an EDS response is unanswered, so a's endpoints are resent with
    the client's next EDS request (a re-warms on them). Clusters that changed since must not
    hold that resend back: a would warm only at its initial_fetch_timeout, and only then
    would Envoy answer a's CDS response."""
    cache = control_plane.cache
    cache.set_snapshot("n", snap({"a": 1}))
    c = Client(channel, mode)
    await c.settle(await c.start())

    cache.set_snapshot("n", snap({"a": 1}, port=81))
    (eds,) = await c.probe()  # left unanswered
    cache.set_snapshot("n", snap({"a": 2}, port=81))
    (cds_a,) = await c.probe()  # left unanswered: a re-warms
    cache.set_snapshot("n", snap({"a": 2, "y": 1}, port=81))
    assert await c.probe() == []
    await c.ack(eds)
    assert await c.probe() == []  # unchanged endpoints are ACKed and left out
    resent = c.last[types.ENDPOINT]
    assert resent.nonce != eds.nonce and resent.names == ["a"], "a's endpoints, for a to warm"
