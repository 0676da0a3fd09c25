"""`SnapshotCache`: per-node snapshots and the open watches on them."""

from __future__ import annotations

import itertools
import logging
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import TypeVar

from nodemesh.xds import types
from nodemesh.xds.cache._resource import Resource
from nodemesh.xds.cache._snapshot import Snapshot
from nodemesh.xds.cache.protocol import (
    Cancel,
    DeltaWatchRequest,
    DeltaWatchResponse,
    WatchRequest,
    WatchResponse,
)

__all__ = ["SnapshotCache"]

Req = TypeVar("Req", WatchRequest, DeltaWatchRequest)
Resp = TypeVar("Resp", WatchResponse, DeltaWatchResponse)

log = logging.getLogger(__name__)


@dataclass(slots=True)
class _Watch:
    request: WatchRequest | DeltaWatchRequest
    respond: Callable[[WatchResponse], None] | Callable[[DeltaWatchResponse], None]


class SnapshotCache:
    """Holds one `Snapshot` per node id (plus an optional fallback) and answers watches.

    Implements `ConfigWatcher`. Loop-confined: call it only from the event loop thread.
    A node with no snapshot of its own gets the fallback snapshot, if one is set.
    """

    def __init__(self) -> None:
        self._snapshots: dict[str, Snapshot] = {}
        self._fallback: Snapshot | None = None
        self._watches: dict[str, dict[int, _Watch]] = {}
        self._ids = itertools.count(1)

    # -- writing ---------------------------------------------------------------------------
    def set_snapshot(self, node_id: str, snapshot: Snapshot) -> None:
        self._snapshots[node_id] = snapshot
        self._notify(node_id)

    def clear_snapshot(self, node_id: str) -> None:
        """The node gets the fallback snapshot from now on (its open watches are answered from
        it, if it differs from what they hold)."""
        if self._snapshots.pop(node_id, None) is not None:
            self._notify(node_id)

    def set_fallback_snapshot(self, snapshot: Snapshot | None) -> None:
        """The snapshot served to nodes that have none of their own."""
        self._fallback = snapshot
        for node_id in list(self._watches):
            if node_id not in self._snapshots:
                self._notify(node_id)

    # -- reading ---------------------------------------------------------------------------
    def get_snapshot(self, node_id: str) -> Snapshot | None:
        return self._snapshots.get(node_id, self._fallback)

    def current_version(self, node_id: str, type_url: str) -> str | None:
        """The version of `type_url` in the snapshot the node's watches are answered from."""
        snapshot = self.get_snapshot(node_id)
        return snapshot.version(type_url) if snapshot is not None else None

    def node_ids(self) -> tuple[str, ...]:
        return tuple(sorted(self._snapshots))

    def watched_node_ids(self) -> tuple[str, ...]:
        """Nodes with at least one open watch (connected Envoys waiting for config)."""
        return tuple(sorted(n for n, w in self._watches.items() if w))

    def watch_count(self, node_id: str | None = None) -> int:
        if node_id is not None:
            return len(self._watches.get(node_id, {}))
        return sum(len(w) for w in self._watches.values())

    # -- ConfigWatcher ---------------------------------------------------------------------
    def create_watch(
        self, request: WatchRequest, respond: Callable[[WatchResponse], None]
    ) -> Cancel:
        return self._answer_or_park(request, respond, _sotw_answer)

    def create_delta_watch(
        self, request: DeltaWatchRequest, respond: Callable[[DeltaWatchResponse], None]
    ) -> Cancel:
        return self._answer_or_park(request, respond, _delta_answer)

    # -- internals -------------------------------------------------------------------------
    def _answer_or_park(
        self,
        request: Req,
        respond: Callable[[Resp], None],
        answer: Callable[[Snapshot, Req], Resp | None],
    ) -> Cancel:
        snapshot = self.get_snapshot(request.node_id)
        if snapshot is not None and (found := answer(snapshot, request)) is not None:
            respond(found)
            return _noop
        return self._park(request, respond)

    def _park(
        self,
        request: WatchRequest | DeltaWatchRequest,
        respond: Callable[[WatchResponse], None] | Callable[[DeltaWatchResponse], None],
    ) -> Cancel:
        watch_id = next(self._ids)
        node_watches = self._watches.setdefault(request.node_id, {})
        node_watches[watch_id] = _Watch(request, respond)

        def cancel() -> None:
            watches = self._watches.get(request.node_id)
            if watches is not None:
                watches.pop(watch_id, None)
                if not watches:
                    del self._watches[request.node_id]

        return cancel

    def _notify(self, node_id: str) -> None:
        watches = self._watches.get(node_id)
        snapshot = self.get_snapshot(node_id)
        if not watches or snapshot is None:
            return
        ordered = sorted(watches.items(), key=lambda kv: types.order_key(kv[1].request.type_url))
        for watch_id, watch in ordered:
            if watch_id not in watches:
                continue  # cancelled by an earlier answer in this round (its stream reopened it)
            req = watch.request
            if isinstance(req, WatchRequest):
                answer: WatchResponse | DeltaWatchResponse | None = _sotw_answer(snapshot, req)
            else:
                answer = _delta_answer(snapshot, req)
            if answer is None:
                continue
            del watches[watch_id]
            watch.respond(answer)  # type: ignore[arg-type]
        # An answer may have cancelled the node's last watch (dropping its dict) and parked a
        # new one in a new dict: that one stays.
        if not watches and self._watches.get(node_id) is watches:
            del self._watches[node_id]


