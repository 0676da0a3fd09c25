"""The ADS protocol as a client sees it, over real gRPC: nonces, ACK/NACK, subscriptions.

Negative checks ("nothing was sent") never wait for silence: the test sends a probe request
for another type that must be answered, and since a stream answers in order, the next
message read must be that probe's answer.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

import grpc
import pytest
from envoy.service.discovery.v3 import discovery_pb2
from grpc_health.v1 import health_pb2, health_pb2_grpc

from nodemesh.xds import types
from nodemesh.xds.cache import Snapshot, SnapshotCache
from nodemesh.xds.server import AdsServer, StatusTracker
from tests.support import eventually
from tests.xds import resources as R
from tests.xds.conftest import ControlPlane

SOTW = "/envoy.service.discovery.v3.AggregatedDiscoveryService/StreamAggregatedResources"
DELTA = "/envoy.service.discovery.v3.AggregatedDiscoveryService/DeltaAggregatedResources"
DR = discovery_pb2.DiscoveryRequest
DDR = discovery_pb2.DeltaDiscoveryRequest


def snapshot(port: int = 80, clusters: tuple[str, ...] = ("a", "b")) -> Snapshot:
    msgs: list[Any] = [R.http_listener("web", 15001, "routes"), R.routes("routes", ("/", "a"))]
    for c in clusters:
        msgs += [R.eds_cluster(c), R.endpoints(c, port)]
    return Snapshot.from_messages(msgs)


@pytest.fixture
async def channel(control_plane: ControlPlane) -> AsyncIterator[grpc.aio.Channel]:
    async with grpc.aio.insecure_channel(control_plane.address) as ch:
        yield ch


def sotw_call(ch: grpc.aio.Channel) -> Any:
    return ch.stream_stream(
        SOTW,
        request_serializer=DR.SerializeToString,
        response_deserializer=discovery_pb2.DiscoveryResponse.FromString,
    )()


def delta_call(ch: grpc.aio.Channel) -> Any:
    return ch.stream_stream(
        DELTA,
        request_serializer=DDR.SerializeToString,
        response_deserializer=discovery_pb2.DeltaDiscoveryResponse.FromString,
    )()


def req(type_url: str, names: tuple[str, ...] = (), node: str = "n", **kw: Any) -> Any:
    r = DR(type_url=type_url, resource_names=list(names), **kw)
    if node:
        r.node.id = node
    return r


async def test_nonces_increase_and_versions_are_the_snapshots(
    control_plane: ControlPlane, channel: grpc.aio.Channel
) -> None:
    s = snapshot()
    control_plane.cache.set_snapshot("n", s)
    call = sotw_call(channel)
    await call.write(req(types.CLUSTER))
    first = await call.read()
    # answered first, as Envoy does: Listeners wait for the answer to new Clusters
    await call.write(req(types.CLUSTER, version_info=first.version_info, response_nonce="1"))
    await call.write(req(types.LISTENER, node=""))
    second = await call.read()
    assert (first.nonce, second.nonce) == ("1", "2")
    assert first.version_info == s.version(types.CLUSTER)
    assert second.version_info == s.version(types.LISTENER)
    call.cancel()


async def test_a_stale_nonce_is_ignored(
    control_plane: ControlPlane, channel: grpc.aio.Channel
) -> None:
    control_plane.cache.set_snapshot("n", snapshot())
    call = sotw_call(channel)
    await call.write(req(types.CLUSTER))
    r1 = await call.read()
    await call.write(req(types.CLUSTER, version_info=r1.version_info, response_nonce=r1.nonce))
    control_plane.cache.set_snapshot("n", snapshot(clusters=("a",)))
    r2 = await call.read()
    assert r2.nonce != r1.nonce and len(r2.resources) == 1
    # An answer to the superseded nonce r1 changes nothing, even though it asks for a
    # version the server no longer has.
    await call.write(req(types.CLUSTER, version_info="old", response_nonce=r1.nonce, node=""))
    await call.write(req(types.LISTENER, node=""))  # the probe
    probe = await call.read()
    assert probe.type_url == types.LISTENER
    assert control_plane.server.stale_requests == 1
    call.cancel()


async def test_nack_is_recorded_and_the_rejected_version_is_held(
    control_plane: ControlPlane, channel: grpc.aio.Channel
) -> None:
    s1 = snapshot()
    control_plane.cache.set_snapshot("n", s1)
    call = sotw_call(channel)
    await call.write(req(types.CLUSTER))
    r1 = await call.read()
    nack = req(types.CLUSTER, response_nonce=r1.nonce, node="")
    nack.error_detail.code = 3
    nack.error_detail.message = "cluster a: invalid"
    await call.write(nack)
    await call.write(req(types.LISTENER, node=""))
    assert (await call.read()).type_url == types.LISTENER  # no resend of the rejected CDS
    ts = control_plane.server.status.type_status("n", types.CLUSTER)
    assert ts.last_nack is not None
    assert (ts.last_nack.version, ts.last_nack.message) == (r1.version_info, "cluster a: invalid")
    assert ts.last_nack.resource_names == ("a", "b") and ts.version_acked == ""
    assert ts.responses_sent == 1

    control_plane.cache.set_snapshot("n", snapshot(clusters=("a",)))
    r2 = await call.read()
    assert r2.type_url == types.CLUSTER and r2.version_info != r1.version_info
    await call.write(req(types.CLUSTER, version_info=r2.version_info, response_nonce=r2.nonce))
    await call.write(req(types.ROUTE, ("routes",), node=""))
    assert (await call.read()).type_url == types.ROUTE
    assert ts.version_acked == r2.version_info and ts.last_nack is None
    call.cancel()


async def test_a_request_repeating_a_nacked_nonce_is_no_ack(
    control_plane: ControlPlane, channel: grpc.aio.Channel
) -> None:
    """SotW Envoy sends its last nonce in every request until the next response, and
    error_detail only once: a subscription change after a NACK must not count as an ACK of
    the rejected version."""
    control_plane.cache.set_snapshot("n", snapshot())
    call = sotw_call(channel)
    await call.write(req(types.ENDPOINT, ("a",)))
    r1 = await call.read()
    nack = req(types.ENDPOINT, ("a",), response_nonce=r1.nonce, node="")
    nack.error_detail.message = "endpoints a: invalid"
    await call.write(nack)
    await call.write(req(types.ENDPOINT, ("a", "b"), response_nonce=r1.nonce, node=""))
    r2 = await call.read()
    assert len(r2.resources) == 2  # the grown subscription is answered
    ts = control_plane.server.status.type_status("n", types.ENDPOINT)
    assert ts.version_acked == "" and ts.last_nack is not None
    call.cancel()


async def test_named_subscription_is_answered_when_it_grows(
    control_plane: ControlPlane, channel: grpc.aio.Channel
) -> None:
    control_plane.cache.set_snapshot("n", snapshot())
    call = sotw_call(channel)
    await call.write(req(types.ENDPOINT, ("a",)))
    r1 = await call.read()
    assert len(r1.resources) == 1
    await call.write(
        req(types.ENDPOINT, ("a", "b"), version_info=r1.version_info, response_nonce=r1.nonce)
    )
    r2 = await call.read()
    assert r2.version_info == r1.version_info and len(r2.resources) == 2
    call.cancel()


async def test_sotw_wildcard_gets_every_resource_and_removals(
    control_plane: ControlPlane, channel: grpc.aio.Channel
) -> None:
    control_plane.cache.set_snapshot("n", snapshot())
    call = sotw_call(channel)
    await call.write(req(types.CLUSTER))
    r1 = await call.read()
    assert len(r1.resources) == 2
    await call.write(req(types.CLUSTER, version_info=r1.version_info, response_nonce=r1.nonce))
    control_plane.cache.set_snapshot("n", snapshot(clusters=("b",)))
    r2 = await call.read()
    assert len(r2.resources) == 1  # a is gone from the whole state
    call.cancel()


def dreq(type_url: str, node: str = "n", **kw: Any) -> Any:
    r = DDR(type_url=type_url, **kw)
    if node:
        r.node.id = node
    return r


async def test_delta_sends_changes_and_removals_then_honours_unsubscribe(
    control_plane: ControlPlane, channel: grpc.aio.Channel
) -> None:
    control_plane.cache.set_snapshot("n", snapshot())
    call = delta_call(channel)
    await call.write(dreq(types.ENDPOINT, resource_names_subscribe=["a", "b"]))
    r1 = await call.read()
    assert sorted(x.name for x in r1.resources) == ["a", "b"]
    await call.write(dreq(types.ENDPOINT, node="", response_nonce=r1.nonce))
    control_plane.cache.set_snapshot("n", snapshot(port=81, clusters=("a",)))
    r2 = await call.read()
    assert [x.name for x in r2.resources] == ["a"] and list(r2.removed_resources) == ["b"]
    await call.write(
        dreq(types.ENDPOINT, node="", response_nonce=r2.nonce, resource_names_unsubscribe=["a"])
    )
    control_plane.cache.set_snapshot("n", snapshot(port=82, clusters=("a",)))
    await call.write(dreq(types.CLUSTER, node=""))
    assert (await call.read()).type_url == types.CLUSTER  # nothing for the unsubscribed a
    call.cancel()


async def subscribed_after_an_ack(
    control_plane: ControlPlane, channel: grpc.aio.Channel, name: str
) -> tuple[Any, Any]:
    """A delta stream that holds endpoints "a" (ACKed), then subscribes to `name`, then asks
    for Listeners (the probe); returns the call and the answer to the subscription, which must
    come before the probe's."""
    control_plane.cache.set_snapshot("n", snapshot())
    call = delta_call(channel)
    await call.write(dreq(types.ENDPOINT, resource_names_subscribe=["a"]))
    r1 = await call.read()
    await call.write(dreq(types.ENDPOINT, node="", response_nonce=r1.nonce))
    await call.write(dreq(types.ENDPOINT, node="", resource_names_subscribe=[name]))
    await call.write(dreq(types.LISTENER, node=""))  # the probe
    r2 = await call.read()
    assert r2.type_url == types.ENDPOINT, "the subscription must be answered before the probe"
    return call, r2


