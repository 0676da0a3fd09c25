"""The ADS server (SotW and delta over grpc.aio) and the per-node status it keeps.

Depends only on `nodemesh.xds.cache.protocol.ConfigWatcher`, never on a cache implementation.
"""

from __future__ import annotations

from nodemesh.xds.server._server import ADS_SERVICE, DEFAULT_OPTIONS, AdsServer
from nodemesh.xds.server._status import (
    AckEvent,
    NackRecord,
    NodeStatus,
    StatusTracker,
    TypeStatus,
)
from nodemesh.xds.server.exceptions import ServerError

__all__ = [
    "ADS_SERVICE",
    "DEFAULT_OPTIONS",
    "AckEvent",
    "AdsServer",
    "NackRecord",
    "NodeStatus",
    "ServerError",
    "StatusTracker",
    "TypeStatus",
]
