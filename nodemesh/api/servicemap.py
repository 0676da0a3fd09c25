"""The node service map: a small model, and its wire form (servicemap.proto).

On the wire a node's map is two resource types: its `NodeServiceMap` (node Envoy, pod IPs) and
one `MeshService` per Service, shared by every node. `node_to_proto()`/`service_to_proto()` are
what the control plane calls (pure: same model, same bytes); `node_from_proto()` and
`service_from_proto()` are what the agent calls, and report every problem of a resource at
once. `MapView` is the agent's join of them into one `NodeMap` (what the kernel maps hold).
"""

from __future__ import annotations

import bisect
import hashlib
import ipaddress
from collections.abc import Iterable
from dataclasses import dataclass, replace

from nodemesh.api import servicemap_pb2 as pb

__all__ = [
    "NODE_TYPE_URL",
    "SERVICE_TYPE_URL",
    "Backend",
    "MapView",
    "MeshService",
    "NodeMap",
    "NodePart",
    "Service",
    "ServiceIPv6",
    "node_from_proto",
    "node_to_proto",
    "service_from_proto",
    "service_to_proto",
    "split",
    "window",
]

NODE_TYPE_URL = "type.googleapis.com/" + pb.NodeServiceMap.DESCRIPTOR.full_name
SERVICE_TYPE_URL = "type.googleapis.com/" + pb.MeshService.DESCRIPTOR.full_name
MAX_BACKENDS = 32  # mirrors NM_MAX_BACKENDS in nodemesh/ebpf/bpf/nodemesh.h


@dataclass(frozen=True, slots=True)
class Backend:
    address: str
    port: int
    weight: int = 1
    # In `per_node_backends` only: the endpoint's node, whether it is terminating, and its
    # topology hints (zone and node names).
    node: str = ""
    terminating: bool = False
    for_zones: tuple[str, ...] = ()
    for_nodes: tuple[str, ...] = ()


@dataclass(frozen=True, slots=True)
class Service:
    """A destination (ClusterIP or pod IP, port). `l7=True` sends it through the node Envoy.
    With `per_node_backends` (L4: `internalTrafficPolicy: Local`, or topology hints), each
    node picks its own from them (`for_node()`) instead of `backends`."""

    name: str
    address: str
    port: int
    l7: bool
    backends: tuple[Backend, ...] = ()
    node_local: bool = False
    client_ip_affinity: bool = False  # L4: a client pod's connections go to one backend
    per_node_backends: tuple[Backend, ...] = ()

    def for_node(self, node: str, zone: str = "") -> Service:
        """The entry as the kernel map of `node` (in `zone`) holds it, before windowing, as
        kube-proxy chooses (pkg/proxy/topology.go). For a `node_local` Service: the backends
        on that node, the ready ones, or with none ready the serving terminating ones; none
        there leaves it without backends, so its connections are refused. Otherwise the ready
        ones, narrowed by topology hints when every ready one has some: to those hinted for
        this node, if any is (PreferSameNode), else to those for this zone, if any is; with
        none ready, the serving terminating ones, whatever their hints. Entries without
        `per_node_backends` as they are."""
        listed = self.per_node_backends
        if not listed and not self.node_local:
            return self
        if self.node_local:
            mine = [b for b in listed if b.node == node]
            ready = [b for b in mine if not b.terminating]
            chosen = ready or mine
        else:
            ready = [b for b in listed if not b.terminating]
            if (
                ready
                and all(b.for_nodes for b in ready)
                and any(node in b.for_nodes for b in ready)
            ):
                ready = [b for b in ready if node in b.for_nodes]
            elif (
                ready
                and all(b.for_zones for b in ready)
                and any(zone in b.for_zones for b in ready)
            ):
                ready = [b for b in ready if zone in b.for_zones]
            chosen = ready or [b for b in listed if b.terminating]
        backends = tuple(Backend(b.address, b.port, b.weight) for b in chosen)
        return replace(self, backends=backends, node_local=False, per_node_backends=())


@dataclass(frozen=True, slots=True)
class ServiceIPv6:
    """An IPv6 ClusterIP, handled at connect() as `target` (the same Service's IPv4 ClusterIP,
    same port). With no target it is refused, which only L7 Services need (fail closed)."""

    name: str
    address: str
    port: int
    target: str = ""
    l7: bool = False


