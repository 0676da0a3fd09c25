"""Programmed across replicas, between two pipelines: the leader reads its peer's verdicts
over HTTP (`GET /programmed` on the peer's real listener) and counts the peer's nodes only
for the generation it built itself. The nodes' ACKs are recorded on the status trackers
directly, as the ADS server records them (tests/kube/test_peers.py does it with real Envoys).
"""

from __future__ import annotations

import contextlib
import copy
import logging
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import Any

import aiohttp
import pytest

from nodemesh.controlplane.conditions import Condition
from nodemesh.controlplane.files import FilesSource
from nodemesh.controlplane.http import StatusServer
from nodemesh.controlplane.peers import PeerReport, Peers
from nodemesh.controlplane.pipeline import Pipeline
from nodemesh.controlplane.store import ObjectKey, Store
from nodemesh.xds.cache import SnapshotCache
from nodemesh.xds.server import StatusTracker
from tests.controlplane.test_programmed import EXAMPLES, ROUTE, _connect_and_ack
from tests.support import free_port


def programmed(p: Pipeline) -> Condition:
    return next(c for c in p.conditions()[ROUTE] if c.type == "Programmed")


async def test_the_leader_waits_for_a_peer_to_build_the_generation_it_built() -> None:
    """The examples' Nodes: node-a's Envoy is connected to the leader a, node-b's to b. a's
    route changes before b's store has the change: Pending, naming b, until b built it and
    node-b ACKed. A peer that stops answering is left out once its report is stale: node-b is
    then moving for `move_grace`, then connected nowhere, and holds the route back."""
    async with two_replicas() as r:
        assert programmed(r.a) == Condition(
            "Programmed", "True", "Programmed", "ACKed by 2 node(s)", 1, "Service/reviews:80"
        )
        first = r.peers.reports()["replica-b"]
        await r.peers.poll(r.session)
        assert r.peers.reports()["replica-b"].objects is first.objects, "not a 304"

        await r.changes(ROUTE, heavier)
        await r.poll()
        c = programmed(r.a)
        assert (c.status, c.reason, c.observed_generation) == ("False", "Pending", 2)
        assert c.message == "waiting for replica replica-b to build generation 2"

        route = copy.deepcopy(dict(r.stores[0].get(ROUTE) or {}))
        del route["metadata"]["generation"]  # (b's store counts it too)
        r.stores[1].apply(route)
        await r.b.rebuild()
        await r.poll()
        c = programmed(r.a)  # b's verdict for node-b, which has not ACKed it yet
        assert (c.status, c.reason) == ("False", "Pending")
        assert c.message == (
            "waiting for ACK from node-b: rds outbound, node-b: rds outbound/shop/reviews:80"
            " (replica replica-b)"
        )
        _connect_and_ack(r.b, r.status_b, "node-b")
        r.b._update_conditions()
        await r.poll()
        assert programmed(r.a).status == "True" and programmed(r.a).observed_generation == 2

        await r.http.stop()
        await r.poll(r.peers.stale_after / 2)
        assert programmed(r.a).status == "True", "a report is used until it is stale"
        await r.poll(r.peers.stale_after / 2 + 1)
        assert programmed(r.a).status == "True", "then node-b is moving, for move_grace"
        await r.poll(r.peers.move_grace)
        c = programmed(r.a)
        assert (c.status, c.reason) == ("False", "Pending"), c
        assert c.message.startswith("waiting for ACK from node-b: "), c
        assert "replica" not in c.message, c
        shown = r.a.status_json()["peers"]["replica-b"]  # and /status says why
        assert shown["counted"] is False and "ClientConnectorError" in shown["error"], shown


