"""The mesh IR: a plain, immutable description of what every node Envoy should do.

`build` (in the control plane) produces it from user objects; `translate` turns it into Envoy
protos. It lives under `nodemesh.xds` so that the translator never imports the control plane.
Durations are integer milliseconds. `origins` name the user objects an item came from
("HTTPRoute/shop/web"), so that ACKs and NACKs can be mapped back to them.

All classes are frozen and compare by value (`Endpoint` is a NamedTuple, the rest are
dataclasses): the translator memoizes Envoy resources by IR value (identity first), so build
should reuse an unchanged IR object rather than rebuild an equal one.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, NamedTuple

from nodemesh._dataclasses import fast_init

__all__ = [
    "Backend",
    "CircuitBreaker",
    "Cluster",
    "ConsumerSources",
    "ClusterEndpoints",
    "Endpoint",
    "Fault",
    "HeaderMatch",
    "HeaderMutation",
    "LoadBalancer",
    "Mesh",
    "Mirror",
    "NodeInfo",
    "OutlierDetection",
    "PathMatch",
    "QueryMatch",
    "Redirect",
    "Retry",
    "Rewrite",
    "Route",
    "RouteMatch",
    "ServiceInfo",
    "SocketRedirectPods",
    "VirtualHost",
]

Origins = tuple[str, ...]


# -- endpoints and clusters ----------------------------------------------------------------
class Endpoint(NamedTuple):
    """A NamedTuple, not a dataclass, because there are 100,000s of them: it is made, hashed,
    compared and sorted (by its fields, in order) at C speed."""

    address: str
    port: int
    # ready -> HEALTHY; serving but terminating -> DRAINING (no new requests, kept for
    # in-flight ones); neither -> left out by build.
    draining: bool = False
    node: str = ""
    zone: str = ""
    # Topology hints (EndpointSlice `hints`, from the EndpointSlice controller when a Service
    # asks for topology-aware routing): () without any, else (forZones, forNodes) names. The
    # node agents use them as kube-proxy does; the node Envoy does not.
    hints: tuple[tuple[str, ...], ...] = ()


@fast_init
@dataclass(frozen=True, slots=True)
class ClusterEndpoints:
    cluster: str
    endpoints: tuple[Endpoint, ...]


@dataclass(frozen=True, slots=True)
class CircuitBreaker:
    max_connections: int | None = None
    max_pending_requests: int | None = None
    max_requests: int | None = None
    max_retries: int | None = None
    retry_budget_percent: float | None = None
    retry_budget_min_concurrency: int | None = None


@dataclass(frozen=True, slots=True)
class OutlierDetection:
    consecutive_5xx: int | None = None
    consecutive_gateway_errors: int | None = None
    interval_ms: int | None = None
    base_ejection_time_ms: int | None = None
    max_ejection_percent: int | None = None


@dataclass(frozen=True, slots=True)
class LoadBalancer:
    policy: Literal["RoundRobin", "LeastRequest", "RingHash", "Maglev"] = "RoundRobin"
    hash_header: str = ""
    hash_cookie: str = ""
    hash_cookie_ttl_ms: int | None = None
    # the connection's source address (a Service's sessionAffinity ClientIP)
    hash_source_ip: bool = False


@fast_init
@dataclass(frozen=True, slots=True)
class Cluster:
    """One upstream cluster per (Service, port), whether a route sends to it or not."""

    name: str
    service: str  # "ns/name"
    port: int
    http2: bool = False
    connect_timeout_ms: int | None = None
    circuit_breaker: CircuitBreaker | None = None
    outlier: OutlierDetection | None = None
    lb: LoadBalancer | None = None
    origins: Origins = ()


# -- routes ---------------------------------------------------------------------------------
@dataclass(frozen=True, slots=True)
class PathMatch:
    kind: Literal["Exact", "PathPrefix", "RegularExpression"]
    value: str


@dataclass(frozen=True, slots=True)
class HeaderMatch:
    name: str
    value: str
    kind: Literal["Exact", "RegularExpression"] = "Exact"


@dataclass(frozen=True, slots=True)
class QueryMatch:
    name: str
    value: str
    kind: Literal["Exact", "RegularExpression"] = "Exact"


@dataclass(frozen=True, slots=True)
class RouteMatch:
    path: PathMatch = PathMatch("PathPrefix", "/")
    headers: tuple[HeaderMatch, ...] = ()
    query: tuple[QueryMatch, ...] = ()
    method: str = ""
    grpc: bool = False  # only match gRPC requests (content-type application/grpc*)
    # Only requests from clients in this namespace (a GAMMA consumer route); "" for all.
    # Envoy knows them by source address: see `ConsumerSources`.
    consumer: str = ""


@dataclass(frozen=True, slots=True)
class HeaderMutation:
    set: tuple[tuple[str, str], ...] = ()
    add: tuple[tuple[str, str], ...] = ()
    remove: tuple[str, ...] = ()


@fast_init
@dataclass(frozen=True, slots=True)
class Backend:
    """One backend of a route, with the header changes of its own filters (Gateway API's
    `backendRefs[].filters`): only the requests sent to it, and their responses, get them, after
    the route's own (`Route.request_headers`, `Route.response_headers`, `Route.rewrite`'s
    hostname), so that where both change a header the backend's change is the later one."""

    cluster: str
    weight: int = 1
    request_headers: HeaderMutation | None = None
    response_headers: HeaderMutation | None = None
    hostname: str = ""  # the Host its request header changes set ("" for none)


