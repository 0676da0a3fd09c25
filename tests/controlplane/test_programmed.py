"""`Programmed` from what nodes ACKed, driven through the status tracker as the ADS server
drives it (the Envoy end is tested in tests/e2e/test_status.py; here the ACKs are scripted
so that thousands of versions can go by)."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import pytest
from envoy.service.discovery.v3 import discovery_pb2

from nodemesh.api import NODE_TYPE_URL, SERVICE_TYPE_URL
from nodemesh.controlplane import pipeline as pipeline_module
from nodemesh.controlplane.builder import LabelSelector
from nodemesh.controlplane.files import FilesSource
from nodemesh.controlplane.pipeline import Pipeline
from nodemesh.controlplane.status_cli import render as render_status
from nodemesh.controlplane.store import ObjectKey, Store
from nodemesh.xds import types
from nodemesh.xds.cache import SnapshotCache
from nodemesh.xds.server import NackRecord, StatusTracker
from nodemesh.xds.server._streams import SotwStream
from tests.support import eventually

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"
ROUTE = ObjectKey("HTTPRoute", "shop", "reviews")


def _programmed(p: Pipeline) -> tuple[str, str]:
    c = next(c for c in p.conditions()[ROUTE] if c.type == "Programmed")
    return c.status, c.reason


def _connect_and_ack(p: Pipeline, status: StatusTracker, *nodes: str) -> dict[str, object]:
    """What the ADS server records when each node's stream opens, asks for each type (the
    stream speaks for it from then on) and ACKs the snapshot; by node, its stream (for
    `status.stream_closed`)."""
    assert p.snapshot is not None
    streams = {}
    for node in nodes:
        status.stream_opened(node)
        streams[node] = stream = object()
        for t in (types.CLUSTER, types.ENDPOINT, types.ROUTE, types.LISTENER):
            status.resumed(node, t, "", {}, stream=stream)
            held = {n: r.version for n, r in p.snapshot.resources(t).items()}
            status.acked(node, t, p.snapshot.version(t) or "", held, replace=True)
    return streams


def _ack(p: Pipeline, status: StatusTracker, node: str, *type_urls: str) -> None:
    """`node` ACKs the current snapshot's resources of `type_urls`."""
    assert p.snapshot is not None
    for t in type_urls:
        held = {n: r.version for n, r in p.snapshot.resources(t).items()}
        status.acked(node, t, p.snapshot.version(t) or "", held, replace=True)


def _nack(p: Pipeline, status: StatusTracker, node: str, type_url: str, message: str) -> None:
    """`node` rejects the current snapshot's resources of `type_url` with Envoy's `message`."""
    assert p.snapshot is not None
    sent = {n: r.version for n, r in p.snapshot.resources(type_url).items()}
    version = p.snapshot.version(type_url) or ""
    status.nacked(
        NackRecord(node, type_url, version, "7", tuple(sorted(sent)), 3, message, 0.0, sent), sent
    )


async def test_a_node_behind_on_a_route_stays_pending_however_many_versions_go_by() -> None:
    """node-b ACKed the route's old version and went away; node-a ACKs everything since. After
    many endpoint changes (more versions than the history keeps) the route must still say
    node-b has not got it."""
    store, status = Store(), StatusTracker()
    FilesSource(EXAMPLES, store).scan()
    p = Pipeline(store, SnapshotCache(), status)
    p.history_slack = 10
    await p.rebuild()

    def ack(node: str) -> None:
        _ack(p, status, node, types.CLUSTER, types.ENDPOINT, types.ROUTE, types.LISTENER)

    for node in ("node-a", "node-b"):
        status.stream_opened(node)
        ack(node)
    p._update_conditions()
    assert _programmed(p) == ("True", "Programmed")

    status.stream_closed("node-b")
    route = copy.deepcopy(dict(store.get(ROUTE)))
    route["spec"]["rules"][-1]["backendRefs"][0]["weight"] += 1
    store.apply(route)
    await p.rebuild()
    ack("node-a")
    p._update_conditions()
    assert _programmed(p) == ("False", "Pending")

    (slice_key,) = [k for k in store.keys("EndpointSlice") if k.name.startswith("reviews")][:1]
    for i in range(300):
        obj = copy.deepcopy(dict(store.get(slice_key)))
        obj["endpoints"][0]["addresses"] = [f"10.244.{1 + i // 250}.{i % 250 + 1}"]
        store.apply(obj)
        await p.rebuild()
        ack("node-a")
        p._update_conditions()
        assert _programmed(p) == ("False", "Pending"), f"after {i + 1} endpoint changes"