@dataclass
class TwoReplicas:
    """Replicas a (the leader, node-a's Envoy) and b (node-b's), both built from the
    examples and ACKed; a polls b over HTTP on a clock of its own (`now`)."""

    stores: tuple[Store, Store]
    a: Pipeline
    b: Pipeline
    status_a: StatusTracker
    status_b: StatusTracker
    streams_b: dict[str, object]
    peers: Peers
    session: aiohttp.ClientSession
    now: list[float]
    http: StatusServer  # b's listener

    async def poll(self, seconds: float = 1.0) -> None:
        """Time goes by, a polls b, and recomputes (what the subscription schedules)."""
        self.now[0] += seconds
        await self.peers.poll(self.session)
        self.a._update_conditions()

    async def leaves_b(self, how: str = "cut") -> None:
        """node-b's Envoy leaves b: "cut" at the end of b's drain (a rolling update stops
        b; a has seen b draining before), or on its own: "went" while b drains, "before" b
        drains (a hears of both at once), or "gone" while b goes on (it stopped, or
        restarted)."""
        if how in ("cut", "went"):
            self.b.drain()
            self.b._update_conditions()
            await self.poll()
            self.b.drain(cut_in=0.0 if how == "cut" else 30.0)
        self.status_b.stream_closed("node-b", self.streams_b["node-b"])
        if how == "before":
            self.b.drain()
        self.b._update_conditions()

    async def changes(self, key: ObjectKey, change: Callable[[dict[str, Any]], None]) -> None:
        """`change` to the object `key` in a's store, built, and ACKed by node-a."""
        obj = copy.deepcopy(dict(self.stores[0].get(key) or {}))
        change(obj)
        obj["metadata"].pop("generation", None)  # (the store counts it, as in files mode)
        self.stores[0].apply(obj)
        await self.a.rebuild()
        _connect_and_ack(self.a, self.status_a, "node-a")


@contextlib.asynccontextmanager
async def two_replicas() -> AsyncIterator[TwoReplicas]:
    stores = Store(), Store()
    for store in stores:
        FilesSource(EXAMPLES, store).scan()
    status_a, status_b = StatusTracker(), StatusTracker()
    a = Pipeline(stores[0], SnapshotCache(), status_a)
    b = Pipeline(stores[1], SnapshotCache(), status_b)
    await a.rebuild()
    await b.rebuild()
    _connect_and_ack(a, status_a, "node-a")
    streams = _connect_and_ack(b, status_b, "node-b")
    status_b.add_listener(b._on_ack)  # (not started: what b sees while it drains)
    b._update_conditions()
    http = StatusServer(b)
    port = await http.start("127.0.0.1", 0)
    now = [0.0]
    peers = Peers(lambda: {"replica-b": f"http://127.0.0.1:{port}"}, clock=lambda: now[0])
    a.use_peers(peers)
    try:
        async with aiohttp.ClientSession() as session:
            r = TwoReplicas(stores, a, b, status_a, status_b, streams, peers, session, now, http)
            await r.poll()
            assert programmed(a).message == "ACKed by 2 node(s)"
            yield r
    finally:
        await http.stop()


def condition(p: Pipeline, key: ObjectKey = ROUTE) -> Condition:
    return next(c for c in p.conditions()[key] if c.type == "Programmed")


def heavier(route: dict[str, Any]) -> None:
    route["spec"]["rules"][-1]["backendRefs"][0]["weight"] += 1


async def test_a_node_moving_between_replicas_keeps_verdicts_of_what_did_not_change() -> None:
    """A rolling update of the control plane: b drains, node-b's Envoy leaves it and is
    connected nowhere until it reaches another replica. It keeps its config meanwhile, so
    the leader counts it with b's last verdicts, for `move_grace`, as long as the route's
    content is what those verdicts were for. Before, the route went Pending and back on every
    replica the update replaced (twice the objects in status writes, and a Programmed=False
    for anyone alerting on it)."""
    async with two_replicas() as r:
        await r.leaves_b()
        await r.poll()
        assert set(r.peers.departed()) == {"node-b"}
        assert r.a.status_json()["peers"]["replica-b"]["moving"] == ["node-b"]
        assert condition(r.a) == Condition(
            "Programmed", "True", "Programmed", "ACKed by 2 node(s)", 1, "Service/reviews:80"
        )

        await r.changes(ROUTE, heavier)
        r.a._update_conditions()
        c = condition(r.a)  # node-b cannot have it: it is connected nowhere
        assert (c.status, c.reason, c.observed_generation) == ("False", "Pending", 2)
        assert c.message == "waiting for node-b to connect again (it left replica replica-b)"

        _connect_and_ack(r.a, r.status_a, "node-b")  # it reached the leader, and ACKed
        r.a._update_conditions()
        assert condition(r.a).message == "ACKed by 2 node(s)"
        assert condition(r.a).observed_generation == 2


@pytest.mark.parametrize("how", ["gone", "went", "before"])
async def test_a_node_whose_envoy_left_a_replica_on_its_own_is_not_moving(how: str) -> None:
    """node-b's Envoy went (it crashed, restarts, or its node went down) while b goes on, or
    while b drains, before the drain cut its stream, or a moment before b began to drain
    (b's /programmed says so: `left`): it holds nothing it can be counted with, so the route
    waits for it at once."""
    async with two_replicas() as r:
        await r.leaves_b(how)
        await r.poll()
        assert r.peers.reports()["replica-b"].left == frozenset({"node-b"})
        assert r.peers.departed() == {}
        c = condition(r.a)
        assert (c.status, c.reason) == ("False", "Pending"), c
        assert c.message.startswith("waiting for ACK from node-b: "), c