async def test_a_delta_subscription_to_a_name_the_client_holds_sends_it_again(
    control_plane: ControlPlane, channel: grpc.aio.Channel
) -> None:
    """The spec: the server must send a subscribed resource even when it believes the client
    has its current version, since the client may have forgotten it."""
    call, r2 = await subscribed_after_an_ack(control_plane, channel, "a")
    assert [x.name for x in r2.resources] == ["a"]
    call.cancel()


async def test_a_delta_subscription_to_a_missing_name_is_answered_and_sent_when_it_appears(
    control_plane: ControlPlane, channel: grpc.aio.Channel
) -> None:
    """The spec: a subscribed resource that does not exist is named in removed_resources, so
    the client need not wait for its timeout (Envoy warms a cluster whose endpoints do not
    exist at once, instead of after initial_fetch_timeout); once it exists, it is sent."""
    call, r2 = await subscribed_after_an_ack(control_plane, channel, "c")
    assert (list(r2.resources), list(r2.removed_resources)) == ([], ["c"])
    await call.write(dreq(types.ENDPOINT, node="", response_nonce=r2.nonce))
    assert (await call.read()).type_url == types.LISTENER
    control_plane.cache.set_snapshot("n", snapshot(clusters=("a", "b", "c")))
    r3 = await call.read()
    assert [x.name for x in r3.resources] == ["c"] and not r3.removed_resources
    call.cancel()