async def test_a_lagging_node_that_disconnects_stops_holding_routes_back() -> None:
    """A node without a Node object counts while it is connected: when it goes away without
    ACKing, the route is Programmed again at once, not at the next ACK."""
    store, status = Store(), StatusTracker()
    FilesSource(EXAMPLES, store).scan()
    p = Pipeline(store, SnapshotCache(), status)
    await p.start()
    try:
        assert p.snapshot is not None
        _connect_and_ack(p, status, "node-a", "node-b")
        status.stream_opened("laggard")
        await eventually(lambda: _programmed(p) == ("False", "Pending"))
        status.stream_closed("laggard")
        await eventually(lambda: _programmed(p) == ("True", "Programmed"), timeout=2)
    finally:
        await p.stop()


async def test_an_endpoint_change_makes_only_the_policies_that_carry_it_pending() -> None:
    """Nothing about the nodes changes, so conditions are kept for objects whose resources
    did not change: a policy whose cluster's endpoints changed must still be recomputed."""
    store, status = Store(), StatusTracker()
    FilesSource(EXAMPLES, store).scan()
    p = Pipeline(store, SnapshotCache(), status)
    await p.rebuild()
    assert p.snapshot is not None
    _connect_and_ack(p, status, "node-a", "node-b")
    p._update_conditions()
    ratings = ObjectKey("TrafficPolicy", "shop", "ratings-defaults")
    other = ObjectKey("TrafficPolicy", "shop", "payments-resilience")

    def programmed(key: ObjectKey) -> str:
        return next(c.status for c in p.conditions()[key] if c.type == "Programmed")

    assert (programmed(ratings), programmed(other)) == ("True", "True")
    key = next(k for k in store.keys("EndpointSlice") if k.name.startswith("ratings"))
    obj = copy.deepcopy(dict(store.get(key)))
    obj["endpoints"][0]["addresses"] = ["10.244.9.9"]
    store.apply(obj)
    await p.rebuild()  # no ACK yet: the nodes hold the old endpoints

    assert programmed(ratings) == "False"
    assert programmed(other) == "True", "a policy over other endpoints is not held back"


async def test_a_policy_that_applies_nowhere_is_not_programmed() -> None:
    """A policy with a misspelt target, and one whose only section an older policy sets: no
    node's configuration holds either, so no node can have ACKed them (no Envoy is even
    connected at first). They said "ACKed by 2 node(s)", and `kubectl get tp` showed them
    Programmed. Fixed, the misspelt one is programmed like any other."""
    store, status = Store(), StatusTracker()
    FilesSource(EXAMPLES, store).scan()
    typo: dict[str, Any] = {
        "apiVersion": "nodemesh.io/v1alpha1",
        "kind": "TrafficPolicy",
        "metadata": {"name": "typo", "namespace": "shop"},
        "spec": {
            "targetRefs": [{"kind": "Service", "name": "ratngs"}],
            "circuitBreaker": {"maxConnections": 100},
        },
    }
    late: dict[str, Any] = {
        "apiVersion": "nodemesh.io/v1alpha1",
        "kind": "TrafficPolicy",
        "metadata": {
            "name": "late",
            "namespace": "shop",
            "creationTimestamp": "2030-01-01T00:00:00Z",
        },
        "spec": {
            "targetRefs": [{"kind": "Service", "name": "frontend"}],
            "faultInjection": {"abort": {"httpStatus": 500}},
        },
    }
    store.apply(typo)
    store.apply(late)
    p = Pipeline(store, SnapshotCache(), status)
    await p.rebuild()

    def programmed(name: str) -> tuple[str, str]:
        key = ObjectKey("TrafficPolicy", "shop", name)
        c = next(c for c in p.conditions()[key] if c.type == "Programmed")
        return c.status, c.reason

    assert programmed("typo") == ("False", "NothingToProgram")  # the Nodes, none connected
    assert programmed("late") == ("False", "NothingToProgram")
    _connect_and_ack(p, status, "node-a", "node-b")
    p._update_conditions()
    assert programmed("typo") == ("False", "NothingToProgram")
    assert programmed("late") == ("False", "NothingToProgram")
    assert programmed("frontend-chaos") == ("True", "Programmed")

    fixed = copy.deepcopy(typo)
    fixed["spec"]["targetRefs"][0]["name"] = "ratings"
    store.apply(fixed)
    await p.rebuild()
    assert programmed("typo") == ("False", "Pending")
    _connect_and_ack(p, status, "node-a", "node-b")
    p._update_conditions()
    assert programmed("typo") == ("True", "Programmed")