@pytest.mark.parametrize("noticed", ["before", "after"])
async def test_a_change_while_a_node_moves_holds_what_it_changed_back(noticed: str) -> None:
    """node-b left b; a Service the route sends to changes its port (the route's content
    changes, not its generation), before or after the leader noticed that node-b left. It
    cannot hold the change: Pending either way. Before review, a change that came before the
    leader's next poll was taken for the content node-b held."""

    def port_81(svc: dict[str, Any]) -> None:
        svc["spec"]["ports"][0]["port"] = 81

    async with two_replicas() as r:
        await r.leaves_b()
        if noticed == "after":
            await r.poll()
        await r.changes(ObjectKey("Service", "shop", "reviews-v2"), port_81)
        await r.poll()
        assert set(r.peers.departed()) == {"node-b"}
        c = condition(r.a)
        assert (c.status, c.reason, c.observed_generation) == ("False", "Pending", 1), c
        assert c.message == "waiting for node-b to connect again (it left replica replica-b)"


async def test_endpoints_that_change_while_a_node_moves_hold_the_policy_on_them_back() -> None:
    """A TrafficPolicy's part is in its Service's endpoints resource: pod churn there while
    node-b moves, before the leader noticed, holds the policy back, not the routes."""
    policy = ObjectKey("TrafficPolicy", "shop", "ratings-defaults")

    def one_endpoint_less(eps: dict[str, Any]) -> None:
        eps["endpoints"] = eps["endpoints"][:-1]

    async with two_replicas() as r:
        assert condition(r.a, policy).status == "True"
        await r.leaves_b()
        await r.changes(ObjectKey("EndpointSlice", "shop", "ratings-abc12"), one_endpoint_less)
        await r.poll()
        c = condition(r.a, policy)
        assert (c.status, c.reason) == ("False", "Pending"), c
        assert "node-b to connect again" in c.message, c
        assert condition(r.a).status == "True", "the route's content is unchanged"


async def test_a_moving_node_that_came_here_and_left_again_is_not_moving_any_more() -> None:
    """node-b left b, connected to the leader, and went again: what it holds now is what the
    leader saw, not b's verdicts (a restarted Envoy holds nothing)."""
    async with two_replicas() as r:
        await r.leaves_b()
        await r.poll()
        here = _connect_and_ack(r.a, r.status_a, "node-b")
        r.a._update_conditions()
        assert condition(r.a).message == "ACKed by 2 node(s)"
        r.status_a.stream_closed("node-b", here["node-b"])
        await r.poll()
        assert set(r.peers.departed()) == {"node-b"}, "b's departure is still in its grace"
        c = condition(r.a)
        assert (c.status, c.reason) == ("False", "Pending"), c
        assert c.message.startswith("waiting for ACK from node-b: "), c


@pytest.mark.parametrize("b_then", ["goes on", "drains"])
async def test_a_node_that_went_while_its_peer_was_away_is_not_moving_once_it_answers(
    b_then: str,
) -> None:
    """b could not be reached (its loop blocked, its endpoint briefly not serving): node-b
    departed, and counts as moving. node-b's Envoy restarted meanwhile; b answers again
    without it, not draining, or draining (it was stopped), and says node-b left on its own:
    node-b did not move, and the route waits for it."""
    async with two_replicas() as r:
        reachable = r.peers.targets
        r.peers.targets = lambda: {"replica-b": f"http://127.0.0.1:{free_port()}"}
        await r.poll(r.peers.stale_after + 1)
        assert set(r.peers.departed()) == {"node-b"}
        assert condition(r.a).status == "True", "moving"
        await r.leaves_b("gone" if b_then == "goes on" else "before")
        r.peers.targets = reachable
        await r.poll()
        assert r.peers.departed() == {}
        c = condition(r.a)
        assert (c.status, c.reason) == ("False", "Pending"), c
        assert c.message.startswith("waiting for ACK from node-b: "), c