async def read_until(call: Any, type_url: str) -> list[Any]:
    """The responses read before the first one of `type_url` (the probe's answer)."""
    before = []
    while (r := await asyncio.wait_for(call.read(), 10)).type_url != type_url:
        before.append(r)
    return before


async def test_a_delta_client_that_does_not_answer_gets_two_responses_then_the_latest(
    control_plane: ControlPlane, channel: grpc.aio.Channel
) -> None:
    """A client that keeps subscribing (spontaneous requests, without a nonce) while every
    snapshot changes, and never ACKs or NACKs. Were each request answered, the stream would
    keep one more unanswered response per change (each bringing every endpoint again). It
    sends two (MAX_UNANSWERED), then none until the client answers; the answer brings one
    response with the latest version of every resource that changed and every name
    subscribed meanwhile."""
    names = [f"e{i}" for i in range(12)]

    def snap(port: int) -> Snapshot:
        return Snapshot.from_messages([R.endpoints(n, port) for n in names])

    latest = snap(1000)
    control_plane.cache.set_snapshot("n", latest)
    call = delta_call(channel)
    await call.write(dreq(types.ENDPOINT, resource_names_subscribe=names[:1]))
    for i, name in enumerate(names[1:], 1):
        latest = snap(1000 + i)  # every endpoint changes
        control_plane.cache.set_snapshot("n", latest)
        await call.write(dreq(types.ENDPOINT, node="", resource_names_subscribe=[name]))
    await call.write(dreq(types.LISTENER, node=""))  # the probe
    unanswered = await read_until(call, types.LISTENER)
    assert len(unanswered) == 2

    for r in unanswered:
        await call.write(dreq(types.ENDPOINT, node="", response_nonce=r.nonce))
    await call.write(dreq(types.CLUSTER, node=""))  # the probe
    after = await read_until(call, types.CLUSTER)
    assert len(after) == 1
    held: dict[str, str] = {}
    for r in [*unanswered, *after]:
        held.update((x.name, x.version) for x in r.resources)
    wanted = {n: r.version for n, r in latest.resources(types.ENDPOINT).items()}
    assert held == wanted
    await call.write(dreq(types.ENDPOINT, node="", response_nonce=after[0].nonce))
    status = control_plane.server.status
    await eventually(lambda: status.type_status("n", types.ENDPOINT).acked_resources == wanted)
    call.cancel()


