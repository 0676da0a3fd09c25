"""Answering delta watches after one change among 10,000 ClusterLoadAssignments, 50 nodes.

Two measurements, each with the full comparison ("old": the watch carries no basis, so the
cache compares every subscribed resource) and with the changes followed ("new": the watch's
basis is the set its client was last brought to), alternating old and new rounds:

- cache: 50 parked watches (one per node, each subscribed to all 10,000 names and holding
  them), one `set_fallback_snapshot` that answers all 50. Only that call is timed.
- stream: 50 `DeltaStream`s, as Envoys on delta ADS, ACKed and parked; timed: the same call
  (answers, encoded onto the streams' queues) plus every stream's ACK (which opens its next
  watch). This is the server's whole cost per change and node.

Prints medians and the ratios, writes bench/results/delta_answer.json.
"""

from __future__ import annotations

import dataclasses
import gc
import json
import platform
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from types import MappingProxyType

from envoy.config.core.v3 import address_pb2
from envoy.config.endpoint.v3 import endpoint_components_pb2, endpoint_pb2
from envoy.service.discovery.v3 import discovery_pb2

from nodemesh.xds import types
from nodemesh.xds.cache import (
    Cancel,
    DeltaWatchRequest,
    DeltaWatchResponse,
    Resource,
    Snapshot,
    SnapshotCache,
    TypeSet,
    WatchRequest,
    WatchResponse,
)
from nodemesh.xds.server import StatusTracker
from nodemesh.xds.server._streams import DeltaStream

RESOURCES = 10_000
NODES = 50
ROUNDS = 15  # per path, alternating
RESULTS = Path(__file__).resolve().parent / "results" / "delta_answer.json"


def load_assignment(i: int, port: int) -> Resource:
    cla = endpoint_pb2.ClusterLoadAssignment(cluster_name=f"ns{i % 100}/svc{i}")
    lb = cla.endpoints.add().lb_endpoints.add()
    lb.endpoint.CopyFrom(
        endpoint_components_pb2.Endpoint(
            address=address_pb2.Address(
                socket_address=address_pb2.SocketAddress(
                    address=f"10.{i >> 8 & 255}.{i & 255}.1", port_value=port
                )
            )
        )
    )
    return Resource.from_message(cla)


class Changes:
    """A chain of TypeSets, each one endpoint change after the one before."""

    def __init__(self) -> None:
        self.current = TypeSet(load_assignment(i, 8080) for i in range(RESOURCES))
        self.names = frozenset(self.current.items)
        self.k = 0

    def next(self) -> TypeSet:
        self.k += 1
        changed = load_assignment((self.k * 7919) % RESOURCES, 9000 + self.k)
        self.current = self.current.updated([changed])
        return self.current


def snapshot(ts: TypeSet) -> Snapshot:
    return Snapshot.of_type_sets({types.ENDPOINT: ts})


def cache_round(changes: Changes, follow: bool) -> float:
    """Seconds to answer NODES parked watches after one change."""
    cache = SnapshotCache()
    before = changes.current
    cache.set_fallback_snapshot(snapshot(before))
    # one read-only mapping for every node, as a DeltaStream passes its ACKed state
    held = MappingProxyType({n: r.version for n, r in before.items.items()})
    got: list[DeltaWatchResponse] = []
    for node in range(NODES):
        request = DeltaWatchRequest(
            node_id=f"node{node}",
            type_url=types.ENDPOINT,
            wildcard=False,
            subscribed=changes.names,
            client_versions=held,
            basis=before.token if follow else None,
        )
        cache.create_delta_watch(request, got.append)
    after = snapshot(changes.next())
    gc.collect()
    start = time.perf_counter()
    cache.set_fallback_snapshot(after)
    elapsed = time.perf_counter() - start
    assert len(got) == NODES and all(len(r.updated) == 1 for r in got), got[:1]
    return elapsed


