"""Nodes and Pods -> `ir.NodeInfo`: per node, where its pods reach the node Envoy and which pod
IPs live on it (what a node agent needs besides the Services).

`NodeIndex` keeps per-node pod IP reference counts across builds, keyed by object identity (the
store keeps the same dict for an unchanged object), so a build reads only the Pods, Nodes and
EndpointSlices that changed, and an unchanged node keeps its `NodeInfo` object.
"""

from __future__ import annotations

import bisect
import ipaddress
from collections import Counter
from collections.abc import Callable, Iterable, Mapping
from typing import Any

from nodemesh._ip import all_dotted_quads, is_dotted_quad
from nodemesh.controlplane.builder._util import as_list, as_map
from nodemesh.controlplane.store import ObjectKey
from nodemesh.xds.translate import ir

__all__ = [
    "Claims",
    "ConsumerIndex",
    "NodeIndex",
    "claim",
    "node_address",
    "node_ready",
    "pod_placement",
    "slice_placement",
    "unclaim",
]

Placement = tuple[tuple[str, str], ...]  # (node name, pod IP) pairs
_FEW = 64  # changed objects up to which a node's sorted pod IPs are updated in place
Items = Iterable[tuple[ObjectKey, Mapping[str, Any]]]


def _ipv4(value: Any) -> str | None:
    # Fast path for the common canonical dotted quad (ipaddress is slow at 100k endpoints);
    # anything else goes through ipaddress, which decides.
    if type(value) is str and is_dotted_quad(value):
        return value
    try:
        return str(ipaddress.IPv4Address(str(value)))
    except ValueError:
        return None


def node_address(obj: Mapping[str, Any]) -> str:
    """The Node's first IPv4 InternalIP (status.addresses), or ""."""
    for a in as_list(as_map(obj.get("status")).get("addresses")):
        a = as_map(a)
        if a.get("type") == "InternalIP":
            ip = _ipv4(a.get("address"))
            if ip is not None:
                return ip
    return ""


ZONE_LABEL = "topology.kubernetes.io/zone"


def node_zone(obj: Mapping[str, Any]) -> str:
    """The Node's zone label, or ""."""
    zone = as_map(as_map(obj.get("metadata")).get("labels")).get(ZONE_LABEL, "")
    return zone if type(zone) is str else str(zone)


def node_ready(obj: Mapping[str, Any]) -> bool:
    """False when the Node's `Ready` condition says anything but "True" (the kubelet stopped
    reporting, or reports the node unhealthy); True without one (files mode)."""
    for c in as_list(as_map(obj.get("status")).get("conditions")):
        c = as_map(c)
        if c.get("type") == "Ready":
            return c.get("status") == "True"
    return True


def pod_placement(obj: Mapping[str, Any]) -> Placement:
    """(node, IPv4) of a running pod with its own network namespace; () otherwise."""
    spec, status = as_map(obj.get("spec")), as_map(obj.get("status"))
    node = spec.get("nodeName")
    if not isinstance(node, str) or not node or spec.get("hostNetwork") is True:
        return ()
    if status.get("phase") in ("Succeeded", "Failed"):  # its IP may already be reused
        return ()
    ips = [as_map(p).get("ip") for p in as_list(status.get("podIPs"))] or [status.get("podIP")]
    return tuple(sorted({(node, ip) for ip in map(_ipv4, ips) if ip is not None}))


