"""IR -> the node agents' service maps (`nodemesh.api.v1.NodeServiceMap`, one per node).

Every node gets every Service (ClusterIP, port): L7 when `ServiceInfo.needs_l7` (the kernel sends
the connection to that node's Envoy at `NodeInfo.envoy_address`:`Mesh.outbound_port`), else L4
with the ready endpoints as backends (address, targetPort). An IPv6 ClusterIP stands for the
Service's first IPv4 ClusterIP (same port); an L7 Service without one gets its IPv6 ClusterIPs
refused, an L4 one leaves them to the cluster's own path. Pure; `ServiceMaps` memoizes.
"""

from __future__ import annotations

import bisect
import hashlib
from collections.abc import Callable, Iterable
from typing import Any, TypeVar

from nodemesh._ip import ip_version
from nodemesh.api import TYPE_URL, Backend, NodeMap, Service, ServiceIPv6
from nodemesh.api import servicemap_pb2 as pb
from nodemesh.api.servicemap import MAX_BACKENDS, service6_message, service_message
from nodemesh.xds.cache import Resource, content_version
from nodemesh.xds.translate import ir

__all__ = ["TYPE_URL", "ServiceMaps", "node_map", "service_entries", "service_entries_ipv6"]


def _is_ipv4(text: str) -> bool:
    return ip_version(text) == 4


