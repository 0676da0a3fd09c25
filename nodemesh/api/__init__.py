"""Wire types shared by the control plane and the node agent (the node service map)."""

from __future__ import annotations

from nodemesh.api.servicemap import (
    TYPE_URL,
    Backend,
    NodeMap,
    Service,
    ServiceIPv6,
    from_proto,
    to_proto,
)

__all__ = ["TYPE_URL", "Backend", "NodeMap", "Service", "ServiceIPv6", "from_proto", "to_proto"]