def slice_placement(obj: Mapping[str, Any]) -> Placement:
    """(nodeName, IPv4) of every endpoint of an EndpointSlice, ready or not."""
    nodes: list[str] = []
    addresses: list[Any] = []
    # Type checks before the helpers: a cold build places 100,000 endpoints.
    endpoints = obj.get("endpoints")
    for e in endpoints if type(endpoints) is list else as_list(endpoints):
        if type(e) is not dict:
            e = as_map(e)
        node = e.get("nodeName")
        if isinstance(node, str) and node:
            addrs = e.get("addresses")
            for addr in addrs if type(addrs) is list else as_list(addrs):
                nodes.append(node)
                addresses.append(addr)
    # Nearly always every address is a canonical dotted quad (what _ipv4 gives unchanged):
    # checked for the whole slice at once, else one by one through _ipv4.
    if all_dotted_quads(addresses):
        out = set(zip(nodes, addresses, strict=True))
    else:
        out = set()
        for node, addr in zip(nodes, addresses, strict=True):
            ip = _ipv4(addr)
            if ip is not None:
                out.add((node, ip))
    return tuple(sorted(out))


def _by_node(pairs: list[tuple[str, str]]) -> dict[str, list[str]]:
    out: dict[str, list[str]] = {}
    for node, ip in pairs:
        ips = out.get(node)
        if ips is None:
            out[node] = ips = []
        ips.append(ip)
    return out


# node -> pod IP -> who claims it (a namespace, a choice) -> how many Pods
Claims = dict[str, dict[str, Counter[str]]]


def claim(claims: Claims, node: str, ip: str, who: str) -> None:
    claims.setdefault(node, {}).setdefault(ip, Counter())[who] += 1


def unclaim(claims: Claims, node: str, ip: str, who: str) -> None:
    """One claim less; an IP, then a node, without claims left goes."""
    per_ip = claims[node]
    counts = per_ip[ip]
    counts[who] -= 1
    if not counts[who]:
        del counts[who]
        if not counts:
            del per_ip[ip]
            if not per_ip:
                del claims[node]