class NoBasis:
    """The cache, with every delta watch's basis dropped: the full comparison, as before."""

    def __init__(self, cache: SnapshotCache) -> None:
        self.cache = cache

    def create_watch(
        self, request: WatchRequest, respond: Callable[[WatchResponse], None]
    ) -> Cancel:
        return self.cache.create_watch(request, respond)

    def create_delta_watch(
        self, request: DeltaWatchRequest, respond: Callable[[DeltaWatchResponse], None]
    ) -> Cancel:
        plain = dataclasses.replace(request, basis=None, dirty=frozenset())
        return self.cache.create_delta_watch(plain, respond)

    def current_version(self, node_id: str, type_url: str) -> str | None:
        return self.cache.current_version(node_id, type_url)


def ack_all(streams: list[DeltaStream]) -> int:
    """Every stream ACKs what it was sent; returns the resources those responses carried."""
    sent = 0
    for stream in streams:
        while not stream.queue.empty():
            data = stream.queue.get_nowait()
            assert data is not None
            resp = discovery_pb2.DeltaDiscoveryResponse.FromString(data)
            sent += len(resp.resources)
            stream.handle(
                discovery_pb2.DeltaDiscoveryRequest(
                    type_url=resp.type_url, response_nonce=resp.nonce
                )
            )
    return sent


def stream_round(changes: Changes, follow: bool) -> float:
    """Seconds for one change: answers onto NODES streams, and their ACKs."""
    cache = SnapshotCache()
    cache.set_fallback_snapshot(snapshot(changes.current))
    watcher = cache if follow else NoBasis(cache)
    streams = []
    for node in range(NODES):
        stream = DeltaStream(watcher, StatusTracker())
        first = discovery_pb2.DeltaDiscoveryRequest(
            type_url=types.ENDPOINT, resource_names_subscribe=sorted(changes.names)
        )
        first.node.id = f"node{node}"
        stream.handle(first)
        streams.append(stream)
    ack_all(streams)  # the initial 10,000 each
    after = snapshot(changes.next())
    gc.collect()
    start = time.perf_counter()
    cache.set_fallback_snapshot(after)
    sent = ack_all(streams)
    elapsed = time.perf_counter() - start
    assert sent == NODES, sent
    return elapsed


def alternate(measure: Callable[[Changes, bool], float]) -> dict[str, list[float]]:
    changes = Changes()
    times: dict[str, list[float]] = {"old": [], "new": []}
    for k in range(2 * ROUNDS):
        follow = k % 2 == 1
        times["new" if follow else "old"].append(measure(changes, follow))
    return times


def summary(times: dict[str, list[float]]) -> dict[str, object]:
    old, new = statistics.median(times["old"]), statistics.median(times["new"])
    return {
        "old_ms": round(old * 1000, 3),
        "new_ms": round(new * 1000, 3),
        "ratio": round(old / new, 1),
        "old_runs_ms": [round(t * 1000, 3) for t in times["old"]],
        "new_runs_ms": [round(t * 1000, 3) for t in times["new"]],
    }


def main() -> int:
    results = {"cache": summary(alternate(cache_round)), "stream": summary(alternate(stream_round))}
    print(
        f"{RESOURCES} ClusterLoadAssignments, {NODES} node watches, one changed; "
        f"median of {ROUNDS} alternating rounds per path"
    )
    print(f"{'':<38} {'full comparison':>16} {'changes followed':>17} {'ratio':>7}")
    labels = {
        "cache": "cache: answer 50 watches",
        "stream": "stream: answer, encode, ACK, reopen",
    }
    for key, label in labels.items():
        r = results[key]
        print(f"{label:<38} {r['old_ms']:>13.2f} ms {r['new_ms']:>14.3f} ms {r['ratio']:>6}x")
    RESULTS.parent.mkdir(exist_ok=True)
    RESULTS.write_text(
        json.dumps(
            {
                "date": time.strftime("%Y-%m-%d"),
                "python": sys.version.split()[0],
                "platform": platform.platform(),
                "resources": RESOURCES,
                "nodes": NODES,
                "rounds_per_path": ROUNDS,
                **results,
            },
            indent=2,
        )
        + "\n"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
