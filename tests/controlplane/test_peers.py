"""Programmed across replicas, between two pipelines: the leader reads its peer's verdicts
over HTTP (`GET /programmed` on the peer's real listener) and counts the peer's nodes only
for the generation it built itself. The nodes' ACKs are recorded on the status trackers
directly, as the ADS server records them (tests/kube/test_peers.py does it with real Envoys).
"""

from __future__ import annotations

import copy
import logging

import aiohttp
import pytest

from nodemesh.controlplane.conditions import Condition
from nodemesh.controlplane.files import FilesSource
from nodemesh.controlplane.http import StatusServer
from nodemesh.controlplane.peers import Peers
from nodemesh.controlplane.pipeline import Pipeline
from nodemesh.controlplane.store import Store
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
    then connected nowhere, and holds the route back."""
    stores = Store(), Store()
    for store in stores:
        FilesSource(EXAMPLES, store).scan()
    status_a, status_b = StatusTracker(), StatusTracker()
    a = Pipeline(stores[0], SnapshotCache(), status_a)
    b = Pipeline(stores[1], SnapshotCache(), status_b)
    await a.rebuild()
    await b.rebuild()
    _connect_and_ack(a, status_a, "node-a")
    _connect_and_ack(b, status_b, "node-b")
    b._update_conditions()
    http = StatusServer(b)
    port = await http.start("127.0.0.1", 0)
    now = [0.0]
    peers = Peers(lambda: {"replica-b": f"http://127.0.0.1:{port}"}, clock=lambda: now[0])
    a.use_peers(peers)
    try:
        async with aiohttp.ClientSession() as session:
            await peers.poll(session)
            a._update_conditions()  # what the peers' subscription schedules on the loop
            assert programmed(a) == Condition(
                "Programmed", "True", "Programmed", "ACKed by 2 node(s)", 1, "Service/reviews:80"
            )
            first = peers.reports()["replica-b"]
            await peers.poll(session)
            assert peers.reports()["replica-b"].objects is first.objects, "not a 304"

            route = copy.deepcopy(dict(stores[0].get(ROUTE) or {}))
            route["spec"]["rules"][-1]["backendRefs"][0]["weight"] += 1
            del route["metadata"]["generation"]  # (the store counts it, as in files mode)
            stores[0].apply(route)
            await a.rebuild()
            _connect_and_ack(a, status_a, "node-a")
            await peers.poll(session)
            a._update_conditions()
            c = programmed(a)
            assert (c.status, c.reason, c.observed_generation) == ("False", "Pending", 2)
            assert c.message == "waiting for replica replica-b to build generation 2"

            stores[1].apply(route)
            await b.rebuild()
            await peers.poll(session)
            a._update_conditions()
            c = programmed(a)  # b's verdict for node-b, which has not ACKed it yet
            assert (c.status, c.reason) == ("False", "Pending")
            assert c.message == (
                "waiting for ACK from node-b: rds outbound, node-b: rds outbound/shop/reviews:80"
                " (replica replica-b)"
            )
            _connect_and_ack(b, status_b, "node-b")
            b._update_conditions()
            await peers.poll(session)
            a._update_conditions()
            assert programmed(a).status == "True" and programmed(a).observed_generation == 2

            await http.stop()
            now[0] += peers.stale_after / 2
            await peers.poll(session)
            a._update_conditions()
            assert programmed(a).status == "True", "a report is used until it is stale"
            now[0] += peers.stale_after
            await peers.poll(session)
            a._update_conditions()
            assert programmed(a).status == "True", "then node-b is moving, for move_grace"
            now[0] += peers.move_grace
            await peers.poll(session)
            a._update_conditions()
            c = programmed(a)
            assert (c.status, c.reason) == ("False", "Pending"), c
            assert c.message.startswith("waiting for ACK from node-b: "), c
            assert "replica" not in c.message, c
            shown = a.status_json()["peers"]["replica-b"]  # and /status says why
            assert shown["counted"] is False and "ClientConnectorError" in shown["error"], shown
    finally:
        await http.stop()


async def test_a_node_moving_between_replicas_keeps_verdicts_of_what_did_not_change() -> None:
    """A rolling update of the control plane: node-b's Envoy leaves replica b (which stops) and
    is connected nowhere until it reaches another replica. It keeps its config meanwhile, so
    the leader counts it with b's last verdicts, for `move_grace`, as long as the route did
    not change. Before, the route went Pending and back on every replica the update replaced
    (twice the objects in status writes, and a Programmed=False for anyone alerting on it)."""
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
    b._update_conditions()
    http = StatusServer(b)
    port = await http.start("127.0.0.1", 0)
    now = [0.0]
    peers = Peers(lambda: {"replica-b": f"http://127.0.0.1:{port}"}, clock=lambda: now[0])
    a.use_peers(peers)
    try:
        async with aiohttp.ClientSession() as session:
            await peers.poll(session)
            a._update_conditions()
            assert programmed(a).message == "ACKed by 2 node(s)"

            status_b.stream_closed("node-b", streams["node-b"])  # b drains: node-b leaves
            b._update_conditions()
            now[0] += 1.0
            await peers.poll(session)
            assert set(peers.departed()) == {"node-b"}
            assert a.status_json()["peers"]["replica-b"]["moving"] == ["node-b"]
            a._update_conditions()
            assert programmed(a) == Condition(
                "Programmed", "True", "Programmed", "ACKed by 2 node(s)", 1, "Service/reviews:80"
            )

            route = copy.deepcopy(dict(stores[0].get(ROUTE) or {}))
            route["spec"]["rules"][-1]["backendRefs"][0]["weight"] += 1
            del route["metadata"]["generation"]
            stores[0].apply(route)
            await a.rebuild()
            _connect_and_ack(a, status_a, "node-a")
            a._update_conditions()
            c = programmed(a)  # node-b cannot have it: it is connected nowhere
            assert (c.status, c.reason, c.observed_generation) == ("False", "Pending", 2)
            assert c.message == "waiting for node-b to connect again (it left replica replica-b)"

            _connect_and_ack(a, status_a, "node-b")  # it reached the leader, and ACKed
            a._update_conditions()
            assert programmed(a).message == "ACKed by 2 node(s)"
            assert programmed(a).observed_generation == 2
    finally:
        await http.stop()


async def test_a_moving_node_that_connects_nowhere_holds_objects_back_after_the_grace() -> None:
    """node-b left replica b and reaches no replica: counted with b's verdicts for
    `move_grace` seconds, then as not connected (Pending, naming it)."""
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
    b._update_conditions()
    http = StatusServer(b)
    port = await http.start("127.0.0.1", 0)
    now = [0.0]
    peers = Peers(lambda: {"replica-b": f"http://127.0.0.1:{port}"}, clock=lambda: now[0])
    a.use_peers(peers)
    changes = []
    peers.subscribe(lambda: changes.append(now[0]))
    try:
        async with aiohttp.ClientSession() as session:
            await peers.poll(session)
            status_b.stream_closed("node-b", streams["node-b"])
            b._update_conditions()
            await peers.poll(session)
            a._update_conditions()
            assert programmed(a).status == "True"
            now[0] += peers.move_grace - 0.5
            await peers.poll(session)
            a._update_conditions()
            assert programmed(a).status == "True"
            now[0] += 1.0
            changes.clear()
            await peers.poll(session)
            assert changes, "the subscribers are told: the pipeline recomputes"
            assert peers.departed() == {}
            a._update_conditions()
            c = programmed(a)
            assert (c.status, c.reason) == ("False", "Pending"), c
            assert c.message.startswith("waiting for ACK from node-b: "), c
    finally:
        await http.stop()


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