@dataclass(frozen=True, slots=True)
class Retry:
    retry_on: tuple[str, ...] = ()
    status_codes: tuple[int, ...] = ()
    num_retries: int | None = None
    per_try_timeout_ms: int | None = None
    backoff_base_ms: int | None = None
    backoff_max_ms: int | None = None
    skip_previous_hosts: bool = False


@dataclass(frozen=True, slots=True)
class Rewrite:
    hostname: str = ""
    full_path: str | None = None
    prefix: str | None = None  # replaces the matched PathPrefix


@dataclass(frozen=True, slots=True)
class Redirect:
    scheme: str = ""
    hostname: str = ""
    port: int | None = None
    full_path: str | None = None
    prefix: str | None = None
    status_code: int = 302


@dataclass(frozen=True, slots=True)
class Mirror:
    cluster: str
    percent: float = 100.0


@dataclass(frozen=True, slots=True)
class Fault:
    delay_ms: int | None = None
    delay_percent: float = 100.0
    abort_status: int | None = None
    abort_percent: float = 100.0


@fast_init
@dataclass(frozen=True, slots=True)
class Route:
    """One match with its action. Exactly one of backends (possibly empty: answer
    `direct_status`), or redirect.

    `invalid_weight` is the share, weighed against the backends' weights, of the requests that
    would have gone to backendRefs that do not resolve: Gateway API has them answered with
    `direct_status` rather than spread over the valid backends. Only set when there are
    backends (with none, every request gets `direct_status` anyway)."""

    name: str
    match: RouteMatch = RouteMatch()
    backends: tuple[Backend, ...] = ()
    invalid_weight: int = 0
    direct_status: int = 500  # when there is no usable backend
    redirect: Redirect | None = None
    request_headers: HeaderMutation | None = None
    response_headers: HeaderMutation | None = None
    rewrite: Rewrite | None = None
    mirrors: tuple[Mirror, ...] = ()
    timeout_ms: int | None = None  # None: Envoy's default (15 s); 0: no timeout
    # gRPC calls (a GRPCRoute's, or a gRPC port's default route): `timeout_ms` bounds each
    # call from its start, a stream too (route.max_stream_duration)
    grpc_calls: bool = False
    idle_timeout_ms: int | None = None
    retry: Retry | None = None
    fault: Fault | None = None
    hash_header: str = ""
    hash_cookie: str = ""
    hash_cookie_ttl_ms: int | None = None
    hash_source_ip: bool = False
    origins: Origins = ()


