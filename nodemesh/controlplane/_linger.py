"""Clusters removed after the routes that named them: the xDS protocol's last step.

A rebuild that removes a cluster (a route moved to another Service whose old one was deleted in
the same change, a Service port renumbered) would send that removal in its CDS response, and
Envoy applies CDS before the routes that follow it: a request in between reaches a route that
still names the cluster and is answered 503 (no cluster). So a removed cluster, with its
endpoints, stays in what the nodes are given ("lingers") until every connected node Envoy has
ACKed the Listeners and routes of the snapshot that dropped it; then the snapshot without it
goes out. The snapshot the build made is the one status and consistency are computed from;
only what the cache serves carries the lingering clusters.

A cluster lingers at most `LINGER_MAX` seconds (`Lingering.max_seconds`): a node that NACKs
its routes, or does not answer, or changes that keep coming faster than the nodes answer, do not
keep it for good.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass

from envoy.config.cluster.v3 import cluster_pb2

from nodemesh.xds import types
from nodemesh.xds.cache import Resource, Snapshot, TypeSet
from nodemesh.xds.server import StatusTracker

__all__ = ["LINGER_MAX", "Lingering"]

LINGER_MAX = 60.0
# The types whose resources name clusters, which a node must have ACKed before they go.
_NAMING = (types.LISTENER, types.ROUTE)


@dataclass(frozen=True, slots=True)
class _Kept:
    cluster: Resource
    endpoints: Resource | None  # its ClusterLoadAssignment, if the snapshot had one
    since: float  # when it was first removed


def _eds_name(r: Resource) -> str:
    c = r.message
    if isinstance(c, cluster_pb2.Cluster) and c.type == cluster_pb2.Cluster.EDS:
        return str(c.eds_cluster_config.service_name or c.name)
    return ""


def _removed(before: Snapshot, after: Snapshot) -> list[str]:
    """The clusters `before` has and `after` has not: none when they share the set (a change
    that touched no cluster), from the names changed in between when `after`'s set descends
    from `before`'s, else by looking at each."""
    old, new = before.type_set(types.CLUSTER), after.type_set(types.CLUSTER)
    if old is None or old is new:
        return []
    new_items = new.items if new is not None else {}
    changed = new.changed_since(old.token, len(old.items)) if new is not None else None
    names = changed if changed is not None else old.items.keys()
    return sorted(n for n in names if n in old.items and n not in new_items)