@dataclass(frozen=True, slots=True)
class NodeMap:
    node: str
    services: tuple[Service, ...] = ()
    envoy: tuple[str, int] | None = None  # the node Envoy's outbound listener
    local_addresses: tuple[str, ...] = ()  # pod IPs on this node
    services_ipv6: tuple[ServiceIPv6, ...] = ()
    redirect_on: tuple[str, ...] = ()  # of local_addresses: Pods that say socket-redirect "on"
    redirect_off: tuple[str, ...] = ()  # ... and "off"


@dataclass(frozen=True, slots=True)
class NodePart:
    """What only one node has: the `NodeServiceMap` resource."""

    node: str
    envoy: tuple[str, int] | None = None
    local_addresses: tuple[str, ...] = ()
    redirect_on: tuple[str, ...] = ()  # as in NodeMap
    redirect_off: tuple[str, ...] = ()
    zone: str = ""  # the Node's topology.kubernetes.io/zone label: which hints to follow


@dataclass(frozen=True, slots=True)
class MeshService:
    """One Service's entries ("namespace/name"): the `MeshService` resource, the same for every
    node. Its backends are not windowed (`window()` does that per node)."""

    name: str
    services: tuple[Service, ...] = ()
    services_ipv6: tuple[ServiceIPv6, ...] = ()


def node_to_proto(part: NodePart) -> pb.NodeServiceMap:
    """Addresses are sorted, so equal parts give equal bytes (and equal xDS versions)."""
    msg = pb.NodeServiceMap(
        node=part.node,
        local_addresses=sorted(part.local_addresses),
        socket_redirect_on=sorted(part.redirect_on),
        socket_redirect_off=sorted(part.redirect_off),
        zone=part.zone,
    )
    if part.envoy is not None:
        msg.envoy.address, msg.envoy.port = part.envoy
    return msg


def service_to_proto(svc: MeshService) -> pb.MeshService:
    """Entries in the order given (the control plane gives them in a stable order)."""
    return pb.MeshService(
        name=svc.name,
        services=[service_message(e) for e in svc.services],
        services_ipv6=[service6_message(e) for e in svc.services_ipv6],
    )


def split(model: NodeMap) -> tuple[NodePart, tuple[MeshService, ...]]:
    """A whole node map as the resources that carry it: entries are grouped by the Service in
    their name ("namespace/name:port"). For callers that hold a `NodeMap` (tests, tools)."""
    groups: dict[str, tuple[list[Service], list[ServiceIPv6]]] = {}
    for svc in model.services:
        groups.setdefault(svc.name.rpartition(":")[0] or svc.name, ([], []))[0].append(svc)
    for v6 in model.services_ipv6:
        groups.setdefault(v6.name.rpartition(":")[0] or v6.name, ([], []))[1].append(v6)
    part = NodePart(
        model.node, model.envoy, model.local_addresses, model.redirect_on, model.redirect_off
    )
    return part, tuple(
        MeshService(name, tuple(v4), tuple(v6)) for name, (v4, v6) in sorted(groups.items())
    )


def service_message(svc: Service) -> pb.Service:
    """One `services` entry of a NodeServiceMap."""
    return pb.Service(
        name=svc.name,
        address=svc.address,
        port=svc.port,
        mode=pb.Service.L7 if svc.l7 else pb.Service.L4,
        backends=[_backend_message(b) for b in svc.backends],
        node_local=svc.node_local,
        client_ip_affinity=svc.client_ip_affinity,
        per_node_backends=[_backend_message(b) for b in svc.per_node_backends],
    )


def _backend_message(b: Backend) -> pb.Backend:
    return pb.Backend(
        address=b.address,
        port=b.port,
        weight=b.weight,
        node=b.node,
        terminating=b.terminating,
        for_zones=b.for_zones,
        for_nodes=b.for_nodes,
    )


def service6_message(v6: ServiceIPv6) -> pb.ServiceIPv6:
    """One `services_ipv6` entry of a NodeServiceMap."""
    return pb.ServiceIPv6(
        name=v6.name, address=v6.address, port=v6.port, target=v6.target, l7=v6.l7
    )


def _ipv6(text: str, where: str, problems: list[str]) -> None:
    try:
        addr = ipaddress.IPv6Address(text)
    except ValueError:
        problems.append(f"{where}: {text!r} is not an IPv6 address")
        return
    if addr.ipv4_mapped is not None:
        problems.append(f"{where}: {text!r} is v4-mapped (list its IPv4 address instead)")


