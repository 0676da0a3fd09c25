"""Wire types shared by the control plane and the node agent (the node service map)."""

from __future__ import annotations

from nodemesh.api.servicemap import (
    NODE_TYPE_URL,
    SERVICE_TYPE_URL,
    Backend,
    MapView,
    MeshService,
    NodeMap,
    NodePart,
    Service,
    ServiceIPv6,
    node_from_proto,
    node_to_proto,
    service_from_proto,
    service_to_proto,
    split,
    window,
)

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
