"""IR -> the node agents' feed: one `MeshService` resource per Service, shared by every node,
and one `NodeServiceMap` per node (its node Envoy and pod IPs). See servicemap.proto.

A Service's entries: one per (IPv4 ClusterIP, port), L7 for `ServiceInfo.l7_ports` (the kernel
sends the connection to the node Envoy at `NodeInfo.envoy_address`:`Mesh.outbound_port`), else
L4 with the ready endpoints as backends (address, targetPort; with none ready, the serving
terminating ones, as kube-proxy), all of them: each agent takes
its own window when there are more than the kernel holds. An IPv6 ClusterIP stands for the
Service's first IPv4 ClusterIP (same port); without one, an L7 port gets its IPv6 ClusterIPs
refused, an L4 one leaves them to the cluster's own path. Pure; `ServiceMaps` memoizes.
"""

from __future__ import annotations

from collections.abc import Iterable
from itertools import compress, groupby, islice
from operator import eq, is_not, itemgetter
from typing import TypeVar

from nodemesh._ip import all_dotted_quads, ip_version, is_dotted_quad
from nodemesh.api import (
    NODE_TYPE_URL,
    SERVICE_TYPE_URL,
    Backend,
    MeshService,
    NodePart,
    Service,
    ServiceIPv6,
)
from nodemesh.api import servicemap_pb2 as pb
from nodemesh.xds._wire import varint
from nodemesh.xds.cache import Resource
from nodemesh.xds.translate import ir

__all__ = ["NODE_TYPE_URL", "SERVICE_TYPE_URL", "ServiceMaps", "mesh_service", "node_part"]


def _is_ipv4(text: str) -> bool:
    return ip_version(text) == 4


E = TypeVar("E", Service, ServiceIPv6)


def _first_per_key(entries: Iterable[E]) -> tuple[E, ...]:
    """A Service listing one port twice: its first entry for an address and port keeps it."""
    out: dict[tuple[str, int], E] = {}
    for e in entries:
        out.setdefault((e.address, e.port), e)
    return tuple(out.values())


def _entries6(info: ir.ServiceInfo) -> tuple[ServiceIPv6, ...]:
    """One entry per (IPv6 ClusterIP, port), where there is something to do."""
    target = next((ip for ip in info.cluster_ips if _is_ipv4(ip)), "")
    if not target and not info.l7_ports:
        return ()
    return _first_per_key(
        ServiceIPv6(f"{info.name}:{port}", ip, port, target, port in info.l7_ports)
        for ip in info.cluster_ips
        if ip_version(ip) == 6
        for port in info.ports
        # without an IPv4 stand-in, only an L7 port has something to do (refuse, fail closed);
        # an L4 one is left to the cluster's own path
        if target or port in info.l7_ports
    )


def _entries(info: ir.ServiceInfo) -> tuple[Service, ...]:
    """One entry per (IPv4 ClusterIP, port): the agent's maps are IPv4 only."""
    out = []
    for ip in info.cluster_ips:
        if not _is_ipv4(ip):
            continue
        for i, port in enumerate(info.ports):
            name = f"{info.name}:{port}"
            if port in info.l7_ports:
                out.append(Service(name, ip, port, True))
                continue
            eps = info.backends[i] if i < len(info.backends) else ()
            v4 = [e for e in eps if _is_ipv4(e.address)]
            # the ready ones; with none, the serving terminating ones (KEP-1669)
            usable = [e for e in v4 if not e.draining] or v4
            backends = {(e.address, e.port): Backend(e.address, e.port) for e in usable}
            listed = tuple(backends[k] for k in sorted(backends))
            local: dict[tuple[str, int], Backend] = {}
            if info.node_local or any(e.hints for e in v4):
                # every node's agent picks its own: all of them, with node, terminating and
                # hints (the first of an address and port in sorted order: a ready one first)
                for e in sorted(v4):
                    zones, nodes = e.hints or ((), ())
                    local.setdefault(
                        (e.address, e.port),
                        Backend(e.address, e.port, 1, e.node, e.draining, zones, nodes),
                    )
            out.append(
                Service(
                    name,
                    ip,
                    port,
                    False,
                    listed,
                    info.node_local,
                    info.client_ip_affinity,
                    tuple(local[k] for k in sorted(local)),
                )
            )
    return _first_per_key(out)


def mesh_service(info: ir.ServiceInfo) -> MeshService | None:
    """The Service's resource; None when the agents have nothing to do for it (no ClusterIP
    they handle)."""
    v4, v6 = _entries(info), _entries6(info)
    return MeshService(info.name, v4, v6) if v4 or v6 else None