def _follow(
    served: TypeSet | None,
    before: TypeSet | None,
    built: TypeSet | None,
    kept: frozenset[str],
    gone: set[str],
) -> TypeSet | None:
    """`served` (which was `before` and the lingering resources) brought to `built` and the
    `kept` names, by the changes from `before` to `built` and the `gone` names that stopped
    lingering: a set that descends from `served`, so that a delta watch holding it is answered
    from those changes, not by comparing every resource. None when the changes are unknown."""
    if served is None or before is None or built is None:
        return None
    if built is before:
        changed: set[str] | None = set()
    else:
        changed = built.changed_since(before.token, len(built.items) // 2)
    if changed is None:
        return None
    items = built.items
    upserts = [items[n] for n in sorted(changed) if n in items]
    removed = [n for n in sorted(changed | gone) if n not in items and n not in kept]
    if not upserts and not removed:
        return served
    return served.updated(upserts, removed)


class Lingering:
    """The clusters a rebuild removed, kept in the served snapshots until the nodes hold the
    routes that no longer name them."""

    def __init__(self, max_seconds: float = LINGER_MAX) -> None:
        self.max_seconds = max_seconds
        self.kept: dict[str, _Kept] = {}
        self.released = 0  # times the lingering clusters were let go (for tests)

    def carry(
        self,
        served: Snapshot | None,
        before: Snapshot | None,
        built: Snapshot,
        node_built: Mapping[str, Snapshot],
        now: float,
        anyone_connected: bool,
    ) -> tuple[Snapshot, dict[str, Snapshot]]:
        """The snapshots to serve for the `built` shared one and the nodes' own: with the
        clusters that `before` (the shared snapshot built before) has and `built` has not, and
        those still lingering from before, less the expired. `served` is the shared snapshot
        served until now (`before` and what lingered then): the sets served next follow from
        its own, at a cost in the changes."""
        new_clusters = built.resources(types.CLUSTER)
        lingered = self.kept
        kept = {
            n: k
            for n, k in lingered.items()
            if n not in new_clusters and now - k.since < self.max_seconds
        }
        if before is not None and anyone_connected:
            old_clusters = before.resources(types.CLUSTER)
            endpoints = before.resources(types.ENDPOINT)
            for name in _removed(before, built):
                r = old_clusters[name]
                if name not in kept:
                    kept[name] = _Kept(r, endpoints.get(_eds_name(r)), now)
        self.kept = kept
        if not kept:
            return built, dict(node_built)
        new_endpoints = built.resources(types.ENDPOINT)
        clusters = [k.cluster for k in kept.values()]
        cla = [
            k.endpoints
            for k in kept.values()
            if k.endpoints is not None and k.endpoints.name not in new_endpoints
        ]
        gone = {n: k for n, k in lingered.items() if n not in kept}
        carried: dict[str, TypeSet | None] = {types.CLUSTER: None, types.ENDPOINT: None}
        if served is not None and before is not None:
            lingering = {
                types.CLUSTER: (frozenset(kept), set(gone)),
                types.ENDPOINT: (
                    frozenset(r.name for r in cla),
                    {k.endpoints.name for k in gone.values() if k.endpoints is not None},
                ),
            }
            for t, (names, went) in lingering.items():
                carried[t] = _follow(
                    served.type_set(t), before.type_set(t), built.type_set(t), names, went
                )
        if carried[types.CLUSTER] is None or carried[types.ENDPOINT] is None:
            made = built.updated({types.CLUSTER: (clusters, ()), types.ENDPOINT: (cla, ())})
            for t, ts in carried.items():
                carried[t] = ts if ts is not None else made.type_set(t)
        sets = {t: ts for t, ts in carried.items() if ts is not None}
        shared = Snapshot.of_type_sets(
            {**{t: ts for t in built.type_urls if (ts := built.type_set(t)) is not None}, **sets}
        )
        nodes: dict[str, Snapshot] = {}
        for node, snap in node_built.items():
            if snap is built:
                nodes[node] = shared
                continue
            type_sets = {t: ts for t in snap.type_urls if (ts := snap.type_set(t)) is not None}
            type_sets.update(sets)
            nodes[node] = Snapshot.of_type_sets(type_sets)
        return shared, nodes

    def may_go(
        self,
        status: StatusTracker | None,
        served: Callable[[str], Snapshot | None],
        now: float,
    ) -> bool:
        """Whether the lingering clusters may go now: every node Envoy on a stream ACKed the
        Listeners and routes it is served (`served(node)`: its snapshot). (One that lingered
        too long goes alone: `expired`.)"""
        if not self.kept:
            return False
        if status is None:
            return True
        for node in status.nodes():
            if not node.connected:
                continue
            snapshot = served(node.node_id)
            cds = node.types.get(types.CLUSTER)
            if snapshot is None or cds is None or cds.stream is None:
                # No Envoy of the node on a stream (its agent's may be open): as a node not
                # connected, it waits for nothing. A reconnecting Envoy asks for Clusters first,
                # so its old routes count from its first request on.
                continue
            for t in _NAMING:
                ts = node.types.get(t)
                if ts is None or not snapshot.has_type(t):
                    continue  # not asked for (an agent's stream, an Envoy not that far yet)
                if ts.version_acked != snapshot.version(t):
                    return False
        return True

    def expired(self, now: float) -> bool:
        """Some lingering cluster has lingered `max_seconds`: `carry` leaves it out."""
        return any(now - k.since >= self.max_seconds for k in self.kept.values())

    def release(self) -> None:
        self.kept = {}
        self.released += 1

    def next_expiry(self) -> float | None:
        """When the oldest lingering cluster expires (in the clock `carry` was given)."""
        oldest = min((k.since for k in self.kept.values()), default=None)
        return None if oldest is None else oldest + self.max_seconds