async def test_a_consumer_route_is_programmed_once_its_nodes_hold_their_own_listener() -> None:
    """examples/ has a consumer route in namespace qa. With a qa pod on node-a, node-a gets a
    Listener of its own (the chain that marks the pod's connections): the route is Programmed
    only once node-a ACKs that Listener, and a NACK of it is reported with Envoy's message;
    shop's own route does not depend on it."""

    store, status = Store(), StatusTracker()
    FilesSource(EXAMPLES, store).scan()
    p = Pipeline(store, SnapshotCache(), status)
    await p.rebuild()
    consumer = ObjectKey("HTTPRoute", "qa", "reviews-for-qa")

    def programmed(key: ObjectKey) -> tuple[str, str, str]:
        c = next(c for c in p.conditions()[key] if c.type == "Programmed")
        return c.status, c.reason, c.message

    def ack(node: str, listener: bool = True) -> None:
        snapshot = p.cache.get_snapshot(node)
        assert snapshot is not None
        for t in (types.CLUSTER, types.ENDPOINT, types.ROUTE, types.LISTENER):
            if t == types.LISTENER and not listener:
                continue
            held = {n: r.version for n, r in snapshot.resources(t).items()}
            status.acked(node, t, snapshot.version(t) or "", held, replace=True)

    for node in ("node-a", "node-b"):  # each node's Envoy on a stream of its own
        status.stream_opened(node)
        stream = object()
        for t in (types.CLUSTER, types.ENDPOINT, types.ROUTE, types.LISTENER):
            status.resumed(node, t, "", {}, stream=stream)
        ack(node)
    p._update_conditions()
    assert programmed(consumer)[:2] == ("True", "Programmed")  # no qa client anywhere yet

    def qa_pod(name: str, ip: str) -> dict[str, object]:
        return {
            "apiVersion": "v1",
            "kind": "Pod",
            "metadata": {"name": name, "namespace": "qa"},
            "spec": {"nodeName": "node-a"},
            "status": {"phase": "Running", "podIP": ip},
        }

    store.apply(qa_pod("runner", "10.244.1.50"))
    await p.rebuild()
    own = p.cache.get_snapshot("node-a")
    assert own is not None and own is not p.snapshot
    ack("node-a", listener=False)  # everything but its new Listener
    ack("node-b")
    p._update_conditions()
    assert programmed(consumer) == (
        "False",
        "Pending",
        "waiting for ACK from node-a: lds outbound",
    )
    assert programmed(ROUTE)[:2] == ("True", "Programmed")

    sent = {n: r.version for n, r in own.resources(types.LISTENER).items()}
    status.nacked(
        NackRecord(
            "node-a", types.LISTENER, own.version(types.LISTENER) or "", "n1", ("outbound",),
            13, "multiple filter chains with overlapping matching rules", 0.0, sent,
        ),
        sent,
    )  # fmt: skip
    p._update_conditions()
    assert programmed(consumer)[:2] == ("False", "Rejected")
    assert "overlapping matching rules" in programmed(consumer)[2]

    ack("node-a")
    p._update_conditions()
    assert programmed(consumer)[:2] == ("True", "Programmed")

    # node-a's Listener changes for others, with no ACK since: a new L7 Service (its chain),
    # and a client pod of another consumer namespace. qa's part is the same: still True.
    svc = copy.deepcopy(dict(store.get(ObjectKey("Service", "shop", "ratings"))))
    svc["metadata"] = {"name": "extra", "namespace": "shop"}
    svc["spec"] = {**svc["spec"], "clusterIP": "10.96.10.99"}
    route = copy.deepcopy(dict(store.get(ROUTE)))
    route["metadata"] = {"name": "extra", "namespace": "shop"}
    route["spec"]["parentRefs"] = [{"group": "", "kind": "Service", "name": "extra"}]
    other = copy.deepcopy(dict(store.get(consumer)))
    other["metadata"] = {"name": "reviews-for-team-b", "namespace": "team-b"}
    for obj in (
        svc,
        route,
        other,
        {
            **qa_pod("b-runner", "10.244.1.60"),
            "metadata": {"name": "b-runner", "namespace": "team-b"},
        },
    ):
        store.apply(obj)
    await p.rebuild()
    own_now = p.cache.get_snapshot("node-a")
    assert own_now is not None and own_now.version(types.LISTENER) != own.version(types.LISTENER)
    assert programmed(consumer)[:2] == ("True", "Programmed")
    assert programmed(ObjectKey("HTTPRoute", "team-b", "reviews-for-team-b"))[:2] == (
        "False",
        "Pending",
    )

    # a second qa pod on node-a: qa's part of node-a's Listener changes (a chain for the new
    # pod); the rebuild alone, with no ACK since, must take the route back to Pending
    store.apply(qa_pod("runner-2", "10.244.1.51"))
    await p.rebuild()
    assert programmed(consumer)[:2] == ("False", "Pending")
    assert programmed(ROUTE)[:2] == ("True", "Programmed")


