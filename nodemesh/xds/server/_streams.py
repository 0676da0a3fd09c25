"""Per-stream xDS protocol state: nonces, subscriptions, ACK/NACK, for SotW and delta.

A stream turns requests into watches on a `ConfigWatcher` and watch answers into encoded
responses on its queue. It never resends a version the client rejected: the watch is held
until the snapshot's version for that type changes.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass, field

from envoy.service.discovery.v3 import discovery_pb2

from nodemesh.xds import _wire
from nodemesh.xds.cache.protocol import (
    Cancel,
    ConfigWatcher,
    DeltaWatchRequest,
    DeltaWatchResponse,
    WatchRequest,
    WatchResponse,
)
from nodemesh.xds.server._status import NackRecord, StatusTracker

__all__ = ["DeltaStream", "ProtocolError", "SotwStream"]


class ProtocolError(Exception):
    """The client broke the xDS protocol; the stream ends with INVALID_ARGUMENT."""


class _Stream:
    def __init__(self, watcher: ConfigWatcher, status: StatusTracker) -> None:
        self.watcher = watcher
        self.status = status
        self.node_id: str | None = None
        self.queue: asyncio.Queue[bytes | None] = asyncio.Queue()
        self.stale_requests = 0
        self._nonce = 0

    def _node(self, node: object) -> str:
        if self.node_id is None:
            node_id = getattr(node, "id", "")
            if not node_id:
                raise ProtocolError("the first request on a stream must carry node.id")
            self.node_id = node_id
            self.status.stream_opened(node_id)
        return self.node_id

    def _next_nonce(self) -> str:
        self._nonce += 1
        return str(self._nonce)

    def _cancel_all(self, cancels: list[Cancel | None]) -> None:
        for cancel in cancels:
            if cancel is not None:
                cancel()

    def _nack(
        self,
        node_id: str,
        type_url: str,
        version: str,
        nonce: str,
        names: tuple[str, ...],
        error: object,
        sent: dict[str, str],
    ) -> None:
        record = NackRecord(
            node_id=node_id,
            type_url=type_url,
            version=version,
            nonce=nonce,
            resource_names=names,
            code=int(getattr(error, "code", 0)),
            message=str(getattr(error, "message", "")),
            at=time.time(),
        )
        self.status.nacked(record, sent)


@dataclass(slots=True)
class _SotwType:
    nonce: str = ""
    sent_version: str | None = None
    sent: dict[str, str] = field(default_factory=dict)  # name -> version in the last response
    names: frozenset[str] | None = None  # None: wildcard
    legacy_wildcard: bool = False
    started: bool = False
    cancel: Cancel | None = None


class SotwStream(_Stream):
    """State of the world: every response carries the whole subscribed set of a type."""

    def __init__(self, watcher: ConfigWatcher, status: StatusTracker) -> None:
        super().__init__(watcher, status)
        self.types: dict[str, _SotwType] = {}

    def handle(self, req: discovery_pb2.DiscoveryRequest) -> None:
        node_id = self._node(req.node)
        type_url = req.type_url
        if not type_url:
            raise ProtocolError("ADS requests must carry type_url")
        st = self.types.setdefault(type_url, _SotwType())
        nonce = req.response_nonce
        if nonce and nonce != st.nonce:
            self.stale_requests += 1  # answers a response that a newer one superseded
            return
        if nonce and st.sent_version is not None:
            if req.HasField("error_detail"):
                self._nack(
                    node_id,
                    type_url,
                    st.sent_version,
                    nonce,
                    tuple(sorted(st.sent)),
                    req.error_detail,
                    st.sent,
                )
            else:
                self.status.acked(node_id, type_url, st.sent_version, st.sent, replace=True)

        if not st.started and req.version_info:
            # A reconnecting client states the version it holds: that is what it last ACKed.
            self.status.resumed(node_id, type_url, req.version_info, {})
        requested = frozenset(req.resource_names)
        if not st.started:
            st.legacy_wildcard = not requested
        elif requested - {"*"}:
            st.legacy_wildcard = False
        names = None if ("*" in requested or (not requested and st.legacy_wildcard)) else requested
        names_changed = st.started and names != st.names
        st.names = names
        st.started = True
        known = st.sent_version if st.sent_version is not None else req.version_info

        if st.cancel is not None:
            st.cancel()
        st.cancel = None
        request = WatchRequest(node_id, type_url, known, names, names_changed)
        answered: list[bool] = []

        def respond(resp: WatchResponse) -> None:
            answered.append(True)
            self._respond(st, resp)

        cancel = self.watcher.create_watch(request, respond)
        if not answered:
            st.cancel = cancel

    def _respond(self, st: _SotwType, resp: WatchResponse) -> None:
        assert self.node_id is not None
        st.cancel = None
        nonce = self._next_nonce()
        st.nonce = nonce
        st.sent_version = resp.version
        st.sent = {r.name: r.version for r in resp.resources}
        data = _wire.sotw_response(
            resp.type_url, resp.version, nonce, (r.sotw_entry for r in resp.resources)
        )
        self.status.sent(self.node_id, resp.type_url, resp.version, nonce, len(resp.resources))
        self.queue.put_nowait(data)

    def close(self) -> None:
        self._cancel_all([st.cancel for st in self.types.values()])
        if self.node_id is not None:
            self.status.stream_closed(self.node_id)


@dataclass(slots=True)
class _Pending:
    version: str
    updated: dict[str, str]
    removed: tuple[str, ...]


@dataclass(slots=True)
class _DeltaType:
    wildcard: bool = False
    subscribed: set[str] = field(default_factory=set)
    client: dict[str, str] = field(default_factory=dict)  # what the client holds (ACKed)
    pending: dict[str, _Pending] = field(default_factory=dict)  # sent, not yet ACKed, by nonce
    hold: str | None = None
    answer_empty: bool = False
    cancel: Cancel | None = None


class DeltaStream(_Stream):
    """Incremental xDS: only changed and removed resources are sent."""

    def __init__(self, watcher: ConfigWatcher, status: StatusTracker) -> None:
        super().__init__(watcher, status)
        self.types: dict[str, _DeltaType] = {}

    def handle(self, req: discovery_pb2.DeltaDiscoveryRequest) -> None:
        node_id = self._node(req.node)
        type_url = req.type_url
        if not type_url:
            raise ProtocolError("ADS requests must carry type_url")
        st = self.types.get(type_url)
        if st is None:
            st = self.types[type_url] = _DeltaType()
            st.client = dict(req.initial_resource_versions)
            st.wildcard = not req.resource_names_subscribe  # legacy wildcard
            st.answer_empty = not req.initial_resource_versions
            if req.initial_resource_versions:
                self.status.resumed(node_id, type_url, "", dict(req.initial_resource_versions))
        for name in req.resource_names_subscribe:
            if name == "*":
                st.wildcard = True
            else:
                st.subscribed.add(name)
        for name in req.resource_names_unsubscribe:
            if name == "*":
                st.wildcard = False
            else:
                st.subscribed.discard(name)
                st.client.pop(name, None)  # the client forgets what it unsubscribes from
        subscription_changed = bool(req.resource_names_subscribe or req.resource_names_unsubscribe)

        nonce = req.response_nonce
        if nonce:
            pending = st.pending.pop(nonce, None)
            if pending is None:
                if not subscription_changed:
                    self.stale_requests += 1
                    return
            elif req.HasField("error_detail"):
                names = tuple(sorted(pending.updated)) + pending.removed
                self._nack(
                    node_id,
                    type_url,
                    pending.version,
                    nonce,
                    names,
                    req.error_detail,
                    pending.updated,
                )
                st.hold = pending.version
            else:
                st.client.update(pending.updated)
                for name in pending.removed:
                    st.client.pop(name, None)
                self.status.acked(
                    node_id, type_url, pending.version, pending.updated, replace=False
                )
                self.status.removed(node_id, type_url, pending.removed)

        view = dict(st.client)
        for p in st.pending.values():  # optimistic: what is in flight will most likely be ACKed
            view.update(p.updated)
            for name in p.removed:
                view.pop(name, None)
        if st.cancel is not None:
            st.cancel()
            st.cancel = None
        request = DeltaWatchRequest(
            node_id=node_id,
            type_url=type_url,
            wildcard=st.wildcard,
            subscribed=frozenset(st.subscribed),
            client_versions=view,
            hold_version=st.hold,
            answer_empty=st.answer_empty,
        )
        answered: list[bool] = []

        def respond(resp: DeltaWatchResponse) -> None:
            answered.append(True)
            self._respond(st, resp)

        cancel = self.watcher.create_delta_watch(request, respond)
        if not answered:
            st.cancel = cancel

    def _respond(self, st: _DeltaType, resp: DeltaWatchResponse) -> None:
        assert self.node_id is not None
        st.cancel = None
        st.answer_empty = False
        st.hold = None
        nonce = self._next_nonce()
        st.pending[nonce] = _Pending(
            resp.version, {r.name: r.version for r in resp.updated}, resp.removed
        )
        data = _wire.delta_response(
            resp.type_url, resp.version, nonce, (r.delta_entry for r in resp.updated), resp.removed
        )
        self.status.sent(self.node_id, resp.type_url, resp.version, nonce, len(resp.updated))
        self.queue.put_nowait(data)

    def close(self) -> None:
        self._cancel_all([st.cancel for st in self.types.values()])
        if self.node_id is not None:
            self.status.stream_closed(self.node_id)