async def test_a_sotw_first_request_with_an_earlier_streams_nonce_is_answered(
    control_plane: ControlPlane, channel: grpc.aio.Channel
) -> None:
    """Envoy clears the nonce on a new stream; a client that keeps it was never answered (the
    nonce was taken for a stale one)."""
    control_plane.cache.set_snapshot("n", snapshot())
    call = sotw_call(channel)
    await call.write(req(types.CLUSTER, response_nonce="7"))
    first = await asyncio.wait_for(call.read(), 5)
    assert first.type_url == types.CLUSTER and len(first.resources) == 2
    call.cancel()


async def test_a_delta_first_request_with_an_earlier_streams_nonce_is_answered(
    control_plane: ControlPlane, channel: grpc.aio.Channel
) -> None:
    """The same on delta, for a first request that subscribes to nothing (a legacy wildcard):
    it was taken for a stale answer, and the client got no Clusters, and so no Listeners (they
    wait for the Clusters), ever."""
    control_plane.cache.set_snapshot("n", snapshot())
    call = delta_call(channel)
    await call.write(dreq(types.CLUSTER, response_nonce="7"))
    first = await asyncio.wait_for(call.read(), 5)
    assert first.type_url == types.CLUSTER and sorted(r.name for r in first.resources) == [
        "a",
        "b",
    ]
    call.cancel()


async def test_delta_wildcard_unsubscribed_and_subscribed_again_is_sent_again(
    control_plane: ControlPlane, channel: grpc.aio.Channel
) -> None:
    """The client forgets what it held through `*` when it unsubscribes from it, as it does a
    name: a `*` again got nothing (what it dropped was taken as held)."""
    control_plane.cache.set_snapshot("n", snapshot())
    call = delta_call(channel)
    await call.write(dreq(types.CLUSTER, resource_names_subscribe=["*"]))
    first = await call.read()
    assert sorted(r.name for r in first.resources) == ["a", "b"]
    await call.write(dreq(types.CLUSTER, node="", response_nonce=first.nonce))
    await call.write(dreq(types.CLUSTER, node="", resource_names_unsubscribe=["*"]))
    status = control_plane.server.status
    await eventually(lambda: status.type_status("n", types.CLUSTER).acked_resources == {})
    await call.write(dreq(types.CLUSTER, node="", resource_names_subscribe=["*"]))
    again = await asyncio.wait_for(call.read(), 5)
    assert sorted(r.name for r in again.resources) == ["a", "b"]
    call.cancel()


async def test_a_second_stream_of_the_node_that_closes_leaves_the_first_ones_state(
    control_plane: ControlPlane, channel: grpc.aio.Channel
) -> None:
    """Envoy A is connected; a second Envoy with its node id (a hot restart's child that
    failed, a rollout rolled back) connects, takes the type over and goes. A still holds the
    snapshot: the node said it held nothing (version_acked "", every route Pending) until
    the type next changed."""
    s = snapshot()
    control_plane.cache.set_snapshot("n", s)
    held = {n: r.version for n, r in s.resources(types.CLUSTER).items()}
    status = control_plane.server.status
    a = sotw_call(channel)
    await a.write(req(types.CLUSTER))
    ra = await a.read()
    await a.write(req(types.CLUSTER, version_info=ra.version_info, response_nonce=ra.nonce))
    await eventually(lambda: status.type_status("n", types.CLUSTER).acked_resources == held)
    b = sotw_call(channel)
    await b.write(req(types.CLUSTER))
    rb = await b.read()
    await b.write(req(types.CLUSTER, version_info=rb.version_info, response_nonce=rb.nonce))
    await eventually(lambda: status.node("n") is not None and status.node("n").streams == 2)
    b.cancel()
    await eventually(lambda: status.node("n") is not None and status.node("n").streams == 1)
    ts = status.type_status("n", types.CLUSTER)
    assert (ts.version_acked, ts.acked_resources) == (s.version(types.CLUSTER), held)
    a.cancel()