async def test_a_fix_the_node_has_not_answered_yet_is_pending_not_rejected() -> None:
    """node-a rejects the routes with a change to reviews. A change elsewhere leaves reviews'
    rejected part as it was: still Rejected. A fix of reviews that node-a has not answered
    yet is not what it rejected: Pending, without the old message."""
    store, status = Store(), StatusTracker()
    FilesSource(EXAMPLES, store).scan()
    p = Pipeline(store, SnapshotCache(), status)
    await p.rebuild()
    _connect_and_ack(p, status, "node-a", "node-b")
    p._update_conditions()
    assert _programmed(p) == ("True", "Programmed")

    def message() -> str:
        return next(c.message for c in p.conditions()[ROUTE] if c.type == "Programmed")

    route = copy.deepcopy(dict(store.get(ROUTE)))
    route["spec"]["rules"][-1]["backendRefs"][0]["weight"] += 1
    store.apply(route)
    await p.rebuild()
    _nack(p, status, "node-a", types.ROUTE, "regex too big")
    p._update_conditions()
    assert _programmed(p) == ("False", "Rejected") and "regex too big" in message()

    ratings = copy.deepcopy(dict(store.get(ObjectKey("HTTPRoute", "shop", "ratings"))))
    ratings["spec"]["rules"][0]["timeouts"]["request"] = "4s"
    store.apply(ratings)
    await p.rebuild()
    assert _programmed(p) == ("False", "Rejected"), "reviews' part is the one node-a rejected"

    route["spec"]["rules"][-1]["backendRefs"][0]["weight"] += 1
    store.apply(route)
    await p.rebuild()
    assert _programmed(p) == ("False", "Pending")
    assert "regex too big" not in message() and "node-a" in message()


async def test_a_node_that_refused_the_outbound_listener_carries_nothing_new_through_it() -> None:
    """Every request goes through the outbound Listener. A Service that becomes L7 (its first
    route) adds a chain for its ClusterIP to it; node-a refuses that version (Envoy keeps the
    one before): the new route is Rejected with Envoy's message, and reviews, whose chains did
    not change, stays Programmed. A node that never held a Listener (its port taken, Envoy
    refused the first) carries nothing: every route is Rejected there. Both said True."""
    store, status = Store(), StatusTracker()
    FilesSource(EXAMPLES, store).scan()
    p = Pipeline(store, SnapshotCache(), status)
    await p.rebuild()
    _connect_and_ack(p, status, "node-a", "node-b")
    p._update_conditions()
    assert _programmed(p) == ("True", "Programmed")

    extra = ObjectKey("HTTPRoute", "shop", "extra")
    store.apply(
        {
            "apiVersion": "v1",
            "kind": "Service",
            "metadata": {"name": "extra", "namespace": "shop"},
            "spec": {"clusterIP": "10.96.10.99", "ports": [{"name": "http", "port": 80}]},
        }
    )
    store.apply(
        {
            "apiVersion": "gateway.networking.k8s.io/v1",
            "kind": "HTTPRoute",
            "metadata": {"name": "extra", "namespace": "shop"},
            "spec": {
                "parentRefs": [{"kind": "Service", "name": "extra"}],
                "rules": [{"backendRefs": [{"name": "extra", "port": 80}]}],
            },
        }
    )
    await p.rebuild()
    all_but_lds = (types.CLUSTER, types.ENDPOINT, types.ROUTE)
    _ack(p, status, "node-a", *all_but_lds)
    _nack(p, status, "node-a", types.LISTENER, "duplicate filter chain match")
    _ack(p, status, "node-b", *all_but_lds, types.LISTENER)
    p._update_conditions()

    def programmed(key: ObjectKey) -> tuple[str, str, str]:
        c = next(c for c in p.conditions()[key] if c.type == "Programmed")
        return c.status, c.reason, c.message

    assert programmed(extra) == (
        "False",
        "Rejected",
        "node node-a rejected lds 'outbound': duplicate filter chain match",
    )
    assert _programmed(p) == ("True", "Programmed")

    # node-c comes up with the outbound port taken: its first Listener is refused
    status.stream_opened("node-c")
    node_c = object()
    for t in (*all_but_lds, types.LISTENER):
        status.resumed("node-c", t, "", {}, stream=node_c)
    _ack(p, status, "node-c", *all_but_lds)
    _nack(p, status, "node-c", types.LISTENER, "cannot bind '127.0.0.1:15001': Address in use")
    p._update_conditions()
    assert programmed(ROUTE)[:2] == ("False", "Rejected")
    assert "node node-c rejected lds 'outbound': cannot bind" in programmed(ROUTE)[2]


