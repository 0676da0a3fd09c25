"""Services -> `ServiceModel`: ports, protocols, ClusterIPs and the host names clients use."""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from nodemesh._dataclasses import fast_init
from nodemesh.controlplane.builder._util import as_list, as_map

__all__ = [
    "CLUSTER_DOMAIN",
    "PortModel",
    "cluster_domain",
    "ServiceModel",
    "no_http_port",
    "read_service",
    "read_services",
    "zone_setting",
]

CLUSTER_DOMAIN = "cluster.local"
_DNS_LABEL = re.compile(r"[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?")
_H2_PROTOCOLS = frozenset({"grpc", "h2c", "http2", "kubernetes.io/h2c", "kubernetes.io/grpc"})
# appProtocols the node Envoy's HTTP connection manager speaks (cleartext HTTP, h2c, gRPC,
# WebSocket); any other appProtocol names a protocol it does not (tcp, tls, https,
# postgresql, ...), and so do these port-name prefixes (the `<protocol>[-<suffix>]`
# convention) when there is no appProtocol.
_HTTP_PROTOCOLS = _H2_PROTOCOLS | {"http", "grpc-web", "kubernetes.io/ws"}
_NOT_HTTP_NAMES = frozenset({"tcp", "tls", "https", "grpcs", "mongo", "mysql", "redis", "udp"})


@fast_init
@dataclass(frozen=True, slots=True)
class PortModel:
    name: str
    port: int
    app_protocol: str

    @property
    def http2(self) -> bool:
        if self.app_protocol:
            return self.app_protocol.lower() in _H2_PROTOCOLS
        # Without appProtocol, follow the port-naming convention `<protocol>[-<suffix>]`
        # ("grpc", "grpc-api", "http2-admin"). "grpc-web" is a protocol of its own, which
        # browsers speak over HTTP/1.1, so its servers need not accept HTTP/2.
        if self.name == "grpc-web" or self.name.startswith("grpc-web-"):
            return False
        return self.name.split("-", 1)[0] in ("grpc", "h2c", "http2")

    @property
    def grpc(self) -> bool:
        """The port says it carries gRPC calls: appProtocol `grpc` or `kubernetes.io/grpc`,
        or without one a name `grpc` or `grpc-<suffix>` (not `grpc-web`)."""
        if self.app_protocol:
            return self.app_protocol.lower() in ("grpc", "kubernetes.io/grpc")
        return self.http2 and self.name.split("-", 1)[0] == "grpc"

    @property
    def not_http(self) -> str:
        """Why routes cannot apply to this port (its appProtocol, or its name's protocol,
        is not cleartext HTTP), or "" when they can: a port with neither says nothing, and
        is taken for HTTP."""
        if self.app_protocol:
            if self.app_protocol.lower() in _HTTP_PROTOCOLS:
                return ""
            return f"appProtocol {self.app_protocol!r}"
        if self.name.split("-", 1)[0] in _NOT_HTTP_NAMES:
            return f"port name {self.name!r}"
        return ""


@fast_init
@dataclass(frozen=True, slots=True)
class ServiceModel:
    namespace: str
    name: str
    ports: tuple[PortModel, ...]
    cluster_ips: tuple[str, ...]
    # clusterIP: None. (Not merely no ClusterIP: a files-mode Service may leave it out and be
    # reached by name through the node Envoy.)
    headless: bool = False
    # internalTrafficPolicy: Local (the node agents keep L4 connections on the client's node)
    node_local: bool = False
    # sessionAffinity: ClientIP (a client pod's connections and requests go to one endpoint)
    client_ip_affinity: bool = False

    @property
    def ref(self) -> str:
        return f"{self.namespace}/{self.name}"

    def port(self, number: int) -> PortModel | None:
        for p in self.ports:  # a loop, not next(genexpr): called per Service several times
            if p.port == number:
                return p
        return None

    def port_named(self, name: str) -> PortModel | None:
        return next((p for p in self.ports if p.name == name), None)

    @property
    def default_port(self) -> PortModel | None:
        """The port a Host without ":port" means: 80 if the Service has it, else the first one."""
        return self.port(80) or (self.ports[0] if self.ports else None)

    def cluster_name(self, port: int) -> str:
        return f"{self.namespace}/{self.name}:{port}"

    def hostnames(self, short_name: bool, domain: str = CLUSTER_DOMAIN) -> tuple[str, ...]:
        fqdn = f"{self.name}.{self.namespace}.svc.{domain}"
        names = (f"{self.name}.{self.namespace}", f"{self.name}.{self.namespace}.svc", fqdn)
        return ((self.name,) if short_name else ()) + names