async def test_delta_reconnect_with_current_versions_gets_nothing_resent(
    control_plane: ControlPlane, channel: grpc.aio.Channel
) -> None:
    s = snapshot()
    control_plane.cache.set_snapshot("n", s)
    call = delta_call(channel)
    held = {n: r.version for n, r in s.resources(types.CLUSTER).items()}
    await call.write(dreq(types.CLUSTER, initial_resource_versions=held))
    await call.write(dreq(types.LISTENER, node=""))
    first = await call.read()
    assert first.type_url == types.LISTENER  # the CDS watch stays silent
    ts = control_plane.server.status.type_status("n", types.CLUSTER)
    assert ts.resources_sent == 0 and ts.acked_resources == held
    # it holds the current version (it was "" until the type changed: /status said so, and
    # a deleted Service's cluster lingered its full 60 s, waiting for that)
    assert ts.version_acked == s.version(types.CLUSTER)
    call.cancel()
    # the same with the wildcard written out (`*`, not the legacy empty list)
    status = control_plane.server.status
    star = delta_call(channel)
    await star.write(
        dreq(types.CLUSTER, initial_resource_versions=held, resource_names_subscribe=["*"])
    )
    await eventually(lambda: status.node("n") is not None and status.node("n").streams == 1)
    await eventually(
        lambda: status.type_status("n", types.CLUSTER).version_acked == s.version(types.CLUSTER)
    )
    star.cancel()


async def test_a_new_delta_stream_counts_only_what_its_client_says_it_holds(
    control_plane: ControlPlane, channel: grpc.aio.Channel
) -> None:
    """A restarted Envoy holds nothing: what its previous stream ACKed must not count (else
    Programmed would stay True for a node that has no config), and a name it unsubscribes
    from is no longer held."""
    s = snapshot()
    control_plane.cache.set_snapshot("n", s)
    status = control_plane.server.status
    call = delta_call(channel)
    await call.write(dreq(types.CLUSTER))
    first = await call.read()
    await call.write(dreq(types.CLUSTER, node="", response_nonce=first.nonce))
    held = {n: r.version for n, r in s.resources(types.CLUSTER).items()}
    await eventually(lambda: status.type_status("n", types.CLUSTER).acked_resources == held)
    call.cancel()

    again = delta_call(channel)
    await again.write(dreq(types.CLUSTER, initial_resource_versions={"a": held["a"]}))
    await eventually(
        lambda: status.type_status("n", types.CLUSTER).acked_resources == {"a": held["a"]}
    )
    assert status.type_status("n", types.CLUSTER).version_acked == ""
    await again.read()  # b is sent again
    await again.write(dreq(types.CLUSTER, node="", resource_names_unsubscribe=["a"]))
    await eventually(lambda: "a" not in status.type_status("n", types.CLUSTER).acked_resources)
    again.cancel()


async def _clusters_acked(
    control_plane: ControlPlane, channel: grpc.aio.Channel
) -> tuple[dict[str, str], Any, Any]:
    """Node "n" on a SotW stream that got the snapshot's clusters and ACKed them: what it
    holds, the stream, and the response."""
    s = snapshot()
    control_plane.cache.set_snapshot("n", s)
    held = {n: r.version for n, r in s.resources(types.CLUSTER).items()}
    call = sotw_call(channel)
    await call.write(req(types.CLUSTER))
    r1 = await call.read()
    await call.write(req(types.CLUSTER, version_info=r1.version_info, response_nonce=r1.nonce))
    status = control_plane.server.status
    await eventually(lambda: status.type_status("n", types.CLUSTER).acked_resources == held)
    return held, call, r1


async def test_a_restarted_sotw_client_holds_nothing_until_it_acks(
    control_plane: ControlPlane, channel: grpc.aio.Channel
) -> None:
    """A new stream's first request with no `version_info` (a restarted Envoy) holds nothing,
    whatever the node's previous stream ACKed."""
    status = control_plane.server.status
    held, call, _ = await _clusters_acked(control_plane, channel)
    call.cancel()

    again = sotw_call(channel)
    await again.write(req(types.CLUSTER))
    r2 = await again.read()  # the first request was handled: this stream speaks for CDS
    ts = status.type_status("n", types.CLUSTER)
    assert (ts.version_acked, ts.acked_resources) == ("", {})
    await again.write(req(types.CLUSTER, version_info=r2.version_info, response_nonce=r2.nonce))
    await eventually(lambda: status.type_status("n", types.CLUSTER).acked_resources == held)
    again.cancel()


async def test_a_reconnecting_sotw_client_holds_the_version_it_states(
    control_plane: ControlPlane, channel: grpc.aio.Channel
) -> None:
    """The same Envoy reconnecting states the version it ACKed: nothing is resent, and it
    still holds those resources."""
    status = control_plane.server.status
    held, call, r1 = await _clusters_acked(control_plane, channel)
    call.cancel()
    await eventually(lambda: not status.node("n").connected)  # type: ignore[union-attr]

    again = sotw_call(channel)
    await again.write(req(types.CLUSTER, version_info=r1.version_info))
    await again.write(req(types.LISTENER, node=""))
    assert (await again.read()).type_url == types.LISTENER  # CDS is not resent
    ts = status.type_status("n", types.CLUSTER)
    assert (ts.version_acked, ts.acked_resources) == (r1.version_info, held)
    again.cancel()