def node_part(
    node: ir.NodeInfo, envoy_port: int, redirect: ir.SocketRedirectPods | None = None
) -> NodePart:
    """Without an Envoy address, L7 services are refused on that node. `redirect`: the node's
    Pods that chose about the socket short cut; only IPs in `pod_ips` are listed."""
    envoy = (node.envoy_address, envoy_port) if node.envoy_address else None
    on, off = _choices(node, redirect)
    return NodePart(node.name, envoy, node.pod_ips, on, off, node.zone)


def _choices(
    node: ir.NodeInfo, redirect: ir.SocketRedirectPods | None
) -> tuple[tuple[str, ...], tuple[str, ...]]:
    if redirect is None:
        return (), ()
    local = set(node.pod_ips)
    return (
        tuple(ip for ip in redirect.on if ip in local),
        tuple(ip for ip in redirect.off if ip in local),
    )


def _node_message(
    node: ir.NodeInfo, envoy_port: int, redirect: ir.SocketRedirectPods | None = None
) -> pb.NodeServiceMap:
    """`node_to_proto(node_part(...))` without sorting again: `NodeInfo.pod_ips` and the
    choices are sorted (a node may hold 10,000 pod IPs; tests hold the two equal)."""
    on, off = _choices(node, redirect)
    msg = pb.NodeServiceMap(
        node=node.name,
        local_addresses=node.pod_ips,
        socket_redirect_on=on,
        socket_redirect_off=off,
        zone=node.zone,
    )
    if node.envoy_address:
        msg.envoy.address, msg.envoy.port = node.envoy_address, envoy_port
    return msg


def _ld(tag_byte: bytes, payload: bytes) -> bytes:
    """A length-delimited field."""
    return tag_byte + varint(len(payload)) + payload


_MS_NAME, _MS_SERVICES, _MS_V6 = b"\x0a", b"\x12", b"\x1a"  # MeshService fields 1, 2, 3
_S_NAME, _S_ADDRESS, _S_PORT, _S_MODE, _S_BACKENDS = b"\x0a", b"\x12", b"\x18", b"\x20", b"\x2a"
_B_ADDRESS, _B_PORT, _B_WEIGHT_1 = b"\x0a", b"\x10", b"\x18\x01"  # Backend; weight is always 1
_V6_NAME, _V6_ADDRESS, _V6_PORT, _V6_TARGET, _V6_L7 = (
    b"\x0a",
    b"\x12",
    b"\x18",
    b"\x22",
    b"\x28\x01",
)
_L4, _L7 = varint(pb.Service.L4), varint(pb.Service.L7)
_S_NODE_LOCAL, _S_AFFINITY = b"\x30\x01", b"\x38\x01"  # Service fields 6, 7 (true)
_S_PER_NODE_BACKENDS = b"\x42"  # Service field 8
_B_NODE, _B_TERMINATING = b"\x22", b"\x28\x01"  # Backend fields 4, 5
_B_FOR_ZONES, _B_FOR_NODES = b"\x32", b"\x3a"  # Backend fields 6, 7


def mesh_service_bytes(info: ir.ServiceInfo) -> bytes | None:
    """`service_to_proto(mesh_service(info))` serialized (deterministic), encoded by hand: a
    cold start makes 10,000 of them (~4x faster than through the dataclasses and protobuf;
    tests hold the two equal). None when `mesh_service` is None."""
    name = info.name
    ips = info.cluster_ips
    v4 = [ip for ip in ips if is_dotted_quad(ip)]
    if len(v4) != len(ips):  # not only canonical dotted quads: ipaddress decides
        v4 = [ip for ip in ips if _is_ipv4(ip)]
    out: list[bytes] = []
    seen: set[tuple[str, int]] = set()
    ports = info.ports
    for ip in v4:
        ip_field = _S_ADDRESS + _str(ip)
        for i, port in enumerate(ports):
            if (ip, port) in seen:
                continue  # a port listed twice: the first entry keeps it
            seen.add((ip, port))
            head = _S_NAME + _str(f"{name}:{port}") + ip_field + _port(_S_PORT, port)
            if port in info.l7_ports:
                out.append(_ld(_MS_SERVICES, head + _S_MODE + _L7))
                continue
            eps = info.backends[i] if i < len(info.backends) else ()
            per_node = info.node_local or _hinted(eps)
            if per_node or info.client_ip_affinity:  # (rare)
                body = b"".join(
                    [
                        head,
                        _S_MODE,
                        _L4,
                        *_backends(eps),
                        _S_NODE_LOCAL if info.node_local else b"",
                        _S_AFFINITY if info.client_ip_affinity else b"",
                        *(_per_node_backends(eps) if per_node else ()),
                    ]
                )
                out.append(_ld(_MS_SERVICES, body))
                continue
            out.append(_ld(_MS_SERVICES, b"".join([head, _S_MODE, _L4, *_backends(eps)])))
    # IPv6 entries: only where a ClusterIP is not an IPv4 one (most Services have none)
    v6 = _entries6(info) if len(v4) != len(ips) else ()
    if not out and not v6:
        return None
    for e in v6:
        body6 = _V6_NAME + _str(e.name) + _V6_ADDRESS + _str(e.address) + _port(_V6_PORT, e.port)
        if e.target:
            body6 += _V6_TARGET + _str(e.target)
        if e.l7:
            body6 += _V6_L7
        out.append(_ld(_MS_V6, body6))
    return _MS_NAME + _str(name) + b"".join(out)