@fast_init
@dataclass(frozen=True, slots=True)
class VirtualHost:
    """Requests addressed to one (Service, port), by any of its names."""

    name: str
    domains: tuple[str, ...]
    routes: tuple[Route, ...]
    origins: Origins = ()


# -- the whole mesh -------------------------------------------------------------------------
@fast_init
@dataclass(frozen=True, slots=True)
class ServiceInfo:
    """Per Service, what the node agent needs to know (the eBPF map builder reads this)."""

    name: str  # "ns/name"
    cluster_ips: tuple[str, ...]
    ports: tuple[int, ...]
    # The ports whose connections go to the node Envoy: those an HTTPRoute/GRPCRoute or a
    # TrafficPolicy applies to (HTTP ports only), in the order of `ports`. The others are L4.
    l7_ports: tuple[int, ...]
    # Per entry of `ports`, same order: that port's endpoints (address, targetPort; ready and
    # draining, as in its ClusterEndpoints). The node map balances L4 over the ready ones
    # (with none ready, over the draining ones: serving terminating endpoints).
    backends: tuple[tuple[Endpoint, ...], ...] = ()
    # `internalTrafficPolicy: Local`: on its L4 ports each node's agent uses only the
    # endpoints on its node (its L7 ports go through the node Envoy, which does not).
    node_local: bool = False
    # `sessionAffinity: ClientIP`: on its L4 ports the kernel sends a client pod's connections
    # to one endpoint (its L7 ports hash on the source address in the node Envoy)
    client_ip_affinity: bool = False


@dataclass(frozen=True, slots=True)
class NodeInfo:
    """A node (from its Node object), for its agent's service map."""

    name: str
    # Where this node's pods reach the node Envoy: the Node's first IPv4 InternalIP in
    # status.addresses; "" when it has none (then L7 connections on that node are refused).
    envoy_address: str = ""
    # Pod IPs on this node (IPv4, sorted): Pods' status.podIP(s) with spec.nodeName (host
    # network and finished pods left out), and EndpointSlice endpoints with this nodeName.
    pod_ips: tuple[str, ...] = ()
    zone: str = ""  # its topology.kubernetes.io/zone label


@dataclass(frozen=True, slots=True)
class ConsumerSources:
    """The clients of one consumer namespace (one with consumer routes) on one node: the pod
    IPs (IPv4, sorted) of that namespace placed on that node, as for `NodeInfo.pod_ips`. The
    node Envoy marks connections from these addresses so that the namespace's consumer routes
    match them (`RouteMatch.consumer`)."""

    node: str
    namespace: str
    addresses: tuple[str, ...]


@dataclass(frozen=True, slots=True)
class SocketRedirectPods:
    """The pods on one node whose Pod chose about the node's socket short cut (annotation
    `nodemesh.io/socket-redirect`): their IPv4s, sorted. An IP that Pods claim both ways is
    in `off` only."""

    node: str
    on: tuple[str, ...] = ()
    off: tuple[str, ...] = ()


@dataclass(frozen=True, slots=True)
class Mesh:
    virtual_hosts: tuple[VirtualHost, ...] = ()
    clusters: tuple[Cluster, ...] = ()
    endpoints: tuple[ClusterEndpoints, ...] = ()
    services: tuple[ServiceInfo, ...] = ()
    nodes: tuple[str, ...] = ()  # node names known from Node objects / endpoints
    node_infos: tuple[NodeInfo, ...] = ()  # per name in `nodes`, same order
    # Per (node, consumer namespace) with clients there, sorted; any node name a pod names,
    # with or without a Node object.
    consumers: tuple[ConsumerSources, ...] = ()
    # Per node with a Pod that chose (see SocketRedirectPods), sorted by node.
    socket_redirect: tuple[SocketRedirectPods, ...] = ()
    outbound_address: str = "0.0.0.0"
    outbound_port: int = 15001
    access_log: str = ""  # the file node Envoys write a JSON line per request to ("": none)
    route_config_name: str = "outbound"