class NodeIndex:
    """Pod IPs per node, updated from one build to the next. Not thread-safe (one per build
    memo). A fresh index gives the same result as a warm one."""

    def __init__(self) -> None:
        self._placed: dict[ObjectKey, tuple[Mapping[str, Any], Placement]] = {}
        self._refs: dict[str, dict[str, int]] = {}  # node -> pod IP -> how many objects say so
        # node -> its pod IPs, kept sorted as IPs come and go on a change (a node of 2,000
        # pods is not sorted again for every change), and sorted once, when first needed,
        # after a full update (`_stale`: inserting 100,000 IPs one by one costs more)
        self._sorted: dict[str, list[str]] = {}
        self._stale: set[str] = set()
        self._infos: dict[str, ir.NodeInfo] = {}
        self._tuple: tuple[ir.NodeInfo, ...] = ()
        self._nodes: list[tuple[ObjectKey, Mapping[str, Any]]] = []
        # Changed Pods and EndpointSlices (None: deleted) not placed yet: while there is no
        # Node object no NodeInfo needs them, so placing them waits for the first Node.
        self._pending: dict[ObjectKey, Mapping[str, Any] | None] = {}

    def update(self, nodes: Items, pods: Items, slices: Items) -> tuple[ir.NodeInfo, ...]:
        """NodeInfo for every Node object, sorted by name."""
        self._pending.clear()  # every Pod and EndpointSlice is given here
        dirty: set[str] = set()
        seen: set[ObjectKey] = set()
        for items, place in ((pods, pod_placement), (slices, slice_placement)):
            for key, obj in items:
                seen.add(key)
                last = self._placed.get(key)
                if last is not None and last[0] is obj:
                    continue
                new = place(obj)
                old = last[1] if last is not None else ()
                self._placed[key] = (obj, new)
                if new != old:
                    self._move(old, new, dirty, keep_sorted=False)
        for key in [k for k in self._placed if k not in seen]:
            self._move(self._placed.pop(key)[1], (), dirty, keep_sorted=False)

        return self._node_infos(nodes, dirty)

    def update_changed(
        self,
        changed: Iterable[tuple[ObjectKey, Mapping[str, Any] | None]],
        nodes: Items | None,
    ) -> tuple[ir.NodeInfo, ...]:
        """Like `update`, given only the Pods and EndpointSlices that changed (None: deleted)
        and the Node objects, or None when no Node changed since the last call."""
        if nodes is not None:
            nodes = list(nodes)
        if not (self._nodes if nodes is None else nodes):
            self._pending.update(changed)
            self._nodes, self._infos, self._tuple = [], {}, ()
            return self._tuple
        if self._pending:
            self._pending.update(changed)
            changed, self._pending = self._pending.items(), {}
        changed = list(changed)
        # A few changes keep each node's sorted IPs up to date in place; a big batch (a cold
        # build: every object) leaves the touched nodes to be sorted once in _node_infos.
        keep_sorted = len(changed) <= _FEW
        dirty: set[str] = set()
        gone: list[tuple[str, str]] = []  # a big batch's placements, counted at once below
        came: list[tuple[str, str]] = []
        placed = self._placed
        for key, obj in changed:
            last = placed.pop(key, None)
            old = last[1] if last is not None else ()
            new: Placement = ()
            if obj is not None:
                new = (pod_placement if key.kind == "Pod" else slice_placement)(obj)
                placed[key] = (obj, new)
            if new != old:
                if keep_sorted:
                    self._move(old, new, dirty)
                else:
                    gone += old
                    came += new
        if came or gone:
            self._move_all(gone, came, dirty)
        if nodes is None:
            if not dirty.intersection(self._infos):
                return self._tuple
            nodes = self._nodes
        return self._node_infos(nodes, dirty)

    def _node_infos(self, nodes: Items, dirty: set[str]) -> tuple[ir.NodeInfo, ...]:
        self._nodes = nodes = list(nodes)
        infos: dict[str, ir.NodeInfo] = {}
        for key, obj in sorted(nodes, key=lambda kv: kv[0]):
            address, zone = node_address(obj), node_zone(obj)
            was = self._infos.get(key.name)
            if (
                was is not None
                and key.name not in dirty
                and was.envoy_address == address
                and was.zone == zone
            ):
                infos[key.name] = was
                continue
            if key.name in self._stale:
                self._stale.discard(key.name)
                self._sorted[key.name] = sorted(self._refs.get(key.name, ()))
            ips = tuple(self._sorted.get(key.name, ()))
            infos[key.name] = ir.NodeInfo(key.name, address, ips, zone)
        self._infos = infos
        self._tuple = tuple(infos.values())
        return self._tuple

    def _move_all(
        self, old: list[tuple[str, str]], new: list[tuple[str, str]], dirty: set[str]
    ) -> None:
        """`_move` of a big batch (keep_sorted=False), node by node: a node that had no pod IPs
        and loses none (every node, in a cold build) takes its IPs' counts at once, at C
        speed; on the others each (node, IP) pair is counted once instead of one dictionary
        update per pair. A pair whose count goes to 0 and back within the batch leaves its
        node as it was, not dirty."""
        came, gone = _by_node(new), _by_node(old)
        refs_of, stale = self._refs, self._stale
        for node, ips in came.items():
            if node not in refs_of and node not in gone:
                refs_of[node] = dict(Counter(ips))
                dirty.add(node)
                stale.add(node)
            else:
                self._count(node, Counter(ips), gone.pop(node, []), dirty)
        for node, ips in gone.items():
            self._count(node, Counter(), ips, dirty)

    def _count(self, node: str, counts: Counter[str], gone: list[str], dirty: set[str]) -> None:
        if gone:
            counts.subtract(Counter(gone))
        refs = self._refs.get(node)
        if refs is None:
            self._refs[node] = refs = {}
        for ip, change in counts.items():
            if not change:
                continue
            before = refs.get(ip, 0)
            after = before + change
            if after:
                refs[ip] = after
            else:
                del refs[ip]
            if not before or not after:  # the IP came to or left the node
                dirty.add(node)
                self._stale.add(node)
        if not refs:
            del self._refs[node]

    def _move(
        self, old: Placement, new: Placement, dirty: set[str], keep_sorted: bool = True
    ) -> None:
        for node, ip in old:
            refs = self._refs[node]
            refs[ip] -= 1
            if not refs[ip]:
                del refs[ip]
                dirty.add(node)
                if not keep_sorted or node in self._stale:
                    self._stale.add(node)
                else:
                    ips = self._sorted[node]
                    del ips[bisect.bisect_left(ips, ip)]
                if not refs:
                    del self._refs[node]
        for node, ip in new:
            refs = self._refs.setdefault(node, {})
            refs[ip] = refs.get(ip, 0) + 1
            if refs[ip] == 1:
                dirty.add(node)
                if not keep_sorted or node in self._stale:
                    self._stale.add(node)
                else:
                    bisect.insort(self._sorted.setdefault(node, []), ip)