def _canonical6(text: str) -> str:
    """`text` as `ipaddress` writes it (`fd00:96::10` for `FD00:96:0::10`); as it is when it
    is no IPv6 address (`_ipv6` says so)."""
    try:
        return str(ipaddress.IPv6Address(text))
    except ValueError:
        return text


def _ipv4(text: str, where: str, problems: list[str]) -> None:
    try:
        ipaddress.IPv4Address(text)
    except ValueError:
        problems.append(f"{where}: {text!r} is not an IPv4 address")


def _port(port: int, where: str, problems: list[str]) -> None:
    if not 1 <= port <= 65535:
        problems.append(f"{where}: port {port} is outside 1-65535")


def node_from_proto(msg: pb.NodeServiceMap) -> NodePart:
    """Validate and convert. Raises ValueError naming every problem found."""
    problems: list[str] = []
    envoy: tuple[str, int] | None = None
    if msg.HasField("envoy"):
        _ipv4(msg.envoy.address, "envoy", problems)
        _port(msg.envoy.port, "envoy", problems)
        envoy = (msg.envoy.address, msg.envoy.port)
    for addr in msg.local_addresses:
        _ipv4(addr, "local_addresses", problems)
    for field in ("socket_redirect_on", "socket_redirect_off"):
        for addr in getattr(msg, field):
            _ipv4(addr, field, problems)
    if problems:
        raise ValueError(f"node {msg.node!r}: " + "; ".join(problems))
    return NodePart(
        msg.node,
        envoy,
        tuple(msg.local_addresses),
        tuple(msg.socket_redirect_on),
        tuple(msg.socket_redirect_off),
        msg.zone,
    )


def service_from_proto(msg: pb.MeshService) -> MeshService:
    """Validate and convert. Raises ValueError naming every problem found. One address and
    port twice in one Service is a problem; in two Services it is not (`MapView` decides)."""
    problems: list[str] = []
    services: list[Service] = []
    seen: dict[tuple[str, int], str] = {}
    for s in msg.services:
        where = f"service {s.name or '?'} ({s.address}:{s.port})"
        _ipv4(s.address, where, problems)
        _port(s.port, where, problems)
        if (s.address, s.port) in seen:
            problems.append(f"{where}: same address and port as {seen[(s.address, s.port)]}")
        seen[(s.address, s.port)] = s.name
        if s.mode == pb.Service.MODE_UNSPECIFIED:
            problems.append(f"{where}: mode is unset (L4 or L7)")
        backends: list[Backend] = []
        local: list[Backend] = []
        for listed, into in ((s.backends, backends), (s.per_node_backends, local)):
            for b in listed:
                _ipv4(b.address, f"{where} backend", problems)
                _port(b.port, f"{where} backend", problems)
                if b.weight > 65535:
                    problems.append(f"{where} backend {b.address}: weight {b.weight} > 65535")
                into.append(
                    Backend(
                        b.address,
                        b.port,
                        b.weight or 1,
                        b.node,
                        b.terminating,
                        tuple(b.for_zones),
                        tuple(b.for_nodes),
                    )
                )
        for flag in ("node_local", "client_ip_affinity", "per_node_backends"):
            if getattr(s, flag) and s.mode != pb.Service.L4:
                problems.append(f"{where}: {flag} in an entry that is not L4")
        services.append(
            Service(
                s.name,
                s.address,
                s.port,
                s.mode == pb.Service.L7,
                tuple(backends),
                s.node_local,
                s.client_ip_affinity,
                tuple(local),
            )
        )
    services6: list[ServiceIPv6] = []
    seen6: dict[tuple[str, int], str] = {}
    for v6 in msg.services_ipv6:
        where = f"service {v6.name or '?'} ([{v6.address}]:{v6.port})"
        _ipv6(v6.address, where, problems)
        _port(v6.port, where, problems)
        if v6.target:
            _ipv4(v6.target, f"{where} target", problems)
        elif not v6.l7:
            problems.append(f"{where}: no target and not L7 (nothing to do)")
        # One address has many spellings and one kernel key: the view keys by the canonical.
        address = _canonical6(v6.address)
        key = (address, v6.port)
        if key in seen6:
            problems.append(f"{where}: same address and port as {seen6[key]}")
        seen6[key] = v6.name
        services6.append(ServiceIPv6(v6.name, address, v6.port, v6.target, v6.l7))
    if problems:
        raise ValueError(f"MeshService {msg.name!r}: " + "; ".join(problems))
    return MeshService(msg.name, tuple(services), tuple(services6))