def test_a_node_one_peer_says_went_does_not_move_with_another_peers_report() -> None:
    """node-1 was listed by c, where its Envoy is, and by draining b (an old stream not yet
    seen closed). In one poll c no longer lists it (its Envoy stopped) and b's drain cut the
    old stream: node-1 did not move, whatever b's report says."""
    now = [10.0]
    peers = Peers(dict, clock=lambda: now[0])
    b = PeerReport("b", ("node-1",), {}, '"b1"', 9.0, draining=True)
    c = PeerReport("c", ("node-1",), {}, '"c1"', 9.5)
    peers._fresh = {"b": b, "c": c}
    fresh = {
        "b": PeerReport("b", (), {}, '"b2"', 10.0, draining=True),
        "c": PeerReport("c", (), {}, '"c2"', 10.0),
    }
    assert peers._depart(fresh, now[0]) == {}


async def test_a_draining_peer_holds_back_what_it_will_not_build_any_more() -> None:
    """A draining replica's store no longer follows the cluster (its operator stopped
    first): an endpoint change the leader built will not reach b's node Envoys until they
    move. Before review, b's verdict for the policy's generation, unchanged, said True."""
    policy = ObjectKey("TrafficPolicy", "shop", "ratings-defaults")

    def one_endpoint_less(eps: dict[str, Any]) -> None:
        eps["endpoints"] = eps["endpoints"][:-1]

    async with two_replicas() as r:
        r.b.drain()
        await r.poll()
        assert condition(r.a, policy).status == "True", "nothing changed yet"
        await r.changes(ObjectKey("EndpointSlice", "shop", "ratings-abc12"), one_endpoint_less)
        await r.poll()
        c = condition(r.a, policy)
        assert (c.status, c.reason) == ("False", "Pending"), c
        assert c.message == (
            "waiting for the node Envoys of replica replica-b, which is shutting down, to "
            "connect to another replica"
        )
        assert condition(r.a).status == "True", "the route's content is unchanged"


async def test_a_moving_node_that_connects_nowhere_holds_objects_back_after_the_grace() -> None:
    """node-b left b and reaches no replica: counted with b's verdicts for `move_grace`
    seconds, then as not connected (Pending, naming it); the subscribers are told."""
    async with two_replicas() as r:
        changes: list[float] = []
        r.peers.subscribe(lambda: changes.append(r.now[0]))
        await r.leaves_b()
        await r.poll()
        assert condition(r.a).status == "True"
        await r.poll(r.peers.move_grace - 0.5)  # 9.5 s after it left
        assert condition(r.a).status == "True"
        changes.clear()
        await r.poll()
        assert changes, "the subscribers are told: the pipeline recomputes"
        assert r.peers.departed() == {}
        c = condition(r.a)
        assert (c.status, c.reason) == ("False", "Pending"), c
        assert c.message.startswith("waiting for ACK from node-b: "), c


async def test_a_peer_that_never_answers_is_one_warning_per_outage(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A peer found in the Service but never reached (a --peers-port naming another port, an
    --http-listen on 127.0.0.1): its node Envoys hold objects Pending, and the log says why
    with one warning, as it does once per outage for a peer that stops answering. Before, a
    peer that had never answered was only an INFO line."""
    port = free_port()
    now = [0.0]
    peers = Peers(lambda: {"replica-b": f"http://127.0.0.1:{port}"}, clock=lambda: now[0])

    def warnings() -> list[str]:
        return [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]

    b = Pipeline(Store(), SnapshotCache(), StatusTracker())
    await b.rebuild()
    http = StatusServer(b)
    caplog.set_level(logging.INFO, logger="nodemesh.controlplane.peers")
    try:
        async with aiohttp.ClientSession() as session:
            for _ in range(3 * int(peers.stale_after)):
                await peers.poll(session)
                now[0] += 1.0
            (warning,) = warnings()
            assert warning.startswith(
                f"peer replica-b (http://127.0.0.1:{port}) has not answered since it was found"
                " 6 s ago (check --peers-port, and that its --http-listen listens on the pod's"
                " address): its node Envoys are left out of Programmed until it does"
            ), warning
            assert peers.describe()["replica-b"]["counted"] is False

            await http.start("127.0.0.1", port)
            await peers.poll(session)
            assert peers.describe()["replica-b"]["counted"] is True
            await http.stop()
            for _ in range(3 * int(peers.stale_after)):
                now[0] += 1.0
                await peers.poll(session)
            assert len(warnings()) == 2, warnings()
            assert warnings()[1].startswith("peer replica-b (http://127.0.0.1:"), warnings()
            assert "has not answered for 6 s: its node Envoys are left out" in warnings()[1]
    finally:
        await http.stop()