async def test_an_envoy_that_kept_its_config_across_a_control_plane_restart_holds_it(
    control_plane: ControlPlane, channel: grpc.aio.Channel
) -> None:
    """A restarted control plane remembers no stream. An Envoy that kept its config states the
    version it holds; versions hash the content, so it is the snapshot's version: nothing is
    sent, and the node holds the snapshot's resources (it counted as holding nothing, so every
    route stayed Programmed=Pending until the next change). Another version holds nothing."""
    s = snapshot()
    control_plane.cache.set_snapshot("n", s)
    status = control_plane.server.status
    held = {n: r.version for n, r in s.resources(types.CLUSTER).items()}
    call = sotw_call(channel)
    await call.write(req(types.CLUSTER, version_info=s.version(types.CLUSTER) or ""))
    await call.write(req(types.LISTENER, node="", version_info="from-an-older-control-plane"))
    assert (await call.read()).type_url == types.LISTENER  # CDS is not resent
    ts = status.type_status("n", types.CLUSTER)
    assert (ts.version_acked, ts.acked_resources) == (s.version(types.CLUSTER), held)
    assert status.type_status("n", types.LISTENER).acked_resources == {}
    call.cancel()


async def test_only_the_newest_stream_of_a_node_says_what_it_holds(
    control_plane: ControlPlane, channel: grpc.aio.Channel
) -> None:
    """Two Envoys with one node id (a hot restart, or a copied bootstrap): the older stream's
    late ACK must not say the node holds what the newer Envoy, which holds nothing, lacks."""
    s = snapshot()
    control_plane.cache.set_snapshot("n", s)
    status = control_plane.server.status
    old = sotw_call(channel)
    await old.write(req(types.CLUSTER))
    r_old = await old.read()
    new = sotw_call(channel)
    await new.write(req(types.CLUSTER))  # takes the type over: holds nothing yet
    r_new = await new.read()
    stale = status.stale_reports
    await old.write(req(types.CLUSTER, version_info=r_old.version_info, response_nonce=r_old.nonce))
    await eventually(lambda: status.stale_reports == stale + 1)
    assert status.type_status("n", types.CLUSTER).acked_resources == {}
    await new.write(req(types.CLUSTER, version_info=r_new.version_info, response_nonce=r_new.nonce))
    held = {n: r.version for n, r in s.resources(types.CLUSTER).items()}
    await eventually(lambda: status.type_status("n", types.CLUSTER).acked_resources == held)
    old.cancel()
    new.cancel()


async def test_a_node_gone_for_an_hour_is_forgotten() -> None:
    """Nodes come and go (autoscaling): each departed node kept its status, with what it held
    of every type (up to 10,000 names), for as long as the control plane ran."""
    now = [1000.0]
    cache = SnapshotCache()
    cache.set_snapshot("gone", snapshot())
    server = AdsServer(cache, status=StatusTracker(clock=lambda: now[0]))
    port = await server.start()
    status = server.status
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as ch:
            call = sotw_call(ch)
            await call.write(req(types.CLUSTER, node="gone"))
            r1 = await call.read()
            await call.write(
                req(types.CLUSTER, version_info=r1.version_info, response_nonce=r1.nonce, node="")
            )
            await eventually(lambda: status.type_status("gone", types.CLUSTER).acked_resources)
            call.cancel()
            await eventually(lambda: not status.node("gone").connected)  # type: ignore[union-attr]

            now[0] += 3599
            other = sotw_call(ch)
            await other.write(req(types.CLUSTER, node="other"))
            await eventually(lambda: status.node("other") is not None)
            assert status.node("gone") is not None  # back within the hour, it is still known
            now[0] += 2
            again = sotw_call(ch)
            await again.write(req(types.CLUSTER, node="third"))
            await eventually(lambda: status.node("third") is not None)
            assert status.node("gone") is None
            assert [n.node_id for n in status.nodes()] == ["other", "third"]
            other.cancel()
            again.cancel()
    finally:
        await server.stop(grace=0)