def _backends(eps: tuple[ir.Endpoint, ...]) -> list[bytes]:
    """The `backends` fields of an L4 entry: the ready IPv4 endpoints' (address, port), sorted,
    each once; if none is ready, the terminating ones that still serve (build leaves out the
    others), as kube-proxy does (KEP-1669: a Deployment of one replica being restarted; they
    were left out, and connect() was refused while the Envoy path served them). 100,000 of
    them in a cold start: endpoints come sorted from build (sorting them again is one linear
    pass), and every length fits in one byte (heads made once)."""
    if not all_dotted_quads([e.address for e in eps]):  # one regex pass: the usual case is
        eps = tuple(e for e in eps if _is_ipv4(e.address))
    ready = [(a, p) for a, p, draining, _, _, _ in eps if not draining]
    if not ready:
        ready = [(a, p) for a, p, _, _, _, _ in eps]
    ready.sort()
    if any(map(eq, ready, islice(ready, 1, None))):
        ready = [pair for pair, _ in groupby(ready)]
    pieces: list[bytes] = []
    last_target, tail, heads = -1, b"", _NO_HEADS
    for address, target in ready:
        if target != last_target:
            last_target, tail = target, _port(_B_PORT, target) + _B_WEIGHT_1
            heads = _backend_heads(len(tail))
        a = address.encode()
        n = len(a)
        if n < len(heads):
            pieces += (heads[n], a, tail)
        else:
            backend = _B_ADDRESS + varint(n) + a + tail
            pieces += (_S_BACKENDS, varint(len(backend)), backend)
    return pieces


def _hinted(eps: tuple[ir.Endpoint, ...]) -> bool:
    """Whether an IPv4 endpoint carries topology hints (their Service asked for them: rare).
    Runs for every L4 port of a cold build: the usual answer at C speed, without a Python
    step per endpoint."""
    if not any(map(_HINTS, eps)):
        return False
    return any(e.hints and _is_ipv4(e.address) for e in eps)


_HINTS = itemgetter(5)  # ir.Endpoint.hints


def _per_node_backends(eps: tuple[ir.Endpoint, ...]) -> list[bytes]:
    """The `per_node_backends` fields of an entry whose nodes choose differently (Local, or
    endpoints with topology hints; rare): every IPv4 endpoint build kept (ready or serving
    terminating), each address and port once (its first in sorted order, which puts a ready
    one first), with its node, whether it is terminating and its hints."""
    pieces: list[bytes] = []
    seen: set[tuple[str, int]] = set()
    for e in sorted(e for e in eps if _is_ipv4(e.address)):
        if (e.address, e.port) in seen:
            continue
        seen.add((e.address, e.port))
        backend = _B_ADDRESS + _str(e.address) + _port(_B_PORT, e.port) + _B_WEIGHT_1
        if e.node:
            backend += _B_NODE + _str(e.node)
        if e.draining:
            backend += _B_TERMINATING
        if e.hints:
            for tag, names in zip((_B_FOR_ZONES, _B_FOR_NODES), e.hints, strict=True):
                backend += b"".join(tag + _str(n) for n in names)
        pieces.append(_ld(_S_PER_NODE_BACKENDS, backend))
    return pieces


_NO_HEADS: list[bytes] = []
_HEADS: dict[int, list[bytes]] = {}


def _backend_heads(tail_size: int) -> list[bytes]:
    """By address size n: the bytes before a Backend's address (the `backends` tag and the
    message's length, the address tag and n), for every n whose lengths fit in one byte."""
    heads = _HEADS.get(tail_size)
    if heads is None:
        heads = [
            bytes((_S_BACKENDS[0], 2 + n + tail_size, _B_ADDRESS[0], n))
            for n in range(0x80 - 2 - tail_size)
        ]
        _HEADS[tail_size] = heads
    return heads


def _str(text: str) -> bytes:
    """A string's length and bytes (after its tag)."""
    data = text.encode()
    return varint(len(data)) + data