def cluster_domain(value: str) -> str:
    """A cluster DNS domain (kubelet's `--cluster-domain`, e.g. `cluster.local`) as Services'
    FQDNs end in it: lower case, without a trailing dot. ValueError if it is not a DNS name
    (labels of 1-63 letters, digits and inner hyphens; 253 characters in all)."""
    domain = value.lower()
    domain = domain[:-1] if domain.endswith(".") else domain
    if (
        not value.isascii()
        or not domain
        or len(domain) > 253
        or not all(map(_DNS_LABEL.fullmatch, domain.split(".")))
    ):
        raise ValueError(
            f"{value!r} is not a DNS domain (labels of letters, digits and inner '-', "
            "joined by dots, such as cluster.local)"
        )
    return domain


def no_http_port(ports: Iterable[PortModel]) -> str:
    """Why none of `ports` takes routes or policies ("5432: appProtocol 'postgresql', ..."),
    or "" when one is HTTP (or there are none)."""
    ports = tuple(ports)
    if not ports or not all(p.not_http for p in ports):
        return ""
    return ", ".join(f"{p.port}: {p.not_http}" for p in ports)


def _canonical(ip: str) -> str:
    try:
        return str(ipaddress.ip_address(ip))
    except ValueError:
        return ip  # (files mode refuses it; the API server does too)


# Annotations that ask the EndpointSlice controller for topology hints, which kube-proxy reads.
_TOPOLOGY_ANNOTATIONS = (
    "service.kubernetes.io/topology-mode",
    "service.kubernetes.io/topology-aware-hints",
)


Unhonoured = tuple[tuple[str, str], ...]  # (the setting, what happens instead)


def _ports(ports: list[int]) -> str:
    return f"port{'s' if len(ports) > 1 else ''} {', '.join(str(p) for p in ports)}"


def local_unhonoured(l7_ports: Iterable[int]) -> tuple[str, str]:
    """`internalTrafficPolicy: Local` on a Service with ports that routes or policies apply
    to: the node agents honour it on the other ports, the node Envoy not on these."""
    ports = list(l7_ports)
    return (
        f"internalTrafficPolicy Local on {_ports(ports)}",
        "the node Envoy, which takes the requests of ports with routes or policies, sends "
        "them to endpoints on every node and does not refuse them when the client's node has "
        "none",
    )


def affinity_overridden(ports: Iterable[int]) -> tuple[str, str]:
    """`sessionAffinity: ClientIP` on ports where a TrafficPolicy's loadBalancer applies."""
    return (
        f"sessionAffinity ClientIP on {_ports(list(ports))}",
        "a TrafficPolicy's loadBalancer applies there instead",
    )


def unhonoured_message(parts: Unhonoured) -> str:
    """One message: the settings first (so that the cut `nodemesh status` makes of a message
    keeps each), then what happens instead."""
    names = ", ".join(name for name, _ in parts)
    return f"{names}: not honoured by the mesh ({'; '.join(what for _, what in parts)})"


