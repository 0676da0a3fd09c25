"""Build + translate + serialize a mesh of 10,000 Services and 100,000 endpoints, from scratch and
after one endpoint change. Goals: full build under 1 s; one endpoint change under 5 ms to bytes
ready to send. Prints a table and writes bench/results/translate.json.

Stages timed: store.view(), build (objects -> IR), translate (IR -> Resources, serialized),
Snapshot (per-type versions; in the full run also the consistency check the pipeline makes before
the first send), and their sum. The incremental run changes one endpoint address
in one EndpointSlice and goes through the same pipeline with the memoizing Translator.
"""

from __future__ import annotations

import asyncio
import gc
import json
import platform
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import aiohttp
import google.protobuf

from nodemesh.controlplane.builder import BuildMemo, build
from nodemesh.controlplane.http import StatusServer
from nodemesh.controlplane.peers import Peers
from nodemesh.controlplane.pipeline import Pipeline, build_collector
from nodemesh.controlplane.store import ObjectKey, Store
from nodemesh.xds import types
from nodemesh.xds.cache import SnapshotCache
from nodemesh.xds.server import StatusTracker
from nodemesh.xds.translate import Translator

SERVICES = 10_000
ENDPOINTS_PER_SERVICE = 10
ROUTES = 1_000  # every tenth Service gets an HTTPRoute with a canary split
POLICIES = 500
NODES = 50  # the second run: Node objects, so the node agents' service maps are made too
RESULTS = Path(__file__).resolve().parent / "results" / "translate.json"