async def test_a_type_a_new_delta_stream_does_not_ask_for_is_no_longer_held(
    control_plane: ControlPlane, channel: grpc.aio.Channel
) -> None:
    """A restarted Envoy that never asks for a type (RDS, after it rejected its Listener) holds
    none of it: the closed stream's ACKs stop counting when it closes."""
    s = snapshot()
    control_plane.cache.set_snapshot("n", s)
    status = control_plane.server.status
    call = delta_call(channel)
    await call.write(dreq(types.CLUSTER))
    await call.write(dreq(types.ROUTE, node="", resource_names_subscribe=["routes"]))
    for _ in range(2):
        r = await call.read()
        await call.write(dreq(r.type_url, node="", response_nonce=r.nonce))
    await eventually(lambda: status.type_status("n", types.ROUTE).acked_resources)
    call.cancel()

    again = delta_call(channel)
    await again.write(dreq(types.CLUSTER))
    await again.read()
    await eventually(lambda: status.type_status("n", types.ROUTE).acked_resources == {})
    assert status.type_status("n", types.ROUTE).version_acked == ""
    again.cancel()


async def test_delta_nack_holds_until_a_new_version(
    control_plane: ControlPlane, channel: grpc.aio.Channel
) -> None:
    control_plane.cache.set_snapshot("n", snapshot())
    call = delta_call(channel)
    await call.write(dreq(types.CLUSTER))
    r1 = await call.read()
    nack = dreq(types.CLUSTER, node="", response_nonce=r1.nonce)
    nack.error_detail.message = "no"
    await call.write(nack)
    await call.write(dreq(types.LISTENER, node=""))
    assert (await call.read()).type_url == types.LISTENER
    control_plane.cache.set_snapshot("n", snapshot(clusters=("a", "b", "c")))
    r2 = await call.read()
    # Nothing was ACKed, so the new version brings every cluster again, c included.
    assert r2.type_url == types.CLUSTER
    assert sorted(x.name for x in r2.resources) == ["a", "b", "c"]
    call.cancel()


async def test_a_delta_subscription_made_after_a_nack_is_answered_at_the_rejected_version(
    control_plane: ControlPlane, channel: grpc.aio.Channel
) -> None:
    """A NACK holds the type's version, but not a name subscribed since: held too, it waited
    for the type's next change (Envoy: a node Listener's new consumer chain whose routes
    already existed warmed until initial_fetch_timeout, then served without them). It is sent
    alone, the rejected resource is not, and the NACK stays in the status until the client
    takes a new version."""
    control_plane.cache.set_snapshot("n", snapshot())
    status = control_plane.server.status
    call = delta_call(channel)
    await call.write(dreq(types.ENDPOINT, resource_names_subscribe=["a"]))
    r1 = await call.read()
    nack = dreq(types.ENDPOINT, node="", response_nonce=r1.nonce)
    nack.error_detail.message = "endpoints a: invalid"
    await call.write(nack)
    await call.write(dreq(types.ENDPOINT, node="", resource_names_subscribe=["b"]))
    await call.write(dreq(types.LISTENER, node=""))  # the probe
    r2 = await call.read()
    assert r2.type_url == types.ENDPOINT, "the subscription must be answered before the probe"
    assert r2.system_version_info == r1.system_version_info
    assert [x.name for x in r2.resources] == ["b"]
    assert (await call.read()).type_url == types.LISTENER
    await call.write(dreq(types.ENDPOINT, node="", response_nonce=r2.nonce))
    await call.write(dreq(types.CLUSTER, node=""))  # the probe
    assert (await call.read()).type_url == types.CLUSTER  # a is not resent
    ts = status.type_status("n", types.ENDPOINT)
    assert set(ts.acked_resources) == {"b"}
    assert ts.last_nack is not None and ts.version_acked == ""

    control_plane.cache.set_snapshot("n", snapshot(port=81))
    r3 = await call.read()
    assert sorted(x.name for x in r3.resources) == ["a", "b"]
    call.cancel()