def window(entry: Service, node: str) -> Service:
    """A kernel service value holds at most MAX_BACKENDS backends. Each node takes its own
    window of a larger set (an offset from a hash of its name), so together the nodes still
    spread over every backend. With client IP affinity, the MAX_BACKENDS that score highest
    for the node (rendezvous hashing) instead: a backend added or removed changes the window
    by that backend alone, where the offset moves it whole (and the clients whose backend
    left it with it)."""
    n = len(entry.backends)
    if n <= MAX_BACKENDS:
        return entry
    if entry.client_ip_affinity:
        scored = sorted(
            range(n),
            key=lambda i: hashlib.blake2b(
                f"{node}|{entry.backends[i].address}|{entry.backends[i].port}".encode(),
                digest_size=8,
            ).digest(),
        )
        return replace(
            entry, backends=tuple(entry.backends[i] for i in sorted(scored[:MAX_BACKENDS]))
        )
    start = int.from_bytes(hashlib.blake2b(node.encode(), digest_size=4).digest(), "big") % n
    backends = tuple(entry.backends[(start + i) % n] for i in range(MAX_BACKENDS))
    return replace(entry, backends=backends)


Key = tuple[str, int]  # (address, port)


class MapView:
    """The agent's join of its `NodePart` and every `MeshService` into the `NodeMap` its kernel
    maps hold. Where Services claim one address and port, the first by name keeps it (so it
    does not matter in which order they arrive). `update()` reports the keys whose entry may
    have changed, so the agent writes only those."""

    def __init__(self, node: str) -> None:
        self.node = node
        self.part = NodePart(node)
        self._services: dict[str, MeshService] = {}
        self._owners4: dict[Key, list[str]] = {}  # names, sorted
        self._owners6: dict[Key, list[str]] = {}

    def __len__(self) -> int:
        return len(self._services)

    def update(
        self, upserts: Iterable[MeshService] = (), removed: Iterable[str] = ()
    ) -> tuple[set[Key], set[Key]]:
        """Apply one response's changes: (IPv4 keys, IPv6 keys) touched."""
        keys4: set[Key] = set()
        keys6: set[Key] = set()
        for name in removed:
            old = self._services.pop(name, None)
            if old is not None:
                self._index(old, keys4, keys6, add=False)
        for svc in upserts:
            old = self._services.get(svc.name)
            if old is not None:
                self._index(old, keys4, keys6, add=False)
            self._services[svc.name] = svc
            self._index(svc, keys4, keys6, add=True)
        return keys4, keys6

    def _index(self, svc: MeshService, keys4: set[Key], keys6: set[Key], add: bool) -> None:
        for owners, keys, entries in (
            (self._owners4, keys4, svc.services),
            (self._owners6, keys6, svc.services_ipv6),
        ):
            for key in {(e.address, e.port) for e in entries}:
                keys.add(key)
                names = owners.setdefault(key, [])
                if add:
                    bisect.insort(names, svc.name)
                else:
                    names.remove(svc.name)
                    if not names:
                        del owners[key]

    def service(self, key: Key) -> Service | None:
        """The entry the kernel should hold for an IPv4 address and port (windowed)."""
        names = self._owners4.get(key)
        if not names:
            return None
        entry = next(e for e in self._services[names[0]].services if (e.address, e.port) == key)
        return window(entry.for_node(self.node, self.part.zone), self.node)

    def service6(self, key: Key) -> ServiceIPv6 | None:
        names = self._owners6.get(key)
        if not names:
            return None
        svc = self._services[names[0]]
        return next(e for e in svc.services_ipv6 if (e.address, e.port) == key)

    def model(self) -> NodeMap:
        services = tuple(e for k in sorted(self._owners4) if (e := self.service(k)) is not None)
        services6 = tuple(e6 for k in sorted(self._owners6) if (e6 := self.service6(k)) is not None)
        part = self.part
        return NodeMap(
            part.node,
            services,
            part.envoy,
            part.local_addresses,
            services6,
            part.redirect_on,
            part.redirect_off,
        )
