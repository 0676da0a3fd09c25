"""IR -> the node agents' service maps (`nodemesh.api.v1.NodeServiceMap`, one per node).

Every node gets every Service (ClusterIP, port): L7 when `ServiceInfo.needs_l7` (the kernel sends
the connection to that node's Envoy at `NodeInfo.envoy_address`:`Mesh.outbound_port`), else L4
with the ready endpoints as backends (address, targetPort). An IPv6 ClusterIP stands for the
Service's first IPv4 ClusterIP (same port); an L7 Service without one gets its IPv6 ClusterIPs
refused, an L4 one leaves them to the cluster's own path. Pure; `ServiceMaps` memoizes.
"""

from __future__ import annotations

import hashlib
import ipaddress
from collections.abc import Iterable
from typing import TypeVar

from nodemesh.api import TYPE_URL, Backend, NodeMap, Service, ServiceIPv6, to_proto
from nodemesh.api.servicemap import MAX_BACKENDS
from nodemesh.xds.cache import Resource
from nodemesh.xds.translate import ir

__all__ = ["TYPE_URL", "ServiceMaps", "node_map", "service_entries", "service_entries_ipv6"]


def _ip_version(text: str) -> int:
    """4 or 6, or 0 for what is not an IP address."""
    try:
        return ipaddress.ip_address(text).version
    except ValueError:
        return 0


def _is_ipv4(text: str) -> bool:
    return _ip_version(text) == 4


def _entries6(info: ir.ServiceInfo) -> tuple[ServiceIPv6, ...]:
    """One entry per (IPv6 ClusterIP, port), where there is something to do."""
    target = next((ip for ip in info.cluster_ips if _is_ipv4(ip)), "")
    if not target and not info.needs_l7:
        return ()
    return tuple(
        ServiceIPv6(f"{info.name}:{port}", ip, port, target, info.needs_l7)
        for ip in info.cluster_ips
        if _ip_version(ip) == 6
        for port in info.ports
    )


def _entries(info: ir.ServiceInfo) -> tuple[Service, ...]:
    """One entry per (IPv4 ClusterIP, port): the agent's maps are IPv4 only."""
    out = []
    for ip in info.cluster_ips:
        if not _is_ipv4(ip):
            continue
        for i, port in enumerate(info.ports):
            name = f"{info.name}:{port}"
            if info.needs_l7:
                out.append(Service(name, ip, port, True))
                continue
            eps = info.backends[i] if i < len(info.backends) else ()
            backends = {
                (e.address, e.port): Backend(e.address, e.port)
                for e in eps
                if not e.draining and _is_ipv4(e.address)
            }
            out.append(Service(name, ip, port, False, tuple(backends[k] for k in sorted(backends))))
    return tuple(out)


def service_entries(services: Iterable[ir.ServiceInfo]) -> tuple[Service, ...]:
    """The node-independent part of every map. Two Services claiming one ClusterIP:port (only
    possible with hand-written input) would make the agent refuse the whole map: the first by
    name keeps it."""
    return _dedupe(_entries(info) for info in sorted(services, key=lambda s: s.name))


def service_entries_ipv6(services: Iterable[ir.ServiceInfo]) -> tuple[ServiceIPv6, ...]:
    return _dedupe(_entries6(info) for info in sorted(services, key=lambda s: s.name))


E = TypeVar("E", Service, ServiceIPv6)


def _dedupe(groups: Iterable[tuple[E, ...]]) -> tuple[E, ...]:
    seen: set[tuple[str, int]] = set()
    out = []
    for group in groups:
        for entry in group:
            if (entry.address, entry.port) not in seen:
                seen.add((entry.address, entry.port))
                out.append(entry)
    return tuple(out)


def _for_node(entry: Service, node: str) -> Service:
    """A kernel service value holds at most MAX_BACKENDS backends. Each node takes its own
    window of a larger set (an offset from a hash of its name), so together the nodes still
    spread over every backend."""
    n = len(entry.backends)
    if n <= MAX_BACKENDS:
        return entry
    start = int.from_bytes(hashlib.blake2b(node.encode(), digest_size=4).digest(), "big") % n
    window = tuple(entry.backends[(start + i) % n] for i in range(MAX_BACKENDS))
    return Service(entry.name, entry.address, entry.port, False, window)


def node_map(
    node: ir.NodeInfo,
    entries: tuple[Service, ...],
    envoy_port: int,
    entries6: tuple[ServiceIPv6, ...] = (),
) -> NodeMap:
    """The model for one node. Without an Envoy address L7 services are refused on that node."""
    if any(len(e.backends) > MAX_BACKENDS for e in entries):
        entries = tuple(_for_node(e, node.name) for e in entries)
    envoy = (node.envoy_address, envoy_port) if node.envoy_address else None
    return NodeMap(node.name, entries, envoy, node.pod_ips, entries6)


class ServiceMaps:
    """Per node, the service map `Resource` (named after the node); a node whose map did not
    change keeps its Resource (and so its version). Not thread-safe; one per Translator."""

    def __init__(self) -> None:
        self._infos: dict[
            str, tuple[ir.ServiceInfo, tuple[Service, ...], tuple[ServiceIPv6, ...]]
        ] = {}
        self._entries: tuple[Service, ...] = ()
        self._entries6: tuple[ServiceIPv6, ...] = ()
        self._nodes: dict[str, tuple[NodeMap, Resource]] = {}
        self.made = 0

    def resources(self, mesh: ir.Mesh) -> dict[str, Resource]:
        entries = self._service_entries(mesh.services)
        out: dict[str, tuple[NodeMap, Resource]] = {}
        for node in mesh.node_infos:
            model = node_map(node, entries, mesh.outbound_port, self._entries6)
            last = self._nodes.get(node.name)
            if last is not None and last[0] == model:
                out[node.name] = last
                continue
            resource = Resource.from_message(to_proto(model), name=node.name, type_url=TYPE_URL)
            self.made += 1
            out[node.name] = (model, resource)
        self._nodes = out
        return {name: r for name, (_, r) in out.items()}

    def _service_entries(self, services: tuple[ir.ServiceInfo, ...]) -> tuple[Service, ...]:
        infos: dict[str, tuple[ir.ServiceInfo, tuple[Service, ...], tuple[ServiceIPv6, ...]]]
        infos = {}
        changed = len(services) != len(self._infos)
        for info in services:
            last = self._infos.get(info.name)
            if last is not None and (last[0] is info or last[0] == info):
                infos[info.name] = last
            else:
                infos[info.name] = (info, _entries(info), _entries6(info))
                changed = True
        self._infos = infos
        if changed:
            self._entries = _dedupe(infos[name][1] for name in sorted(infos))
            self._entries6 = _dedupe(infos[name][2] for name in sorted(infos))
        return self._entries