def objects() -> list[dict[str, Any]]:
    out: list[dict[str, Any]] = []
    for i in range(SERVICES):
        ns, name = f"ns{i % 100}", f"svc{i}"
        out.append(
            {
                "apiVersion": "v1",
                "kind": "Service",
                "metadata": {"name": name, "namespace": ns},
                "spec": {
                    "clusterIP": f"10.96.{i // 250}.{i % 250}",
                    "ports": [{"name": "http", "port": 80, "targetPort": 8080}],
                },
            }
        )
        out.append(endpoint_slice(ns, name, i, 0))
        if i % (SERVICES // ROUTES) == 0:
            # the canary: a Service of the same namespace
            canary = f"svc{(i + 100) % SERVICES}"
            out.append(
                {
                    "apiVersion": "gateway.networking.k8s.io/v1",
                    "kind": "HTTPRoute",
                    "metadata": {"name": name, "namespace": ns},
                    "spec": {
                        "parentRefs": [{"kind": "Service", "name": name}],
                        "rules": [
                            {
                                "matches": [{"headers": [{"name": "x-canary", "value": "1"}]}],
                                "backendRefs": [{"name": canary, "port": 80}],
                            },
                            {
                                "backendRefs": [
                                    {"name": name, "port": 80, "weight": 90},
                                    {"name": canary, "port": 80, "weight": 10},
                                ],
                                "retry": {"codes": [503], "attempts": 2},
                            },
                        ],
                    },
                }
            )
        if i % (SERVICES // POLICIES) == 1:
            out.append(
                {
                    "apiVersion": "nodemesh.io/v1alpha1",
                    "kind": "TrafficPolicy",
                    "metadata": {"name": name, "namespace": ns},
                    "spec": {
                        "targetRefs": [{"kind": "Service", "name": name}],
                        "outlierDetection": {"consecutive5xx": 5},
                        "circuitBreaker": {"maxRequests": 1000},
                    },
                }
            )
    return out


def nodes() -> list[dict[str, Any]]:
    """The Nodes the endpoints already name (`nodeName`, 2,000 endpoints each)."""
    return [
        {
            "apiVersion": "v1",
            "kind": "Node",
            "metadata": {"name": f"node{n}"},
            "status": {"addresses": [{"type": "InternalIP", "address": f"10.250.0.{n + 1}"}]},
        }
        for n in range(NODES)
    ]


def endpoint_slice(ns: str, name: str, i: int, salt: int) -> dict[str, Any]:
    """Service i's slice; `salt` moves its first endpoint only (one pod to a new address; until
    2026-11-22 it moved all ten, on ten nodes, while the docstrings said one)."""
    return {
        "apiVersion": "discovery.k8s.io/v1",
        "kind": "EndpointSlice",
        "metadata": {
            "name": f"{name}-abcde",
            "namespace": ns,
            "labels": {"kubernetes.io/service-name": name},
        },
        "addressType": "IPv4",
        "ports": [{"name": "http", "port": 8080, "protocol": "TCP"}],
        "endpoints": [
            {
                "addresses": [f"10.{(i >> 8) % 250}.{i % 250}.{j + 10 + (salt if j == 0 else 0)}"],
                "conditions": {"ready": True},
                # spread over every Node: 2,000 endpoints each (until 2026-11-22 `j % 50`
                # put them all on node0-node9, 10,000 each, and left 40 Nodes empty)
                "nodeName": f"node{(i * ENDPOINTS_PER_SERVICE + j) % NODES}",
            }
            for j in range(ENDPOINTS_PER_SERVICE)
        ],
    }


def timed(fn: Callable[[], Any]) -> tuple[Any, float]:
    start = time.perf_counter()
    value = fn()
    return value, time.perf_counter() - start


class GcClock:
    """Time spent in the cyclic garbage collector (part of the stage times, not on top)."""

    def __init__(self) -> None:
        self.total = 0.0
        self._start = 0.0
        gc.callbacks.append(self._callback)

    def _callback(self, phase: str, info: dict[str, Any]) -> None:
        if phase == "start":
            self._start = time.perf_counter()
        else:
            self.total += time.perf_counter() - self._start


GC = GcClock()


def full_run(store: Store) -> dict[str, float]:
    gc0 = GC.total
    # As Pipeline.rebuild runs a cold build: the collector paused, then what lives on frozen
    # (its exit is timed as part of the Snapshot stage).
    collector = build_collector(cold=True, objects=len(store.view()))
    collector.__enter__()
    view, t_view = timed(store.view)
    result, t_build = timed(lambda: build(view))
    gc_build = GC.total - gc0
    translator = Translator()
    translation, t_translate = timed(lambda: translator.translate(result.mesh))
    gc_translate = GC.total - gc0 - gc_build
    # consistent(): Pipeline.rebuild checks every snapshot before it is set; in a cold build it
    # also decodes the Cluster messages (encoded by hand, decoded on first read).
    _, t_snapshot = timed(
        lambda: (translation.snapshot().consistent(), collector.__exit__(None, None, None))
    )
    return {
        "view": t_view,
        "build": t_build,
        "translate": t_translate,
        "snapshot": t_snapshot,
        "total": t_view + t_build + t_translate + t_snapshot,
        "gc_build": gc_build,
        "gc_translate": gc_translate,
        "gc_total": GC.total - gc0,
    }


def incremental_runs(
    store: Store, n: int, salt: int = 100
) -> tuple[list[dict[str, float]], int, int]:
    """`n` changes of one endpoint address; `salt` makes addresses no earlier run wrote.
    Returns the runs, the Envoy resources re-serialized by the last change and the node
    service maps it re-made."""
    translator, memo = Translator(), BuildMemo()
    with build_collector(cold=memo.cold, objects=len(store.view())):
        translator.translate(build(store.view(), memo=memo).mesh).snapshot().consistent()
    runs = []
    serialized = 0
    for k in range(n):
        i = (k * 7919) % SERVICES
        store.apply(endpoint_slice(f"ns{i % 100}", f"svc{i}", i, salt=salt + k))
        before, maps_before = translator.serialized, translator.service_maps_made
        t0 = time.perf_counter()
        view = store.view()
        with build_collector(cold=memo.cold, objects=len(view)):  # warm: leaves it alone
            t1 = time.perf_counter()
            result = build(view, memo=memo)
            t2 = time.perf_counter()
            translation = translator.translate(result.mesh)
            t3 = time.perf_counter()
            # as Pipeline.rebuild: the snapshot, checked before it is set
            problems = translation.snapshot().consistent()
            t4 = time.perf_counter()
        assert problems == [], problems
        t_view, t_build, t_translate, t_snapshot = t1 - t0, t2 - t1, t3 - t2, t4 - t3
        serialized = translator.serialized - before
        maps_made = translator.service_maps_made - maps_before
        runs.append(
            {
                "view": t_view,
                "build": t_build,
                "translate": t_translate,
                "snapshot": t_snapshot,
                "total": t_view + t_build + t_translate + t_snapshot,
            }
        )
    return runs, serialized, maps_made


def pipeline_runs(store: Store, n: int, salt: int) -> tuple[float, list[dict[str, float]]]:
    """The whole control plane's rebuild, `Pipeline.rebuild()`: build, translate, snapshot
    check, then what follows before the loop is free again (Programmed history, each node's
    snapshot into the cache, every object's conditions). No stream is connected, so every
    Node waits for its ACKs: a control plane before its agents and Envoys connect. Returns
    the cold rebuild's seconds and `n` endpoint changes."""

    async def run() -> tuple[float, list[dict[str, float]]]:
        pipeline = Pipeline(store, SnapshotCache(), StatusTracker())
        t0 = time.perf_counter()
        await pipeline.rebuild()
        cold = time.perf_counter() - t0
        runs = []
        for k in range(n):
            i = (k * 7919) % SERVICES
            store.apply(endpoint_slice(f"ns{i % 100}", f"svc{i}", i, salt=salt + k))
            t0 = time.perf_counter()
            await pipeline.rebuild()
            total = time.perf_counter() - t0
            built = pipeline.last_build_seconds
            runs.append({"total": total, "build": built, "after": total - built})
        assert pipeline.last_error == "", pipeline.last_error
        return cold, runs

    return asyncio.run(run())


def peer_runs(store: Store, n: int = 5) -> dict[str, float]:
    """Programmed across two replicas (`--peers-service`): the Nodes' Envoys half on each,
    every one holding its snapshot. Times the follower's `/programmed` answer (made once per
    change of its conditions), the leader's poll of it over loopback (fetch and parse; then
    an unchanged one, a 304), and the leader's recompute of every object's conditions with
    the follower's verdicts in; medians of `n`. Then the follower drains and cuts its
    Envoys' streams (a rolling update): the leader's recompute with all of them moving."""

    async def run() -> dict[str, float]:
        statuses = StatusTracker(), StatusTracker()
        leader, follower = (Pipeline(store, SnapshotCache(), s) for s in statuses)
        names = sorted(o["metadata"]["name"] for o in nodes())
        streams: dict[str, object] = {}
        for pipeline, status, half in (
            (leader, statuses[0], names[::2]),
            (follower, statuses[1], names[1::2]),
        ):
            await pipeline.rebuild()
            for node in half:  # what the ADS server records as each Envoy ACKs
                status.stream_opened(node)
                # (its stream, which speaks for every type it asks for)
                stream = streams[node] = object()
                snap = pipeline.cache.get_snapshot(node) or pipeline.snapshot
                assert snap is not None
                for t in snap.type_urls:
                    status.resumed(node, t, "", {}, stream=stream)
                    held = {name: r.version for name, r in snap.resources(t).items()}
                    status.acked(node, t, snap.version(t) or "", held, replace=True)
            pipeline._update_conditions()
        report, size = [], 0
        for _ in range(n):
            follower._update_conditions()  # (a new answer is made after each)
            t0 = time.perf_counter()
            size = len(follower.programmed_report()[1])
            report.append(time.perf_counter() - t0)
        http = StatusServer(follower)
        port = await http.start("127.0.0.1", 0)
        polls, unchanged, merges, same = [], [], [], []
        try:
            async with aiohttp.ClientSession() as session:
                for _ in range(n):
                    peers = Peers(lambda: {"follower": f"http://127.0.0.1:{port}"})
                    t0 = time.perf_counter()
                    await peers.poll(session)
                    polls.append(time.perf_counter() - t0)
                    t0 = time.perf_counter()
                    await peers.poll(session)
                    unchanged.append(time.perf_counter() - t0)
                    leader.peers = peers
                    t0 = time.perf_counter()
                    leader._update_conditions()
                    merges.append(time.perf_counter() - t0)
                    t0 = time.perf_counter()
                    leader._update_conditions()
                    same.append(time.perf_counter() - t0)
                    leader.peers = None
                    leader._update_conditions()
        finally:
            await http.stop()
        leader.peers = peers
        leader._update_conditions()
        verdicts = [c for cs in leader.conditions().values() for c in cs if c.type == "Programmed"]
        assert verdicts and all(c.status == "True" for c in verdicts), verdicts[:3]
        assert all(c.message == f"ACKed by {len(names)} node(s)" for c in verdicts)

        follower.drain(cut_in=0.0)  # and its drain cuts every stream
        for node in names[1::2]:
            statuses[1].stream_closed(node, streams[node])
        follower._update_conditions()
        port = await http.start("127.0.0.1", port)
        try:
            async with aiohttp.ClientSession() as session:
                await peers.poll(session)
        finally:
            await http.stop()
        assert len(peers.departed()) == len(names[1::2])
        t0 = time.perf_counter()
        leader._update_conditions()
        moving = time.perf_counter() - t0
        verdicts = [c for cs in leader.conditions().values() for c in cs if c.type == "Programmed"]
        assert all(c.message == f"ACKed by {len(names)} node(s)" for c in verdicts), verdicts[:3]
        return {
            "report_ms": statistics.median(report) * 1000,
            "report_kb": size / 1000,
            "poll_ms": statistics.median(polls) * 1000,
            "poll_unchanged_ms": statistics.median(unchanged) * 1000,
            "merge_ms": statistics.median(merges) * 1000,
            "unchanged_ms": statistics.median(same) * 1000,
            "moving_merge_ms": moving * 1000,
            "moving_nodes": len(peers.departed()),
        }

    return asyncio.run(run())


def listener_lag_runs(store: Store, n: int = 5) -> dict[str, float]:
    """`Programmed` while the node Envoys are behind on the outbound Listener only: every
    object's recompute (what each ACK batch costs the event loop) with every Node's Envoy
    holding everything, then after a new L7 Service (its first route adds a chain to the
    Listener) with every Envoy holding all but that Listener; medians of `n`. Until
    2026-11-23 the second compared each object with each node (1,500 x 50): 10x the first."""

    async def run() -> dict[str, float]:
        status = StatusTracker()
        pipeline = Pipeline(store, SnapshotCache(), status)
        await pipeline.rebuild()
        names = sorted(o["metadata"]["name"] for o in nodes())

        def ack(node: str, kinds: tuple[str, ...]) -> None:
            snap = pipeline.cache.get_snapshot(node) or pipeline.snapshot
            assert snap is not None
            for t in kinds:
                held = {name: r.version for name, r in snap.resources(t).items()}
                status.acked(node, t, snap.version(t) or "", held, replace=True)

        kinds = (types.CLUSTER, types.ENDPOINT, types.ROUTE, types.LISTENER)
        for node in names:
            status.stream_opened(node)
            stream = object()
            for t in kinds:
                status.resumed(node, t, "", {}, stream=stream)
            ack(node, kinds)

        def recompute() -> float:
            times = []
            for _ in range(n):
                status.epoch += 1  # as an ACK batch does
                t0 = time.perf_counter()
                pipeline._update_conditions()
                times.append(time.perf_counter() - t0)
            return statistics.median(times)

        pipeline._update_conditions()
        current = recompute()
        store.apply(
            {
                "apiVersion": "v1",
                "kind": "Service",
                "metadata": {"name": "lag", "namespace": "ns0"},
                "spec": {"clusterIP": "10.95.0.1", "ports": [{"name": "http", "port": 80}]},
            }
        )
        store.apply(
            {
                "apiVersion": "gateway.networking.k8s.io/v1",
                "kind": "HTTPRoute",
                "metadata": {"name": "lag", "namespace": "ns0"},
                "spec": {
                    "parentRefs": [{"kind": "Service", "name": "lag"}],
                    "rules": [{"backendRefs": [{"name": "lag", "port": 80}]}],
                },
            }
        )
        await pipeline.rebuild()
        for node in names:
            ack(node, kinds[:3])  # all but the Listener
        pipeline._update_conditions()
        behind = recompute()
        waiting = [
            c
            for cs in pipeline.conditions().values()
            for c in cs
            if c.type == "Programmed" and c.status != "True"
        ]
        assert len(waiting) == 1 and "lds outbound" in waiting[0].message, waiting[:3]
        store.delete(ObjectKey("HTTPRoute", "ns0", "lag"))
        store.delete(ObjectKey("Service", "ns0", "lag"))
        return {"current_ms": current * 1000, "behind_on_listener_ms": behind * 1000}

    return asyncio.run(run())


def main() -> int:
    objs = objects()
    store = Store()
    _, t_load = timed(lambda: [store.apply(o) for o in objs])
    # The input must be what it claims: a refused route or policy would be measured as a
    # cheaper one (the canaries once were, from another namespace without a ReferenceGrant).
    refused = [
        f"{key}: {c.type} {c.reason}"
        for key, conds in build(store.view()).conditions.items()
        for c in conds
        if c.status != "True"
    ]
    if refused:
        print(f"{len(refused)} conditions not True, e.g. {refused[:3]}", file=sys.stderr)
        return 1
    gc.collect()
    full = [full_run(store) for _ in range(3)]
    inc, serialized, _ = incremental_runs(store, 10)
    # Again with the Nodes: every node's agent gets a service map listing every Service.
    for o in nodes():
        store.apply(o)
    gc.collect()
    full_nodes = [full_run(store) for _ in range(3)]
    inc_nodes, serialized_nodes, maps_made = incremental_runs(store, 10, salt=120)
    gc.collect()
    pipe_cold, pipe = pipeline_runs(store, 10, salt=140)
    gc.collect()
    peer = peer_runs(store)
    gc.collect()
    lag = listener_lag_runs(store)

    def med(runs: list[dict[str, float]], stage: str) -> float:
        return statistics.median(r[stage] for r in runs)

    stages = ("view", "build", "translate", "snapshot", "total")
    print(
        f"mesh: {SERVICES} Services, {SERVICES * ENDPOINTS_PER_SERVICE} endpoints, "
        f"{ROUTES} HTTPRoutes, {POLICIES} TrafficPolicies ({len(objs)} objects, "
        f"store load {t_load:.2f} s)"
    )
    print(f"{'stage':<10} {'full (median of 3)':>20} {'one endpoint change (median of 10)':>38}")
    for s in stages:
        print(f"{s:<10} {med(full, s) * 1000:>17.1f} ms {med(inc, s) * 1000:>35.2f} ms")
    print(
        f"of which in the garbage collector (full, median): build "
        f"{med(full, 'gc_build') * 1000:.0f} ms, translate {med(full, 'gc_translate') * 1000:.0f}"
        f" ms, all stages {med(full, 'gc_total') * 1000:.0f} ms"
    )
    print(f"resources re-serialized per endpoint change: {serialized}")
    print(f"with {NODES} Nodes (the agents' service maps too; no Node objects above):")
    for s in stages:
        print(f"{s:<10} {med(full_nodes, s) * 1000:>17.1f} ms {med(inc_nodes, s) * 1000:>35.2f} ms")
    print(
        f"resources re-serialized per endpoint change: {serialized_nodes} for Envoy, "
        f"{maps_made} agent feed resources (MeshService, NodeServiceMap; the last change)"
    )
    print(
        f"whole Pipeline.rebuild() with {NODES} Nodes, none connected: cold {pipe_cold * 1000:.0f}"
        f" ms; one endpoint change {med(pipe, 'total') * 1000:.1f} ms (build to the checked "
        f"shared and node snapshots {med(pipe, 'build') * 1000:.1f} ms, then history, the "
        f"snapshots into the cache and conditions "
        f"{med(pipe, 'after') * 1000:.1f} ms)"
    )
    print(
        f"Programmed across 2 replicas, {NODES // 2} Nodes' Envoys on each: /programmed "
        f"{peer['report_kb']:.0f} kB made in {peer['report_ms']:.1f} ms; the leader's poll "
        f"{peer['poll_ms']:.1f} ms (unchanged, 304: {peer['poll_unchanged_ms']:.1f} ms); its "
        f"recompute with the verdicts {peer['merge_ms']:.1f} ms "
        f"(nothing changed: {peer['unchanged_ms']:.1f} ms); with the follower's "
        f"{peer['moving_nodes']:.0f} node Envoys moving (a rolling update): "
        f"{peer['moving_merge_ms']:.1f} ms"
    )
    print(
        f"Programmed recompute, {NODES} Nodes' Envoys on one replica: {lag['current_ms']:.1f} ms "
        f"with every Envoy current; {lag['behind_on_listener_ms']:.1f} ms with every one behind "
        f"on the outbound Listener only (a new L7 Service)"
    )
    full_ms, inc_ms = med(full, "total") * 1000, med(inc, "total") * 1000
    inc_translate_ms = med(inc, "translate") * 1000
    print(f"goal full build < 1000 ms: {'met' if full_ms < 1000 else 'NOT met'} ({full_ms:.0f} ms)")
    print(
        f"goal one endpoint change < 5 ms: {'met' if inc_ms < 5 else 'NOT met'} ({inc_ms:.1f} ms; "
        f"translate+serialize alone {inc_translate_ms:.2f} ms)"
    )
    nodes_full_ms, nodes_inc_ms = med(full_nodes, "total") * 1000, med(inc_nodes, "total") * 1000
    print(
        f"with {NODES} Nodes: full build {nodes_full_ms:.0f} ms, one endpoint change "
        f"{nodes_inc_ms:.1f} ms: goals {'met' if nodes_full_ms < 1000 else 'NOT met'} / "
        f"{'met' if nodes_inc_ms < 5 else 'NOT met'}"
    )
    RESULTS.parent.mkdir(exist_ok=True)
    RESULTS.write_text(
        json.dumps(
            {
                "date": time.strftime("%Y-%m-%d"),
                "python": sys.version.split()[0],
                "platform": platform.platform(),
                "protobuf": google.protobuf.__version__,
                "services": SERVICES,
                "endpoints": SERVICES * ENDPOINTS_PER_SERVICE,
                "routes": ROUTES,
                "policies": POLICIES,
                "full_ms": {s: round(med(full, s) * 1000, 2) for s in stages},
                "full_gc_ms": {
                    s: round(med(full, f"gc_{s}") * 1000, 2)
                    for s in ("build", "translate", "total")
                },
                "one_endpoint_change_ms": {s: round(med(inc, s) * 1000, 3) for s in stages},
                "reserialized_per_endpoint_change": serialized,
                "with_nodes": {
                    "nodes": NODES,
                    "full_ms": {s: round(med(full_nodes, s) * 1000, 2) for s in stages},
                    "one_endpoint_change_ms": {
                        s: round(med(inc_nodes, s) * 1000, 3) for s in stages
                    },
                    "reserialized_per_endpoint_change": serialized_nodes,
                    "agent_feed_resources_per_endpoint_change": maps_made,
                    "pipeline_rebuild_ms": {
                        "cold": round(pipe_cold * 1000, 1),
                        "one_endpoint_change": {
                            s: round(med(pipe, s) * 1000, 2) for s in ("build", "after", "total")
                        },
                    },
                    "programmed_across_2_replicas": {k: round(v, 2) for k, v in peer.items()},
                    "programmed_listener_lag": {k: round(v, 2) for k, v in lag.items()},
                },
            },
            indent=2,
        )
        + "\n"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