def _noop() -> None:
    return None


def _sotw_answer(snapshot: Snapshot, req: WatchRequest) -> WatchResponse | None:
    version = snapshot.version(req.type_url)
    if version is None:
        return None  # the snapshot does not serve this type (yet)
    if version == req.known_version and not req.names_changed:
        return None
    items = snapshot.resources(req.type_url)
    if req.names is None:
        chosen = tuple(items[n] for n in sorted(items))
    else:
        chosen = tuple(items[n] for n in sorted(req.names) if n in items)
    return WatchResponse(req.type_url, version, chosen)


def _delta_answer(snapshot: Snapshot, req: DeltaWatchRequest) -> DeltaWatchResponse | None:
    ts = snapshot.type_set(req.type_url)
    if ts is None:
        return None
    items = ts.items
    if ts.version == req.hold_version:
        if not req.unheld:
            return None
        # What the client rejected stays held; a name subscribed to since is not part of it.
        updated, removed = _compare_some(items, req, set(req.unheld))
        if not updated and not removed:
            return None
        return DeltaWatchResponse(req.type_url, ts.version, updated, removed)
    # Past half the set, comparing everything costs about the same as following the changes.
    limit = len(items) // 2
    changed = None
    if req.basis is not None and len(req.dirty) <= limit:
        changed = ts.changed_since(req.basis, limit)
    if changed is None:
        updated, removed = _compare_all(items, req)
    else:
        changed |= req.dirty
        updated, removed = _compare_some(items, req, changed)
    if not updated and not removed and not req.answer_empty:
        return None
    return DeltaWatchResponse(req.type_url, ts.version, updated, removed, ts.token)


def _compare_all(
    items: Mapping[str, Resource], req: DeltaWatchRequest
) -> tuple[tuple[Resource, ...], tuple[str, ...]]:
    known = req.client_versions
    candidates: Iterable[str] = (
        items.keys() if req.wildcard else req.subscribed.intersection(items.keys())
    )
    updated = tuple(items[n] for n in sorted(candidates) if known.get(n) != items[n].version)
    removed = tuple(
        sorted(n for n in known if n not in items and (req.wildcard or n in req.subscribed))
    )
    return updated, removed


def _compare_some(
    items: Mapping[str, Resource], req: DeltaWatchRequest, names: set[str]
) -> tuple[tuple[Resource, ...], tuple[str, ...]]:
    """`_compare_all`, over `names` only: by the request's promise (see `DeltaWatchRequest`),
    every other subscribed name is as the client holds it, so the answers are equal."""
    known = req.client_versions
    if not req.wildcard:
        names = names.intersection(req.subscribed)  # iterates the smaller of the two
    updated = tuple(
        items[n] for n in sorted(names) if n in items and known.get(n) != items[n].version
    )
    removed = tuple(sorted(n for n in names if n not in items and n in known))
    return updated, removed