class ConsumerIndex:
    """Per node, the pod IPs of each namespace that has consumer routes: its clients there.
    Pods only (`pod_placement`: running, with their own network namespace), never EndpointSlice
    endpoints (a hostNetwork pod's endpoint is the node's own address). An IP that Pods of two
    namespaces claim on one node (reused while the old Pod object lingers) is nobody's client:
    the node Envoy cannot tell them apart (and two chains for one source would be refused).

    While some namespace has consumer routes, every Pod is indexed (a conflicting claim may
    come from any namespace): all of them when the first consumer route appears, then only
    the changed ones. Without consumer routes nothing is kept. Not thread-safe."""

    def __init__(self) -> None:
        self._namespaces: frozenset[str] = frozenset()
        self._placed: dict[ObjectKey, Placement] = {}
        # node -> IP -> namespace -> how many Pods of it claim the IP there
        self._owners: Claims = {}
        self._by_node: dict[str, tuple[ir.ConsumerSources, ...]] = {}
        self._result: tuple[ir.ConsumerSources, ...] = ()

    def update(
        self,
        namespaces: frozenset[str],
        changed: Iterable[tuple[ObjectKey, Mapping[str, Any] | None]],
        every: Callable[[], Items],
    ) -> tuple[ir.ConsumerSources, ...]:
        """The sources for `namespaces`, given the objects changed since the last call (None:
        deleted; only Pods are read) and, to start indexing, every Pod."""
        if not namespaces:
            if self._namespaces:
                self._namespaces, self._placed, self._owners = frozenset(), {}, {}
                self._by_node, self._result = {}, ()
            return self._result
        dirty: set[str] = set()  # nodes
        if not self._namespaces:
            for key, pod in every():
                self._place(key, pod, dirty)
        else:
            for key, obj in changed:
                if key.kind == "Pod":
                    self._place(key, obj, dirty)
        if namespaces != self._namespaces:
            self._namespaces = namespaces
            dirty = set(self._owners) | set(self._by_node)
        if not dirty:
            return self._result
        for node in dirty:
            sources: dict[str, list[str]] = {}
            for ip, owners in self._owners.get(node, {}).items():
                if len(owners) == 1:
                    (ns,) = owners
                    if ns in namespaces:
                        sources.setdefault(ns, []).append(ip)
            if sources:
                self._by_node[node] = tuple(
                    ir.ConsumerSources(node, ns, tuple(sorted(ips)))
                    for ns, ips in sorted(sources.items())
                )
            else:
                self._by_node.pop(node, None)
        self._result = tuple(s for node in sorted(self._by_node) for s in self._by_node[node])
        return self._result

    def _place(self, key: ObjectKey, obj: Mapping[str, Any] | None, dirty: set[str]) -> None:
        new = pod_placement(obj) if obj is not None else ()
        old = self._placed.pop(key, ())
        if new:
            self._placed[key] = new
        if new == old:
            return
        ns = key.namespace
        for node, ip in old:
            unclaim(self._owners, node, ip, ns)
            dirty.add(node)
        for node, ip in new:
            claim(self._owners, node, ip, ns)
            dirty.add(node)
