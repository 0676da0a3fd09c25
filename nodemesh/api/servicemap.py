"""The node service map: a small model, and its wire form (`NodeServiceMap` in servicemap.proto).

`to_proto()` is what the control plane calls (pure: same model, same bytes); `from_proto()` is
what the agent calls, and it reports every problem of a map at once.
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass

from nodemesh.api import servicemap_pb2 as pb

__all__ = ["TYPE_URL", "Backend", "NodeMap", "Service", "ServiceIPv6", "from_proto", "to_proto"]

TYPE_URL = "type.googleapis.com/" + pb.NodeServiceMap.DESCRIPTOR.full_name
MAX_BACKENDS = 32  # mirrors NM_MAX_BACKENDS in nodemesh/ebpf/bpf/nodemesh.h


@dataclass(frozen=True, slots=True)
class Backend:
    address: str
    port: int
    weight: int = 1


@dataclass(frozen=True, slots=True)
class Service:
    """A destination (ClusterIP or pod IP, port). `l7=True` sends it through the node Envoy."""

    name: str
    address: str
    port: int
    l7: bool
    backends: tuple[Backend, ...] = ()


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


def to_proto(model: NodeMap) -> pb.NodeServiceMap:
    """The resource for `model.node`. Services and addresses are sorted, so equal models give
    equal bytes (and equal xDS versions).
    """
    msg = pb.NodeServiceMap(node=model.node, local_addresses=sorted(model.local_addresses))
    if model.envoy is not None:
        msg.envoy.address, msg.envoy.port = model.envoy
    for svc in sorted(model.services, key=lambda s: (s.address, s.port, s.name)):
        msg.services.append(service_message(svc))
    for v6 in sorted(model.services_ipv6, key=lambda s: (s.address, s.port, s.name)):
        msg.services_ipv6.append(service6_message(v6))
    return msg


def service_message(svc: Service) -> pb.Service:
    """One `services` entry of a NodeServiceMap."""
    return pb.Service(
        name=svc.name,
        address=svc.address,
        port=svc.port,
        mode=pb.Service.L7 if svc.l7 else pb.Service.L4,
        backends=[
            pb.Backend(address=b.address, port=b.port, weight=b.weight) for b in svc.backends
        ],
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


def _ipv4(text: str, where: str, problems: list[str]) -> None:
    try:
        ipaddress.IPv4Address(text)
    except ValueError:
        problems.append(f"{where}: {text!r} is not an IPv4 address")


def _port(port: int, where: str, problems: list[str]) -> None:
    if not 1 <= port <= 65535:
        problems.append(f"{where}: port {port} is outside 1-65535")


def from_proto(msg: pb.NodeServiceMap) -> NodeMap:
    """Validate and convert. Raises ValueError naming every problem found."""
    problems: list[str] = []
    envoy: tuple[str, int] | None = None
    if msg.HasField("envoy"):
        _ipv4(msg.envoy.address, "envoy", problems)
        _port(msg.envoy.port, "envoy", problems)
        envoy = (msg.envoy.address, msg.envoy.port)
    for addr in msg.local_addresses:
        _ipv4(addr, "local_addresses", problems)
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
        if len(s.backends) > MAX_BACKENDS:
            problems.append(f"{where}: {len(s.backends)} backends, at most {MAX_BACKENDS}")
        backends: list[Backend] = []
        for b in s.backends:
            _ipv4(b.address, f"{where} backend", problems)
            _port(b.port, f"{where} backend", problems)
            if b.weight > 65535:
                problems.append(f"{where} backend {b.address}: weight {b.weight} > 65535")
            backends.append(Backend(b.address, b.port, b.weight or 1))
        services.append(
            Service(s.name, s.address, s.port, s.mode == pb.Service.L7, tuple(backends))
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
        key = (str(v6.address), v6.port)
        if key in seen6:
            problems.append(f"{where}: same address and port as {seen6[key]}")
        seen6[key] = v6.name
        services6.append(ServiceIPv6(v6.name, v6.address, v6.port, v6.target, v6.l7))
    if problems:
        raise ValueError("; ".join(problems))
    return NodeMap(msg.node, tuple(services), envoy, tuple(msg.local_addresses), tuple(services6))