def zone_setting(obj: Mapping[str, Any]) -> str:
    """The Service's request for topology-aware routing, named as the notice names it
    (`trafficDistribution PreferClose`, `topology-mode Auto`), or "". The node agents honour
    it, as kube-proxy does, through the hints the EndpointSlice controller writes for it
    (`Service.for_node`); the node Envoy does not, so the builder adds `zones_unhonoured()`
    for the ports it takes. "" for `internalTrafficPolicy: Local` too: kube-proxy looks at
    zones only where it uses the endpoints of every node."""
    spec, meta = obj.get("spec"), obj.get("metadata")
    if type(spec) is not dict:
        return ""
    # (the usual case at once: this runs for every Service of a cold build)
    distribution = spec.get("trafficDistribution")
    annotations = meta.get("annotations") if type(meta) is dict else None
    if (not distribution and not annotations) or spec.get("internalTrafficPolicy") == "Local":
        return ""
    if distribution:
        return f"trafficDistribution {distribution}"
    mode = (
        next((annotations[a] for a in _TOPOLOGY_ANNOTATIONS if a in annotations), None)
        if type(annotations) is dict
        else None
    )
    return "topology-mode Auto" if mode is not None and str(mode).lower() == "auto" else ""


def zones_unhonoured(setting: str, l7_ports: Iterable[int]) -> tuple[str, str]:
    """A request for topology-aware routing on a Service with ports the node Envoy takes."""
    return (
        f"{setting} on {_ports(list(l7_ports))}",
        "the node Envoy, which takes the requests of ports with routes or policies, uses "
        "endpoints whatever their zone",
    )


def read_service(obj: Mapping[str, Any]) -> ServiceModel | None:
    """A Service that can carry mesh traffic (TCP ports), or None (ExternalName)."""
    # type() checks before the helpers and str(): this runs for every Service of a cold build.
    meta, spec = obj.get("metadata"), obj.get("spec")
    if type(meta) is not dict:
        meta = as_map(meta)
    if type(spec) is not dict:
        spec = as_map(spec)
    if spec.get("type") == "ExternalName":
        return None
    ports = []
    numbers = set()
    for p in as_list(spec.get("ports")):
        if type(p) is not dict:
            p = as_map(p)
        number = p.get("port")
        # What the API server refuses, files mode may hold: a port out of range (or `true`)
        # failed translation, and a port number twice gave Envoy a domain twice (a NACK).
        if (
            type(number) is not int
            or not 0 < number < 65536
            or number in numbers
            or p.get("protocol", "TCP") != "TCP"
        ):
            continue
        numbers.add(number)
        port_name, app_protocol = p.get("name", ""), p.get("appProtocol", "")
        if type(port_name) is not str:
            port_name = str(port_name)
        if type(app_protocol) is not str:
            app_protocol = str(app_protocol)
        ports.append(PortModel(port_name, number, app_protocol))
    ips = spec.get("clusterIPs")
    ips = [str(ip) for ip in ips if ip and ip != "None"] if isinstance(ips, list) and ips else []
    single = spec.get("clusterIP")
    if not ips and isinstance(single, str) and single and single != "None":
        ips = [single]
    # One IPv6 address has many spellings (FD00:96:0::10, fd00:96::10) and one kernel key:
    # the canonical one, so Hosts, the node agents' keys and claims of an address all agree.
    ips = [_canonical(ip) if ":" in ip else ip for ip in ips]
    ns, name = meta.get("namespace", "default"), meta.get("name", "")
    if type(ns) is not str:
        ns = str(ns)
    if type(name) is not str:
        name = str(name)
    headless = single == "None" or (isinstance(spec.get("clusterIPs"), list) and not ips
                                     and "None" in spec["clusterIPs"])  # fmt: skip
    local = spec.get("internalTrafficPolicy") == "Local"
    affinity = spec.get("sessionAffinity") == "ClientIP"
    return ServiceModel(ns, name, tuple(ports), tuple(ips), headless, local, affinity)


def read_services(objs: Iterable[Mapping[str, Any]]) -> dict[tuple[str, str], ServiceModel]:
    """Services that can carry mesh traffic (TCP ports; ExternalName Services are left out)."""
    out: dict[tuple[str, str], ServiceModel] = {}
    for obj in objs:
        svc = read_service(obj)
        if svc is not None:
            out[(svc.namespace, svc.name)] = svc
    return out
