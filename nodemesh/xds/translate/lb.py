"""IR `LoadBalancer` -> the cluster lb_policy, and the route hash policy for ring hash/maglev."""

from __future__ import annotations

from envoy.config.cluster.v3 import cluster_pb2
from envoy.config.route.v3 import route_components_pb2 as rc

from nodemesh.xds.translate._proto import duration

__all__ = ["apply_lb_policy", "hash_policies"]

_POLICY = {
    "RoundRobin": cluster_pb2.Cluster.ROUND_ROBIN,
    "LeastRequest": cluster_pb2.Cluster.LEAST_REQUEST,
    "RingHash": cluster_pb2.Cluster.RING_HASH,
    "Maglev": cluster_pb2.Cluster.MAGLEV,
}


def apply_lb_policy(cluster: cluster_pb2.Cluster, policy: str) -> None:
    cluster.lb_policy = _POLICY[policy]


def hash_policies(
    header: str, cookie: str, cookie_ttl_ms: int | None, source_ip: bool = False
) -> list[rc.RouteAction.HashPolicy]:
    out: list[rc.RouteAction.HashPolicy] = []
    if source_ip:  # a Service's sessionAffinity ClientIP: the client pod's address
        out.append(
            rc.RouteAction.HashPolicy(
                connection_properties=rc.RouteAction.HashPolicy.ConnectionProperties(source_ip=True)
            )
        )
    if header:
        out.append(
            rc.RouteAction.HashPolicy(header=rc.RouteAction.HashPolicy.Header(header_name=header))
        )
    if cookie:
        c = rc.RouteAction.HashPolicy.Cookie(name=cookie)
        if cookie_ttl_ms is not None:
            c.ttl.CopyFrom(duration(cookie_ttl_ms))
            # The cookie Envoy sets is for the whole Service: without a Path a client keeps
            # it for the request's directory only (RFC 6265's default-path), so a request
            # elsewhere (/orders after /api/users) had none, got another cookie, and often
            # another endpoint.
            c.path = "/"
        out.append(rc.RouteAction.HashPolicy(cookie=c))
    return out