class _SotwEnvoy:
    """An Envoy on a SotW stream as the ADS server sees it (the real `SotwStream`): a new one
    holds nothing (empty `version_info`), subscribes to every type and ACKs what `pump` reads."""

    def __init__(self, cache: SnapshotCache, status: StatusTracker, node: str) -> None:
        self.stream = SotwStream(cache, status)
        for t in (types.CLUSTER, types.LISTENER, types.ENDPOINT, types.ROUTE):
            first = discovery_pb2.DiscoveryRequest(type_url=t)
            first.node.id = node
            self.stream.handle(first)

    def pump(self) -> None:
        while not self.stream.queue.empty():
            data = self.stream.queue.get_nowait()
            assert data is not None
            resp = discovery_pb2.DiscoveryResponse.FromString(data)
            self.stream.handle(
                discovery_pb2.DiscoveryRequest(
                    type_url=resp.type_url,
                    version_info=resp.version_info,
                    response_nonce=resp.nonce,
                )
            )


async def test_a_restarted_envoy_is_pending_until_it_acks_again() -> None:
    """node-a's Envoy restarts: the new one holds nothing until it ACKs, whatever the old one
    ACKed, so the route goes Pending, and Programmed again with the new Envoy's ACKs."""
    store, status, cache = Store(), StatusTracker(), SnapshotCache()
    FilesSource(EXAMPLES, store).scan()
    p = Pipeline(store, cache, status)
    await p.start()
    try:
        a, b = _SotwEnvoy(cache, status, "node-a"), _SotwEnvoy(cache, status, "node-b")
        a.pump()
        b.pump()
        # eventually() raises once its timeout passes; the asserts say what each step expects
        assert await eventually(lambda: _programmed(p) == ("True", "Programmed"), timeout=2)

        a.stream.close()
        restarted = _SotwEnvoy(cache, status, "node-a")  # its answers are not read yet
        assert await eventually(lambda: _programmed(p) == ("False", "Pending"), timeout=2)
        held = status.type_status("node-a", types.ROUTE).acked_resources
        assert held == {}, "the restarted Envoy holds nothing it has not ACKed"
        restarted.pump()
        assert await eventually(lambda: _programmed(p) == ("True", "Programmed"), timeout=2)
    finally:
        await p.stop()


def _node_b(ready: str) -> dict[str, Any]:
    return {
        "apiVersion": "v1",
        "kind": "Node",
        "metadata": {"name": "node-b"},
        "status": {"conditions": [{"type": "Ready", "status": ready}]},
    }


async def test_a_node_that_is_not_ready_holds_nothing_back_until_it_connects() -> None:
    """node-b is down (its Node's Ready condition is Unknown) and its Envoy is not connected:
    the route is Programmed with node-a's ACKs and says node-b was not counted. When node-b is
    Ready again, or its Envoy connects while it is not, node-b counts again."""
    store, status, cache = Store(), StatusTracker(), SnapshotCache()
    FilesSource(EXAMPLES, store).scan()
    store.apply(_node_b("Unknown"))
    p = Pipeline(store, cache, status)
    await p.start()
    try:
        _SotwEnvoy(cache, status, "node-a").pump()
        assert await eventually(lambda: _programmed(p) == ("True", "Programmed"), timeout=2)
        (c,) = (c for c in p.conditions()[ROUTE] if c.type == "Programmed")
        assert c.message == "ACKed by 1 node(s); not counted, Node not Ready: node-b"
        # node-b's eBPF agent (same node id) connects, its Envoy does not: still not counted
        status.stream_opened("node-b")
        agent = object()
        for t in (NODE_TYPE_URL, SERVICE_TYPE_URL):
            status.resumed("node-b", t, "", {}, stream=agent)
        p._update_conditions()
        assert _programmed(p) == ("True", "Programmed")
        status.stream_closed("node-b", agent)

        store.apply(_node_b("True"))
        assert await eventually(lambda: _programmed(p) == ("False", "Pending"), timeout=2)
        store.apply(_node_b("False"))
        assert await eventually(lambda: _programmed(p) == ("True", "Programmed"), timeout=2)
        # connected, it counts whatever its Node says: its Envoy is there to ACK
        b = _SotwEnvoy(cache, status, "node-b")
        assert await eventually(lambda: _programmed(p) == ("False", "Pending"), timeout=2)
        b.pump()
        assert await eventually(lambda: _programmed(p) == ("True", "Programmed"), timeout=2)
        (c,) = (c for c in p.conditions()[ROUTE] if c.type == "Programmed")
        assert c.message == "ACKed by 2 node(s)"
    finally:
        await p.stop()