def _entries6(info: ir.ServiceInfo) -> tuple[ServiceIPv6, ...]:
    """One entry per (IPv6 ClusterIP, port), where there is something to do."""
    target = next((ip for ip in info.cluster_ips if _is_ipv4(ip)), "")
    if not target and not info.needs_l7:
        return ()
    return tuple(
        ServiceIPv6(f"{info.name}:{port}", ip, port, target, info.needs_l7)
        for ip in info.cluster_ips
        if ip_version(ip) == 6
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


def service_entry_bytes(entry: Service) -> bytes:
    """One `services` entry of a NodeServiceMap (field 3: tag, length, body) as `to_proto`
    encodes it: a message with just that entry serializes to exactly those bytes."""
    return pb.NodeServiceMap(services=[service_message(entry)]).SerializeToString(
        deterministic=True
    )


def service6_entry_bytes(entry: ServiceIPv6) -> bytes:
    """One `services_ipv6` entry (field 5), as `to_proto` encodes it."""
    return pb.NodeServiceMap(services_ipv6=[service6_message(entry)]).SerializeToString(
        deterministic=True
    )


_Key = tuple[str, int, str]  # (address, port, Service name)


def _keyed(service: str, entries: tuple[E, ...]) -> tuple[tuple[_Key, E], ...]:
    """A Service's entries by (address, port, Service name), the first of a repeated
    address:port only (a Service listing a port twice), as `_dedupe` keeps it."""
    out: dict[_Key, E] = {}
    for e in entries:
        out.setdefault((e.address, e.port, service), e)
    return tuple(out.items())


_Keyed = tuple[tuple[_Key, Service], ...]
_Keyed6 = tuple[tuple[_Key, ServiceIPv6], ...]


class _Blob:
    """Every node's `services` (or `services_ipv6`) field, encoded once, each entry's bytes
    made when its Service changes. Ordered by (address, port, Service name): after the first
    Service by name keeps an address:port (as `_dedupe` decides), that is the order `to_proto`
    writes, (address, port, entry name). `segments` is bytes runs, with the entries a node
    must window (more than MAX_BACKENDS backends) left as entries between them."""

    def __init__(self, encode: Callable[[Any], bytes]) -> None:
        self._encode = encode
        self._bytes: dict[_Key, tuple[Any, bytes]] = {}
        self._order: list[_Key] = []
        self.segments: tuple[bytes | Service, ...] = ()
        self.digest = b""
        self._join()  # an empty blob looks the same however it became empty

    def update(self, removed: Iterable[_Key], added: Iterable[tuple[_Key, Any]]) -> None:
        for key in removed:
            del self._bytes[key]
            del self._order[bisect.bisect_left(self._order, key)]
        for key, entry in added:
            self._bytes[key] = (entry, self._encode(entry))
            bisect.insort(self._order, key)
        self._join()

    def _join(self) -> None:
        segments: list[bytes | Service] = []
        run: list[bytes] = []
        last: tuple[str, int] | None = None
        for key in self._order:
            if key[:2] == last:
                continue  # a second Service on one ClusterIP:port: the first by name keeps it
            last = key[:2]
            entry, data = self._bytes[key]
            if isinstance(entry, Service) and len(entry.backends) > MAX_BACKENDS:
                segments += (b"".join(run), entry)
                run = []
            else:
                run.append(data)
        segments.append(b"".join(run))
        self.segments = tuple(segments)
        # one hash of the shared bytes per change, so a node's version need not hash them
        # (each part framed by its kind and length: no two segmentations hash alike)
        digest = hashlib.blake2b(digest_size=16)
        for part in segments:
            data = part if isinstance(part, bytes) else repr(part).encode()
            digest.update(b"be"[isinstance(part, Service)].to_bytes(1, "big"))
            digest.update(len(data).to_bytes(8, "big"))
            digest.update(data)
        self.digest = digest.digest()

    def for_node(self, node: str) -> bytes:
        if len(self.segments) == 1:
            return self.segments[0]  # type: ignore[return-value]
        return b"".join(
            part if isinstance(part, bytes) else service_entry_bytes(_for_node(part, node))
            for part in self.segments
        )


class ServiceMaps:
    """Per node, the service map `Resource` (named after the node); a node whose map did not
    change keeps its Resource (and so its version). Not thread-safe; one per Translator.

    Every node's map lists every Service, so the Services' part of the bytes is made once per
    change and shared: each entry is encoded when its Service changes, the entries are joined
    once, and a node adds only its own fields (node, Envoy address, pod IPs). The bytes equal
    `to_proto(node_map(...)).SerializeToString(deterministic=True)` (tested), field by field
    in number order, so versions are what they were. Still, every node gets the whole list
    again when one Service changes (its map is one resource)."""

    def __init__(self) -> None:
        self._infos: dict[str, tuple[ir.ServiceInfo, _Keyed, _Keyed6]] = {}
        self._services = _Blob(service_entry_bytes)
        self._services6 = _Blob(service6_entry_bytes)
        self._nodes: dict[str, tuple[tuple[object, ...], Resource]] = {}
        self.made = 0

    def resources(self, mesh: ir.Mesh) -> dict[str, Resource]:
        services, services6 = self._update(mesh.services)
        out: dict[str, tuple[tuple[object, ...], Resource]] = {}
        for node in mesh.node_infos:
            key = (node, mesh.outbound_port, services, services6)
            last = self._nodes.get(node.name)
            if last is not None and last[0] == key:
                out[node.name] = last
                continue
            head = pb.NodeServiceMap(node=node.name)
            if node.envoy_address:
                head.envoy.address, head.envoy.port = node.envoy_address, mesh.outbound_port
            local = pb.NodeServiceMap(local_addresses=sorted(node.pod_ips))
            head_bytes = head.SerializeToString(deterministic=True)
            local_bytes = local.SerializeToString(deterministic=True)
            payload = b"".join(
                (
                    head_bytes,
                    self._services.for_node(node.name),
                    local_bytes,
                    self._services6.for_node(node.name),
                )
            )
            # The version hashes the node's own bytes and the shared parts' digests (the
            # node name picks the windows), not its 2.2 MB again: same content, same version.
            version = content_version(
                head_bytes, self._services.digest, local_bytes, self._services6.digest
            )
            resource = Resource.from_payload(
                TYPE_URL,
                node.name,
                payload,
                pb.NodeServiceMap.FromString,
                version=version,
                lazy_entries=True,
            )
            self.made += 1
            out[node.name] = (key, resource)
        self._nodes = out
        return {name: r for name, (_, r) in out.items()}

    def _update(self, services: tuple[ir.ServiceInfo, ...]) -> tuple[object, object]:
        """Bring the shared parts up to `services`; returns their current segments."""
        infos: dict[str, tuple[ir.ServiceInfo, _Keyed, _Keyed6]] = {}
        gone: list[_Key] = []
        gone6: list[_Key] = []
        new: list[tuple[_Key, Service]] = []
        new6: list[tuple[_Key, ServiceIPv6]] = []
        for info in services:
            last = self._infos.get(info.name)
            if last is not None and (last[0] is info or last[0] == info):
                infos[info.name] = last
                continue
            keyed, keyed6 = _keyed(info.name, _entries(info)), _keyed(info.name, _entries6(info))
            infos[info.name] = (info, keyed, keyed6)
            if last is not None:
                gone += (k for k, _ in last[1])
                gone6 += (k for k, _ in last[2])
            new += keyed
            new6 += keyed6
        for name in self._infos.keys() - infos.keys():
            gone += (k for k, _ in self._infos[name][1])
            gone6 += (k for k, _ in self._infos[name][2])
        self._infos = infos
        if gone or new:
            self._services.update(gone, new)
        if gone6 or new6:
            self._services6.update(gone6, new6)
        return self._services.segments, self._services6.segments
