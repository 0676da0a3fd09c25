"""IR `ClusterEndpoints` -> Envoy `ClusterLoadAssignment`; terminating endpoints drain."""

from __future__ import annotations

from envoy.config.core.v3 import address_pb2, health_check_pb2
from envoy.config.endpoint.v3 import endpoint_components_pb2 as ec_pb2
from envoy.config.endpoint.v3 import endpoint_pb2

from nodemesh.xds.translate import ir

__all__ = ["load_assignment"]


def load_assignment(ce: ir.ClusterEndpoints, name: str) -> endpoint_pb2.ClusterLoadAssignment:
    """The endpoints of `ce` as the EDS resource `name` (see `cluster.py` for the naming)."""
    by_zone: dict[str, list[ec_pb2.LbEndpoint]] = {}
    for e in ce.endpoints:
        lb = ec_pb2.LbEndpoint(
            endpoint=ec_pb2.Endpoint(
                address=address_pb2.Address(
                    socket_address=address_pb2.SocketAddress(address=e.address, port_value=e.port)
                )
            ),
            health_status=health_check_pb2.DRAINING if e.draining else health_check_pb2.HEALTHY,
        )
        by_zone.setdefault(e.zone, []).append(lb)
    out = endpoint_pb2.ClusterLoadAssignment(cluster_name=name)
    for zone in sorted(by_zone):
        locality = out.endpoints.add(lb_endpoints=by_zone[zone])
        if zone:
            locality.locality.zone = zone
    return out