def _message(p: Pipeline) -> str:
    return next(c.message for c in p.conditions()[ROUTE] if c.type == "Programmed")


async def test_a_pending_message_says_which_nodes_have_no_envoy() -> None:
    """A Ready Node whose Envoy is not connected (never; only its eBPF agent is, as while its
    Envoy crash-loops; or it left and was forgotten) holds every object Pending, and the
    message read like a slow ACK. It says so, and /status and `nodemesh status` show it."""
    store, status, cache = Store(), StatusTracker(forget_after=0.0), SnapshotCache()
    FilesSource(EXAMPLES, store).scan()
    store.apply(_node_b("True"))
    p = Pipeline(store, cache, status)
    await p.start()
    try:
        _SotwEnvoy(cache, status, "node-a").pump()
        assert await eventually(lambda: _programmed(p) == ("False", "Pending"), timeout=2)
        assert _message(p).endswith("; Envoy not connected: node-b"), _message(p)
        nodes = p.status_json()["nodes"]
        assert nodes["node-b"] == {
            "connected": False, "streams": 0, "types": {}, "envoy_connected": False,
        }  # fmt: skip
        assert nodes["node-a"]["envoy_connected"] is True

        # its agent alone connects (same node id)
        status.stream_opened("node-b")
        agent = object()
        for t in (NODE_TYPE_URL, SERVICE_TYPE_URL):
            status.resumed("node-b", t, "", {}, stream=agent)
        p._update_conditions()
        assert _message(p).endswith("; Envoy not connected: node-b"), _message(p)
        nodes = p.status_json()["nodes"]
        assert (nodes["node-b"]["connected"], nodes["node-b"]["envoy_connected"]) == (True, False)
        table = render_status(p.status_json())
        assert any(line.split()[:3] == ["node-b", "agent", "only"] for line in table.splitlines())
        status.stream_closed("node-b", agent)

        # its Envoy comes, ACKs, and leaves; the tracker forgets it (forget_after 0 s)
        b = _SotwEnvoy(cache, status, "node-b")
        b.pump()
        assert await eventually(lambda: _programmed(p) == ("True", "Programmed"), timeout=2)
        b.stream.close()
        store.apply(_node_b("True") | {"metadata": {"name": "node-b", "labels": {"x": "y"}}})
        assert await eventually(lambda: _programmed(p) == ("False", "Pending"), timeout=2)
        assert _message(p).endswith("; Envoy not connected: node-b"), _message(p)
    finally:
        await p.stop()


async def test_the_nodes_not_counted_are_named_as_they_come_and_go() -> None:
    """The message names the Nodes that are not Ready now: one deleted while down is no
    longer named, and one that joins not Ready (as a new node does) is, although neither
    changes which nodes count."""
    store, status, cache = Store(), StatusTracker(), SnapshotCache()
    FilesSource(EXAMPLES, store).scan()
    store.apply(_node_b("Unknown"))
    p = Pipeline(store, cache, status)
    await p.start()

    def message() -> str:
        (c,) = (c for c in p.conditions()[ROUTE] if c.type == "Programmed")
        return c.message

    try:
        _SotwEnvoy(cache, status, "node-a").pump()
        assert await eventually(lambda: _programmed(p) == ("True", "Programmed"), timeout=2)
        assert message() == "ACKed by 1 node(s); not counted, Node not Ready: node-b"

        store.delete(ObjectKey("Node", "", "node-b"))
        assert await eventually(lambda: p.built_revision == store.revision, timeout=2)
        assert message() == "ACKed by 1 node(s)"

        node_c = _node_b("False")
        node_c["metadata"]["name"] = "node-c"
        store.apply(node_c)
        assert await eventually(lambda: p.built_revision == store.revision, timeout=2)
        assert message() == "ACKed by 1 node(s); not counted, Node not Ready: node-c"
    finally:
        await p.stop()