def _port(tag_byte: bytes, port: int) -> bytes:
    return tag_byte + varint(port) if port else b""  # proto3 leaves a zero out


def _service_resource(payload: bytes, name: str) -> Resource:
    return Resource.from_payload(SERVICE_TYPE_URL, name, payload, pb.MeshService.FromString)


# what a node's resource is made from: its NodeInfo, the Envoy port, its Pods' choices
_NodeKey = tuple[ir.NodeInfo, int, ir.SocketRedirectPods | None]


class ServiceMaps:
    """Memoizes the feed: a Service's `MeshService` resource is made when its `ServiceInfo`
    changes, a node's `NodeServiceMap` when its `NodeInfo` (or the Envoy port) does; the rest
    keep their Resource (and version). Not thread-safe; one per Translator."""

    def __init__(self) -> None:
        self._services: dict[str, tuple[ir.ServiceInfo, Resource | None]] = {}
        # the last `services` seen, their resources by position, the resources returned and
        # where each position's is in them: the identity fast path patches that in place
        self._last: tuple[
            tuple[ir.ServiceInfo, ...], list[Resource | None], tuple[Resource, ...], list[int]
        ] = ((), [], (), [])
        self._nodes: dict[str, tuple[_NodeKey, Resource]] = {}
        self.made = 0  # resources made, both types
        self.upserts: tuple[Resource, ...] | None = None  # see service_resources

    def service_resources(
        self,
        services: tuple[ir.ServiceInfo, ...],
        previous: tuple[ir.ServiceInfo, ...] | None = None,
        positions: list[int] | None = None,
    ) -> tuple[Resource, ...]:
        """One resource per Service that has entries, in the order of `services`. The build
        keeps unchanged ServiceInfos by identity, so when only some positions changed, only
        those are looked at (`positions`: where `services` differs from `previous`, if the
        caller knows). Afterwards `upserts` holds the resources that replaced others, when
        that is all that changed (None: compare the tuples)."""
        self.upserts = None
        old, made, out, where = self._last
        if len(old) == len(services):
            changed = positions
            if changed is None or old is not previous:
                changed = list(compress(range(len(services)), map(is_not, old, services)))
            if all(old[i].name == services[i].name for i in changed):
                made = list(made)
                for i in changed:
                    made[i] = self._resource(services[i])
                # unless a Service gained or lost its entries, patch the last answer in place
                if all((made[i] is None) == (where[i] < 0) for i in changed):
                    patched = list(out)
                    upserts = []
                    for i in changed:
                        r = made[i]
                        if r is not None and r is not out[where[i]]:
                            patched[where[i]] = r
                            upserts.append(r)
                    self._last = (services, made, tuple(patched), where)
                    self.upserts = tuple(upserts)
                    return self._last[2]
                return self._remember(services, made)
        made = [self._resource(info) for info in services]
        for name in self._services.keys() - {info.name for info in services}:
            del self._services[name]
        return self._remember(services, made)

    def _remember(
        self, services: tuple[ir.ServiceInfo, ...], made: list[Resource | None]
    ) -> tuple[Resource, ...]:
        out: list[Resource] = []
        where: list[int] = []  # per position in `services`, its index in `out` (-1: none)
        for r in made:
            where.append(len(out) if r is not None else -1)
            if r is not None:
                out.append(r)
        self._last = (services, made, tuple(out), where)
        return self._last[2]

    def _resource(self, info: ir.ServiceInfo) -> Resource | None:
        hit = self._services.get(info.name)
        if hit is None or not (hit[0] is info or hit[0] == info):
            data = mesh_service_bytes(info)
            hit = (info, _service_resource(data, info.name) if data is not None else None)
            self.made += data is not None
            self._services[info.name] = hit
        return hit[1]

    def node_resources(
        self,
        nodes: Iterable[ir.NodeInfo],
        envoy_port: int,
        redirect: Iterable[ir.SocketRedirectPods] = (),
    ) -> dict[str, Resource]:
        choices = {r.node: r for r in redirect}
        out: dict[str, tuple[_NodeKey, Resource]] = {}
        for node in nodes:
            hit = self._nodes.get(node.name)
            chose = choices.get(node.name)
            if hit is None or not (
                hit[0][1] == envoy_port
                and (hit[0][0] is node or hit[0][0] == node)
                and (hit[0][2] is chose or hit[0][2] == chose)
            ):
                resource = Resource.from_message(
                    _node_message(node, envoy_port, chose), name=node.name, type_url=NODE_TYPE_URL
                )
                hit = ((node, envoy_port, chose), resource)
                self.made += 1
            out[node.name] = hit
        self._nodes = out
        return {name: r for name, (_, r) in out.items()}