@pytest.mark.parametrize("order", ["nack, then change", "change, then nack"])
async def test_a_changed_clusters_endpoints_are_resent_while_another_nack_holds_eds(
    control_plane: ControlPlane, channel: grpc.aio.Channel, order: str
) -> None:
    """Envoy re-warms a changed cluster and waits for its endpoints, which the server resends.
    A NACK of other endpoints held them too: the cluster warmed until initial_fetch_timeout,
    then came up with no endpoints, until the next endpoint change."""

    def snap(b_port: int, a_timeout: int) -> Snapshot:
        return Snapshot.from_messages(
            [
                R.eds_cluster("a", a_timeout),
                R.endpoints("a", 80),
                R.eds_cluster("b"),
                R.endpoints("b", b_port),
            ]
        )

    control_plane.cache.set_snapshot("n", snap(80, 1))
    call = delta_call(channel)
    await call.write(dreq(types.CLUSTER))
    await call.write(dreq(types.ENDPOINT, node="", resource_names_subscribe=["a", "b"]))
    for _ in range(2):
        r = await call.read()
        await call.write(dreq(r.type_url, node="", response_nonce=r.nonce))
    control_plane.cache.set_snapshot("n", snap(81, 1))
    r1 = await call.read()
    assert r1.type_url == types.ENDPOINT and [x.name for x in r1.resources] == ["b"]
    nack = dreq(types.ENDPOINT, node="", response_nonce=r1.nonce)
    nack.error_detail.message = "endpoints b: invalid"
    status = control_plane.server.status
    if order == "nack, then change":
        await call.write(nack)
        await eventually(lambda: status.type_status("n", types.ENDPOINT).last_nack)
    control_plane.cache.set_snapshot("n", snap(81, 2))  # cluster a changes, endpoints do not
    if order == "change, then nack":
        await call.write(nack)
    r2 = await call.read()
    assert r2.type_url == types.CLUSTER and [x.name for x in r2.resources] == ["a"]
    await call.write(dreq(types.CLUSTER, node="", response_nonce=r2.nonce))
    await call.write(dreq(types.LISTENER, node=""))  # the probe
    r3 = await call.read()
    assert r3.type_url == types.ENDPOINT, "a's endpoints must be resent before the probe"
    assert [x.name for x in r3.resources] == ["a"]  # and not the rejected b
    call.cancel()


async def test_a_delta_nack_is_cleared_once_the_client_acks_a_revert_to_what_it_holds(
    control_plane: ControlPlane, channel: grpc.aio.Channel
) -> None:
    """After a NACK the snapshot goes back to what the client holds: there is nothing to send,
    but the new version is still answered (empty), and the client's ACK clears the NACK from
    the node's status."""
    s1 = snapshot()
    control_plane.cache.set_snapshot("n", s1)
    status = control_plane.server.status
    call = delta_call(channel)
    await call.write(dreq(types.CLUSTER))
    r1 = await call.read()
    await call.write(dreq(types.CLUSTER, node="", response_nonce=r1.nonce))
    control_plane.cache.set_snapshot("n", snapshot(clusters=("a", "b", "c")))
    r2 = await call.read()
    nack = dreq(types.CLUSTER, node="", response_nonce=r2.nonce)
    nack.error_detail.message = "cluster c: invalid"
    await call.write(nack)
    await eventually(lambda: status.snapshot()["n"]["types"]["cds"]["last_nack"])

    control_plane.cache.set_snapshot("n", s1)  # the user reverts
    await call.write(dreq(types.LISTENER, node=""))
    r3 = await call.read()
    assert r3.type_url == types.CLUSTER, "the revert must be answered before the probe"
    assert r3.system_version_info == s1.version(types.CLUSTER)
    assert not r3.resources and not r3.removed_resources
    await call.write(dreq(types.CLUSTER, node="", response_nonce=r3.nonce))

    def cds() -> Any:
        return status.snapshot()["n"]["types"]["cds"]

    await eventually(lambda: cds()["last_nack"] is None)
    assert cds()["version_acked"] == s1.version(types.CLUSTER)
    call.cancel()


async def test_a_first_request_without_node_id_is_refused(
    control_plane: ControlPlane, channel: grpc.aio.Channel
) -> None:
    call = sotw_call(channel)
    await call.write(req(types.CLUSTER, node=""))
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await call.read()
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "node.id" in (err.value.details() or "")


class _BrokenWatcher:
    """A `ConfigWatcher` with a bug."""

    def create_watch(self, request: Any, respond: Any) -> Any:
        raise RuntimeError("a bug in the watcher")

    def create_delta_watch(self, request: Any, respond: Any) -> Any:
        raise RuntimeError("a bug in the watcher")


async def test_a_failure_in_the_server_ends_the_stream_with_internal_and_is_logged(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """It ended the stream with OK and was logged nowhere: to Envoy a normal close, to the
    operator nothing at all."""
    server = AdsServer(_BrokenWatcher())
    port = await server.start()
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as ch:
            call = sotw_call(ch)
            await call.write(req(types.CLUSTER))
            with pytest.raises(grpc.aio.AioRpcError) as err:
                await call.read()
            assert err.value.code() == grpc.StatusCode.INTERNAL
    finally:
        await server.stop(grace=0)
    logged = [r for r in caplog.records if r.exc_info and "bug" in str(r.exc_info[1])]
    assert logged and "node n" in logged[0].getMessage()


async def test_health_service_reports_serving(channel: grpc.aio.Channel) -> None:
    stub = health_pb2_grpc.HealthStub(channel)
    resp = await stub.Check(health_pb2.HealthCheckRequest(service=""))
    assert resp.status == health_pb2.HealthCheckResponse.SERVING