async def test_only_the_nodes_the_selector_chooses_get_a_map_and_count() -> None:
    """With `--node-selector`, a Node it leaves out (one nodemesh does not run on) gets no
    service map and holds nothing back; relabelled to match, it counts."""
    store, status, cache = Store(), StatusTracker(), SnapshotCache()
    FilesSource(EXAMPLES, store).scan()
    zone_a = LabelSelector("topology.kubernetes.io/zone=zone-a")
    p = Pipeline(store, cache, status, node_selector=zone_a)
    await p.start()
    try:
        assert p.translation is not None and set(p.translation.per_node) == {"node-a"}
        _SotwEnvoy(cache, status, "node-a").pump()
        assert await eventually(lambda: _programmed(p) == ("True", "Programmed"), timeout=2)
        (c,) = (c for c in p.conditions()[ROUTE] if c.type == "Programmed")
        assert c.message == "ACKed by 1 node(s)"

        node_b = copy.deepcopy(store.get(ObjectKey("Node", "", "node-b")))
        assert node_b is not None
        node_b["metadata"]["labels"]["topology.kubernetes.io/zone"] = "zone-a"
        store.apply(node_b)
        assert await eventually(lambda: _programmed(p) == ("False", "Pending"), timeout=2)
        assert set(p.translation.per_node) == {"node-a", "node-b"}
    finally:
        await p.stop()


