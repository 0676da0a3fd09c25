"""Snapshot cache: per-node immutable snapshots of pre-serialized resources, and watches on them.

The ADS server depends only on `ConfigWatcher`; `SnapshotCache` implements it.
"""

from __future__ import annotations

from nodemesh.xds.cache._cache import SnapshotCache
from nodemesh.xds.cache._resource import Resource, content_version
from nodemesh.xds.cache._snapshot import Snapshot, TypeSet
from nodemesh.xds.cache.protocol import (
    Cancel,
    ConfigWatcher,
    DeltaWatchRequest,
    DeltaWatchResponse,
    WatchRequest,
    WatchResponse,
)

__all__ = [
    "Cancel",
    "ConfigWatcher",
    "DeltaWatchRequest",
    "DeltaWatchResponse",
    "Resource",
    "Snapshot",
    "SnapshotCache",
    "TypeSet",
    "WatchRequest",
    "WatchResponse",
    "content_version",
]