def _stopped_clock(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """The pipeline's clock stopped at `now[0]` (an RFC 3339 time the test sets)."""
    now = [""]

    class Clock:
        @staticmethod
        def now(tz: object) -> Any:
            class Stamp:
                def strftime(self, fmt: str) -> str:
                    return now[0]

            return Stamp()

    monkeypatch.setattr(pipeline_module, "datetime", Clock)
    return now


async def test_a_condition_that_comes_back_gets_a_new_transition_time(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """ResolvedRefs goes while the route is not Accepted, and comes back when it is fixed: its
    lastTransitionTime is the time it came back, not the one it had before it went."""
    clock = iter(["2026-11-22T01:00:00Z", "2026-11-22T02:00:00Z", "2026-11-22T03:00:00Z"])
    now = _stopped_clock(monkeypatch)
    store = Store()
    FilesSource(EXAMPLES, store).scan()
    p = Pipeline(store, SnapshotCache(), StatusTracker())

    def resolved_refs_time() -> str | None:
        body = p.kubernetes_status(ROUTE)
        assert body is not None
        for parent in body["parents"]:
            for c in parent["conditions"]:
                if c["type"] == "ResolvedRefs":
                    return str(c["lastTransitionTime"])
        return None

    now[0] = next(clock)
    await p.rebuild()
    assert resolved_refs_time() == "2026-11-22T01:00:00Z"
    good = copy.deepcopy(dict(store.get(ROUTE)))
    bad = copy.deepcopy(good)
    bad["spec"]["rules"][0]["timeouts"] = {"request": "soon"}  # Accepted=False, no ResolvedRefs
    now[0] = next(clock)
    store.apply(bad)
    await p.rebuild()
    assert resolved_refs_time() is None
    now[0] = next(clock)
    store.apply(good)
    await p.rebuild()
    assert resolved_refs_time() == "2026-11-22T03:00:00Z"


async def test_an_object_created_again_under_its_name_gets_new_transition_times(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """`kubectl replace --force`: the route is deleted and created again (a new uid) within
    one build, with the same spec. Its conditions are equal, and it showed the deleted one's
    lastTransitionTimes, from before it existed; they start now, and are written to it."""
    now = _stopped_clock(monkeypatch)
    now[0] = "2026-11-22T01:00:00Z"
    store = Store()
    FilesSource(EXAMPLES, store).scan()
    route = copy.deepcopy(dict(store.get(ROUTE)))
    route["metadata"]["uid"] = "uid-1"
    store.apply(route)
    p = Pipeline(store, SnapshotCache(), StatusTracker())
    emitted: list[ObjectKey] = []
    p.subscribe(lambda key, _: emitted.append(key))

    def times() -> set[str]:
        body = p.kubernetes_status(ROUTE)
        assert body is not None
        return {c["lastTransitionTime"] for e in body["parents"] for c in e["conditions"]}

    await p.rebuild()
    assert times() == {"2026-11-22T01:00:00Z"}
    now[0] = "2026-11-22T02:00:00Z"
    emitted.clear()
    store.delete(ROUTE)
    route["metadata"]["uid"] = "uid-2"
    store.apply(route)
    await p.rebuild()
    assert times() == {"2026-11-22T02:00:00Z"}
    assert ROUTE in emitted


def _pod(name: str, ns: str, node: str, ip: str) -> dict[str, Any]:
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": name, "namespace": ns},
        "spec": {"nodeName": node},
        "status": {"phase": "Running", "podIP": ip},
    }


async def test_a_policy_on_consumer_routes_follows_the_chains_that_carry_it() -> None:
    """A TrafficPolicy of shop's on shop/reviews rides on qa's consumer route, so on a node
    with qa clients it takes effect through that node's own Listener, in qa's chains. It was
    checked under its own namespace (shop): True while qa's chains were not ACKed where shop
    also had consumer clients, and Pending (then Rejected, with another namespace's NACK)
    whenever anything else in that Listener changed."""
    store, status = Store(), StatusTracker()
    FilesSource(EXAMPLES, store).scan()
    policy_key = ObjectKey("TrafficPolicy", "shop", "reviews-policy")
    qa_route = ObjectKey("HTTPRoute", "qa", "reviews-for-qa")
    for obj in (
        {
            "apiVersion": "nodemesh.io/v1alpha1",
            "kind": "TrafficPolicy",
            "metadata": {"name": "reviews-policy", "namespace": "shop"},
            "spec": {
                "targetRefs": [{"group": "", "kind": "Service", "name": "reviews"}],
                "retry": {"retryOn": ["connect-failure"]},
            },
        },
        # shop is a consumer namespace too (a route of its own for other/x), with a client
        # on node-a: its chains there did not change below
        {
            "apiVersion": "v1",
            "kind": "Service",
            "metadata": {"name": "x", "namespace": "other"},
            "spec": {"clusterIP": "10.96.20.1", "ports": [{"name": "http", "port": 80}]},
        },
        {
            "apiVersion": "gateway.networking.k8s.io/v1",
            "kind": "HTTPRoute",
            "metadata": {"name": "x-for-shop", "namespace": "shop"},
            "spec": {
                "parentRefs": [{"kind": "Service", "name": "x", "namespace": "other"}],
                "rules": [{"backendRefs": [{"name": "x", "namespace": "other", "port": 80}]}],
            },
        },
        _pod("runner", "qa", "node-a", "10.244.1.50"),
        _pod("front", "shop", "node-a", "10.244.1.70"),
    ):
        store.apply(obj)
    cache = SnapshotCache()
    p = Pipeline(store, cache, status)
    await p.rebuild()

    def ack(node: str, *type_urls: str) -> None:  # what the node's own snapshot holds
        snap = cache.get_snapshot(node)
        assert snap is not None
        for t in type_urls:
            held = {n: r.version for n, r in snap.resources(t).items()}
            status.acked(node, t, snap.version(t) or "", held, replace=True)

    every = (types.CLUSTER, types.ENDPOINT, types.ROUTE, types.LISTENER)
    for node in ("node-a", "node-b"):
        status.stream_opened(node)
        stream = object()
        for t in every:
            status.resumed(node, t, "", {}, stream=stream)
        ack(node, *every)
    p._update_conditions()

    def programmed(key: ObjectKey) -> tuple[str, str]:
        c = next(c for c in p.conditions()[key] if c.type == "Programmed")
        return c.status, c.reason

    assert programmed(policy_key) == programmed(qa_route) == ("True", "Programmed")
    all_but_lds = (types.CLUSTER, types.ENDPOINT, types.ROUTE)

    # a second qa client on node-a: qa's chains there change, node-a has not ACKed them
    store.apply(_pod("runner-2", "qa", "node-a", "10.244.1.51"))
    await p.rebuild()
    ack("node-b", *every)
    ack("node-a", *all_but_lds)
    p._update_conditions()
    assert programmed(qa_route) == ("False", "Pending")
    assert programmed(policy_key) == ("False", "Pending"), "its settings are in qa's chains"
    ack("node-a", types.LISTENER)
    p._update_conditions()
    assert programmed(policy_key) == ("True", "Programmed")

    # a shop client more on node-a (shop's chains change, qa's do not), refused by node-a
    store.apply(_pod("front-2", "shop", "node-a", "10.244.1.71"))
    await p.rebuild()
    ack("node-b", *every)
    ack("node-a", *all_but_lds)
    p._update_conditions()
    assert programmed(policy_key) == programmed(qa_route) == ("True", "Programmed")
    snap = cache.get_snapshot("node-a")
    assert snap is not None
    sent = {n: r.version for n, r in snap.resources(types.LISTENER).items()}
    version = snap.version(types.LISTENER) or ""
    status.nacked(
        NackRecord("node-a", types.LISTENER, version, "9", tuple(sent), 13, "refused", 0.0, sent),
        sent,
    )
    p._update_conditions()
    assert programmed(policy_key) == programmed(qa_route) == ("True", "Programmed")
