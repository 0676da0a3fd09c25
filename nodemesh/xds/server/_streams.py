"""Per-stream xDS protocol state: nonces, subscriptions, ACK/NACK, for SotW and delta.

A stream turns requests into watches on a `ConfigWatcher` and watch answers into encoded
responses on its queue. It never resends a version the client rejected: the watch is held
until the snapshot's version for that type changes. A delta stream leaves at most
`MAX_UNANSWERED` responses of a type unanswered. Endpoints, Listeners and routes wait for the
Clusters they may name (`_Stream._hold_back`).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from types import MappingProxyType

from envoy.config.cluster.v3 import cluster_pb2
from envoy.service.discovery.v3 import discovery_pb2

from nodemesh.xds import _wire, types
from nodemesh.xds.cache.protocol import (
    Cancel,
    ConfigWatcher,
    DeltaWatchRequest,
    DeltaWatchResponse,
    Resource,
    WatchRequest,
    WatchResponse,
)
from nodemesh.xds.server._status import NackRecord, StatusTracker

__all__ = ["MAX_UNANSWERED", "DeltaStream", "ProtocolError", "SotwStream"]

# Per type, the delta responses a client may leave unanswered before its stream sends it no
# more until it answers. Each is kept until then (what the client holds is committed on ACK),
# so a client that keeps sending requests and never answers would make the stream keep one
# more per snapshot change. Envoy ACKs each response at once, so two cover it: one in flight
# and the answer to a subscription change it sent before that one arrived (endpoints of a new
# cluster, while those of changed clusters are on their way).
MAX_UNANSWERED = 2

# Types whose resources may name Clusters (a ClusterLoadAssignment its cluster's; Listeners and
# routes those they send to): on a stream that speaks CDS, none is sent while the node's
# snapshot has Clusters the stream has not sent yet, since the client applies one stream's
# messages in order. The xDS protocol's make-before-break sequence: CDS first, then EDS, LDS,
# RDS ("Eventual consistency considerations").
_AFTER_CLUSTERS = (types.ENDPOINT, types.LISTENER, types.ROUTE)
# These also wait for the client's answer to a CDS response that added or changed Clusters.
# Envoy keeps CDS paused, so sends that answer, only once no cluster is warming, as a signal to
# ADS servers (ClusterManagerImpl::updateClusterCounts): a route sent before it finds its new
# cluster still warming, waiting for its endpoints, and answers 503 (no cluster) until they
# come. Endpoints must not wait for it: the clusters warm on them.
_AFTER_CLUSTERS_ANSWERED = (types.LISTENER, types.ROUTE)
# In `_Stream._waiting`: the type passed the wait for a CDS answer and waits only for Clusters
# not sent yet (nonces start at 1).
_PASSED = 0
# Seconds, from the first time an answer let it pass, within which a Listener or route change
# waits again for the answer to a newer CDS response that added clusters (the first answer is
# always waited for, however long it takes). After them, the next answer lets it follow the
# newer clusters without waiting for theirs: clusters added faster than the client warms them
# must not hold every route change back for good.
ADDED_CLUSTERS_WAIT = 5.0


class ProtocolError(Exception):
    """The client broke the xDS protocol; the stream ends with INVALID_ARGUMENT."""


def _eds_names(clusters: Iterable[Resource]) -> set[str]:
    """The EDS resource names that these clusters read their endpoints from."""
    names: set[str] = set()
    for r in clusters:
        c = r.message
        if isinstance(c, cluster_pb2.Cluster) and c.type == cluster_pb2.Cluster.EDS:
            names.add(c.eds_cluster_config.service_name or c.name)
    return names


class _Stream:
    def __init__(self, watcher: ConfigWatcher, status: StatusTracker) -> None:
        self.watcher = watcher
        self.status = status
        self.node_id: str | None = None
        self.queue: asyncio.Queue[bytes | None] = asyncio.Queue()
        self.stale_requests = 0
        self._nonce = 0
        # Types of _AFTER_CLUSTERS whose last watch answer was held back (their watch is closed,
        # `_release` opens it again), each with the nonce of the CDS response whose answer lets
        # it pass the wait for one (_PASSED: it did).
        self._waiting: dict[str, int] = {}
        # when each of them, let pass by an answer, first waited again for newer added clusters
        # (monotonic seconds)
        self._waiting_again: dict[str, float] = {}
        # the nonce of the last CDS response that added clusters the client did not hold,
        # until the client answers it (0: none waits for an answer)
        self._adding = 0

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

    def _now(
        self, node_id: str, type_url: str, names: frozenset[str] | None
    ) -> tuple[str, dict[str, str]] | None:
        """The node's snapshot now: the type's version and its resources' (`names` of them;
        None: all), or None without one. What a client that says what it holds, on a new
        stream, is compared with (versions hash the content, so they match across control
        plane restarts)."""
        get_snapshot = getattr(self.watcher, "get_snapshot", None)
        snapshot = get_snapshot(node_id) if get_snapshot is not None else None
        version: str | None = snapshot.version(type_url) if snapshot is not None else None
        if snapshot is None or version is None:
            return None
        held = {
            n: r.version
            for n, r in snapshot.resources(type_url).items()
            if names is None or n in names
        }
        return version, held

    # -- make before break ------------------------------------------------------------------
    def _hold_back(self, resp: WatchResponse | DeltaWatchResponse) -> bool:
        """Whether the watch answer `resp` must not be sent yet; if so, its type waits and
        `_release` opens its watch again (the answer is computed again then, from the snapshot
        of that moment).

        A type of _AFTER_CLUSTERS waits while the node's snapshot has Clusters the stream has
        not sent. Listeners and routes also wait while a CDS response that added or changed
        Clusters is unanswered. For changed Clusters, one answer at most: the answer to the CDS
        response that carried the Clusters of the snapshot they were held at lets them pass,
        even if Clusters changed since (the client keeps using a changed cluster while it warms
        again). For added clusters, every answer: a route sent while its new cluster warms
        answers 503 (no cluster), so after that answer they wait again for the answer to a
        newer CDS response that added clusters. So that clusters added without pause cannot
        hold routes back for good, they wait again only within `ADDED_CLUSTERS_WAIT` seconds of
        the first time they did: the next answer after that lets them pass (they wait for no
        more than that one answer). A NACK is an answer: the client keeps its last good
        Clusters, and routes go on without the rejected ones.

        Endpoints the client waits for (a new cluster's, a changed cluster's resent) are not
        held behind newer Clusters: the cluster warms on them, and the client answers the CDS
        response the newer Clusters wait for only once it has warmed."""
        type_url = resp.type_url
        if type_url not in _AFTER_CLUSTERS or not self._speaks_clusters():
            return False
        behind = self._clusters_behind()
        if behind and type_url == types.ENDPOINT and self._endpoints_awaited(resp):
            # Held, they would wait for an answer that waits for them, until the cluster's
            # initial_fetch_timeout (15 s) warms it without them. The endpoints of other
            # clusters they carry may reach the Clusters of before: those are resent with
            # their CDS response.
            behind = False
        if type_url not in self._waiting:
            self._waiting_again.pop(type_url, None)
        if not behind and self._adding and type_url in _AFTER_CLUSTERS_ANSWERED:
            now = time.monotonic()
            # The first wait is always made; waiting again (an answer let it pass) only within
            # ADDED_CLUSTERS_WAIT of the first time it did, however long the first wait took.
            since = (
                self._waiting_again.setdefault(type_url, now)
                if self._waiting.get(type_url) == _PASSED
                else self._waiting_again.get(type_url, now)
            )
            if now - since < ADDED_CLUSTERS_WAIT:
                self._waiting[type_url] = self._adding
                return True
        if not behind and (
            type_url not in _AFTER_CLUSTERS_ANSWERED
            or self._waiting.get(type_url) == _PASSED
            or not self._clusters_unanswered()
        ):
            self._waiting.pop(type_url, None)
            return False
        if type_url not in self._waiting:
            # behind: the next CDS response carries them; else the last one did
            self._waiting[type_url] = self._nonce + 1 if behind else self._last_clusters_nonce()
        return True

    def _clusters_behind(self) -> bool:
        """The node's snapshot has Clusters this stream has not sent. An open CDS watch has
        none to send: the cache answers it before the other types of the same change."""
        if self._watch_open(types.CLUSTER):
            return False
        assert self.node_id is not None
        version = self.watcher.current_version(self.node_id, types.CLUSTER)
        return version is not None and version not in self._clusters_sent()

    def _clusters_answered(self, nonce: str) -> None:
        """The client answered (ACK or NACK) the CDS response `nonce`."""
        answered = int(nonce)
        if answered >= self._adding:
            self._adding = 0
        for type_url, needed in self._waiting.items():
            if answered >= needed:
                self._waiting[type_url] = _PASSED

    def _release(self) -> None:
        """Open again the watches of the types that wait, now that CDS moved: those that may go
        now are answered at once. The open watches of types before them are opened again too,
        so that answers keep the type order."""
        for type_url in _AFTER_CLUSTERS:
            if not self._waiting:
                return
            if type_url in self._waiting or self._watch_open(type_url):
                self._reopen(type_url)

    # What the make-before-break rule needs to know of a stream (SotW and delta keep it apart).
    def _speaks_clusters(self) -> bool:
        raise NotImplementedError

    def _clusters_sent(self) -> tuple[str | None, ...]:
        """The CDS versions the stream's client holds or was sent last."""
        raise NotImplementedError

    def _clusters_unanswered(self) -> bool:
        """A CDS response that added or changed Clusters waits for the client's answer."""
        raise NotImplementedError

    def _last_clusters_nonce(self) -> int:
        """The nonce of the last CDS response."""
        raise NotImplementedError

    def _endpoints_awaited(self, resp: WatchResponse | DeltaWatchResponse) -> bool:
        """The EDS answer `resp` carries endpoints the client asked for and does not hold (a
        new cluster's), or that it was made to forget (a changed cluster's, resent)."""
        raise NotImplementedError

    def _watch_open(self, type_url: str) -> bool:
        """A watch of the type is open (parked in the watcher)."""
        raise NotImplementedError

    def _reopen(self, type_url: str) -> None:
        """Open the type's watch again, with the request its last one had."""
        raise NotImplementedError

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
            resource_versions=dict(sent),
        )
        self.status.nacked(record, sent, stream=self)


@dataclass(slots=True)
class _SotwType:
    nonce: str = ""
    # the client ACKed or NACKed `nonce`: it repeats the nonce in later requests (a change of
    # subscription) until the next response, without error_detail, and they are no ACK
    replied: bool = False
    sent_version: str | None = None
    sent: dict[str, str] = field(default_factory=dict)  # name -> version in the last response
    names: frozenset[str] | None = None  # None: wildcard
    legacy_wildcard: bool = False
    started: bool = False
    stated: bool = False  # the client's first request stated a version: it held some
    force: bool = False  # answer the next watch even if the version is unchanged
    known: str = ""  # the version the last watch was opened with
    updated: bool = False  # the last response added or changed a resource (not only removed)
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
        # (a stream's first request for a type may carry a nonce of an earlier stream, which
        # Envoy clears and other clients may not: it was never answered)
        if nonce and st.started and nonce != st.nonce:
            self.stale_requests += 1  # answers a response that a newer one superseded
            return
        if nonce and st.sent_version is not None and not st.replied:
            st.replied = True
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
                self.status.acked(
                    node_id,
                    type_url,
                    st.sent_version,
                    st.sent,
                    replace=True,
                    stream=self,
                    nonce=nonce,
                )
            if type_url == types.CLUSTER:
                self._clusters_answered(nonce)

        requested = frozenset(req.resource_names)
        if not st.started:
            st.legacy_wildcard = not requested
        elif requested - {"*"}:
            st.legacy_wildcard = False
        names = None if ("*" in requested or (not requested and st.legacy_wildcard)) else requested
        if not st.started:
            # A client states the version it holds: a restarted Envoy none, a reconnecting one
            # what it last ACKed. Only that counts, not what an earlier stream ACKed.
            self.status.resumed(
                node_id,
                type_url,
                req.version_info,
                None,
                stream=self,
                current=self._current(node_id, type_url, req.version_info, names),
            )
        if st.started and names != st.names:
            st.force = True
        if not st.started:
            st.stated = bool(req.version_info)
        st.names = names
        st.started = True
        known = st.sent_version if st.sent_version is not None else req.version_info
        self._open(type_url, st, known)
        if type_url == types.CLUSTER:
            self._release()

    def _current(
        self, node_id: str, type_url: str, version: str, names: frozenset[str] | None
    ) -> dict[str, str] | None:
        """What a client stating `version` holds, if that is the version of the type in the
        node's snapshot now: the snapshot's resources of the type, those it asks for. Else
        None."""
        now = self._now(node_id, type_url, names) if version else None
        return now[1] if now is not None and now[0] == version else None

    def _open(self, type_url: str, st: _SotwType, known: str) -> None:
        assert self.node_id is not None
        if st.cancel is not None:
            st.cancel()
        st.cancel = None
        st.known = known
        request = WatchRequest(self.node_id, type_url, known, st.names, st.force)
        answered: list[bool] = []

        def respond(resp: WatchResponse) -> None:
            answered.append(True)
            st.cancel = None
            if not self._hold_back(resp):
                self._respond(st, resp)

        cancel = self.watcher.create_watch(request, respond)
        if not answered:
            st.cancel = cancel
            self._waiting.pop(type_url, None)  # nothing to send: nothing waits

    def _respond(self, st: _SotwType, resp: WatchResponse) -> None:
        assert self.node_id is not None
        st.cancel = None
        st.force = False
        nonce = self._next_nonce()
        st.nonce, st.replied = nonce, False
        # A reconnecting client holds clusters this stream did not send: any may have changed.
        unknown = st.sent_version is None and st.stated
        st.sent_version = resp.version
        before, st.sent = st.sent, {r.name: r.version for r in resp.resources}
        data = _wire.sotw_response(
            resp.type_url, resp.version, nonce, (r.sotw_entry for r in resp.resources)
        )
        self.status.sent(self.node_id, resp.type_url, resp.version, nonce, len(resp.resources))
        self.queue.put_nowait(data)
        if resp.type_url == types.CLUSTER:
            st.updated = unknown or any(before.get(r.name) != r.version for r in resp.resources)
            if unknown or any(r.name not in before for r in resp.resources):
                self._adding = int(nonce)
            changed = [
                r for r in resp.resources if unknown or before.get(r.name, r.version) != r.version
            ]
            if _eds_names(changed):
                self._resend_endpoints()
            self._release()

    def _resend_endpoints(self) -> None:
        """Envoy re-warms a changed cluster and waits for its endpoints, but does not ask again
        for a name it already watches. Answer the endpoints watch now, unchanged or not."""
        eds = self.types.get(types.ENDPOINT)
        if eds is None:  # not asked for yet on this stream (a reconnect asks for CDS first)
            self.types[types.ENDPOINT] = _SotwType(force=True)
            return
        eds.force = True
        if eds.cancel is not None:  # parked; otherwise the next EDS request carries the force
            self._open(types.ENDPOINT, eds, eds.sent_version or "")

    def _speaks_clusters(self) -> bool:
        cds = self.types.get(types.CLUSTER)
        return cds is not None and cds.started

    def _clusters_sent(self) -> tuple[str | None, ...]:
        cds = self.types[types.CLUSTER]
        return (cds.sent_version if cds.sent_version is not None else cds.known,)

    def _clusters_unanswered(self) -> bool:
        cds = self.types[types.CLUSTER]
        return cds.sent_version is not None and not cds.replied and cds.updated

    def _last_clusters_nonce(self) -> int:
        return int(self.types[types.CLUSTER].nonce or 0)

    def _endpoints_awaited(self, resp: WatchResponse | DeltaWatchResponse) -> bool:
        # force: the subscription changed (a new cluster's name), or changed clusters' endpoints
        # are resent
        eds = self.types[types.ENDPOINT]
        if eds.force:
            return True
        return isinstance(resp, WatchResponse) and any(
            r.name not in eds.sent for r in resp.resources
        )

    def _watch_open(self, type_url: str) -> bool:
        st = self.types.get(type_url)
        return st is not None and st.cancel is not None

    def _reopen(self, type_url: str) -> None:
        st = self.types.get(type_url)
        if st is not None and st.started:
            self._open(type_url, st, st.known)

    def close(self) -> None:
        self._cancel_all([st.cancel for st in self.types.values()])
        if self.node_id is not None:
            self.status.stream_closed(self.node_id, self)


@dataclass(slots=True)
class _Pending:
    version: str
    updated: dict[str, str]
    removed: tuple[str, ...]
    # sent at a version the client rejected (names subscribed to since): its ACK takes these
    # resources, not the version
    partial: bool = False


# In `_DeltaType.client`: the client subscribed to the name and holds no version of it that we
# know of. It differs from every resource's version, so the resource is sent, and from none
# when there is no resource, so the name goes in removed_resources (the spec's answer to a
# subscription to a resource that does not exist).
_WANTED = ""


@dataclass(slots=True)
class _DeltaType:
    wildcard: bool = False
    subscribed: frozenset[str] = frozenset()  # replaced, not mutated: watches share it
    # what the client holds (ACKed), and _WANTED for a name subscribed to and not answered yet
    client: dict[str, str] = field(default_factory=dict)
    pending: dict[str, _Pending] = field(default_factory=dict)  # sent, not yet ACKed, by nonce
    sent_version: str | None = None  # the version of the last response
    hold: str | None = None
    unheld: set[str] = field(default_factory=set)  # subscribed to since `hold`: not held
    answer_empty: bool = False
    cancel: Cancel | None = None
    # What the client view (`DeltaStream._view`) is known to equal: the `basis` of the last
    # response, except for the `dirty` names, which changed in the view or the subscription
    # since (see DeltaWatchRequest). None: unknown, the watcher compares every resource.
    basis: object | None = None
    dirty: set[str] = field(default_factory=set)


def _touch(st: _DeltaType, pending: _Pending) -> None:
    """The client view may have changed at the names of `pending`."""
    st.dirty.update(pending.updated)
    st.dirty.update(pending.removed)


class DeltaStream(_Stream):
    """Incremental xDS: only changed and removed resources are sent.

    A request that finds `MAX_UNANSWERED` responses of its type unanswered opens no watch
    (its subscription change is kept): the protocol lets a server answer only the latest
    request of a type. The next answer opens it, and one response brings the client up to date.

    After a NACK, the next version of that type is answered even when it brings nothing
    (the snapshot went back to what the client holds): the client's ACK of the empty response
    is what says it holds the current version, and what clears the NACK from its status.
    Otherwise nothing would be sent, and `/status` would show the NACK for good. A name
    subscribed to while the version is held was not rejected: it is answered alone.
    """

    def __init__(self, watcher: ConfigWatcher, status: StatusTracker) -> None:
        super().__init__(watcher, status)
        self.types: dict[str, _DeltaType] = {}
        # endpoints to resend that the client had not asked for on this stream yet
        self._resend_first: set[str] = set()

    def handle(self, req: discovery_pb2.DeltaDiscoveryRequest) -> None:
        node_id = self._node(req.node)
        type_url = req.type_url
        if not type_url:
            raise ProtocolError("ADS requests must carry type_url")
        st = self.types.get(type_url)
        first = st is None
        if st is None:
            st = self.types[type_url] = _DeltaType()
            st.client = dict(req.initial_resource_versions)
            if type_url == types.ENDPOINT:
                for name in self._resend_first.intersection(st.client):
                    st.client[name] = _WANTED
                self._resend_first = set()
            st.wildcard = not req.resource_names_subscribe  # legacy wildcard
            st.answer_empty = not req.initial_resource_versions
            # A new stream's client holds what it says, nothing else (a restarted Envoy holds
            # nothing): what an earlier stream ACKed must not count for it. What it says may
            # be the type's current version whole (a control plane restart): then that
            # version is held, as for SotW, and not "" until the type changes (the gate that
            # removes a deleted Service's cluster waited its full 60 s for that).
            self.status.resumed(
                node_id,
                type_url,
                self._current_version(
                    node_id,
                    type_url,
                    req.initial_resource_versions,
                    None
                    if st.wildcard or "*" in req.resource_names_subscribe
                    else frozenset(req.resource_names_subscribe),
                ),
                dict(req.initial_resource_versions),
                stream=self,
            )
        subscribe = set(req.resource_names_subscribe)
        unsubscribe = set(req.resource_names_unsubscribe)
        if "*" in subscribe:
            if not st.wildcard:
                st.basis = None  # every name joins the subscription
            st.wildcard = True
        dropped: tuple[str, ...] = ()
        if "*" in unsubscribe and "*" not in subscribe:
            st.wildcard = False
            # the client forgets what it held through the wildcard only, as it does a name
            # it unsubscribes from (a `*` again then sent nothing: it was taken as held)
            explicit = st.subscribed.union(subscribe).difference(unsubscribe)
            dropped = tuple(sorted(n for n in st.client if n not in explicit))
            for name in dropped:
                del st.client[name]
        subscribe.discard("*")
        unsubscribe.discard("*")
        if subscribe or unsubscribe:
            st.subscribed = st.subscribed.union(subscribe).difference(unsubscribe)
            st.dirty |= subscribe | unsubscribe  # unsubscribed: still in a wildcard, not held
        for name in unsubscribe:
            st.client.pop(name, None)  # the client forgets what it unsubscribes from
        for name in subscribe - unsubscribe:
            # Answered even if the client held it: the spec says it may have forgotten it. Only
            # a first request says what the client holds (initial_resource_versions).
            if not (first and name in st.client):
                st.client[name] = _WANTED
        if st.hold is not None:
            st.unheld = (st.unheld | subscribe) - unsubscribe
        if unsubscribe or dropped:
            self.status.removed(
                node_id, type_url, tuple(sorted(unsubscribe)) + dropped, stream=self
            )
        subscription_changed = bool(req.resource_names_subscribe or req.resource_names_unsubscribe)

        nonce = req.response_nonce
        if nonce:
            oldest = next(iter(st.pending), None)
            pending = st.pending.pop(nonce, None)
            if pending is None:
                # (a stream's first request for a type may carry a nonce of an earlier stream,
                # which Envoy clears and other clients may not: it was never answered)
                if not (subscription_changed or first):
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
                # Names subscribed to and not answered by the rejected response were not rejected.
                st.unheld = {
                    n
                    for n, v in st.client.items()
                    if v == _WANTED and n not in pending.updated and n not in pending.removed
                }
                # The next version is answered even if it brings nothing (a revert to what the
                # client holds): only the client's ACK of it can say it holds the current
                # version, and clear the NACK from its status.
                st.answer_empty = True
                _touch(st, pending)  # the view assumed it taken
                if type_url == types.CLUSTER:
                    self._clusters_answered(nonce)
            else:
                st.client.update(pending.updated)
                for name in pending.removed:
                    st.client.pop(name, None)
                if nonce != oldest:
                    _touch(st, pending)  # committed before older ones, which the view applied first
                self.status.acked(
                    node_id,
                    type_url,
                    pending.version,
                    pending.updated,
                    replace=False,
                    stream=self,
                    partial=pending.partial,
                    nonce=nonce,
                )
                self.status.removed(node_id, type_url, pending.removed, stream=self)
                if type_url == types.CLUSTER:
                    self._clusters_answered(nonce)

        self._open(type_url, st)
        if type_url == types.CLUSTER:
            self._release()

    def _current_version(
        self, node_id: str, type_url: str, held: Mapping[str, str], names: frozenset[str] | None
    ) -> str:
        """The version of the type in the node's snapshot if `held` is exactly its resources
        (`names` of them; None: all), else "" (the client holds something else as well)."""
        now = self._now(node_id, type_url, names) if held else None
        return now[0] if now is not None and now[1] == dict(held) else ""

    @staticmethod
    def _view(st: _DeltaType) -> Mapping[str, str]:
        if not st.pending:
            # The common case (all ACKed), without a copy of what may be 10,000 names. Safe:
            # a watch given this view is answered before a response of its type is in flight,
            # so no ACK changes `client` under it, and an unsubscribe or the endpoint resend
            # changes `client` and then reopens the watch, cancelling this one, with no other
            # code in between (tests/xds/test_delta_basis.py checks it).
            return MappingProxyType(st.client)
        view = dict(st.client)
        for p in st.pending.values():  # optimistic: what is in flight will most likely be ACKed
            view.update(p.updated)
            for name in p.removed:
                view.pop(name, None)
        return view

    def _open(self, type_url: str, st: _DeltaType) -> None:
        assert self.node_id is not None
        if st.cancel is not None:
            st.cancel()
            st.cancel = None
        if len(st.pending) >= MAX_UNANSWERED:
            # The client's next answer opens the watch: its one response carries whatever
            # changed until then (the view and the dirty names keep track), the latest version.
            return
        view = self._view(st)
        request = DeltaWatchRequest(
            node_id=self.node_id,
            type_url=type_url,
            wildcard=st.wildcard,
            subscribed=st.subscribed,
            client_versions=view,
            hold_version=st.hold,
            unheld=frozenset(st.unheld) if st.hold is not None else frozenset(),
            answer_empty=st.answer_empty,
            basis=st.basis,
            dirty=frozenset(st.dirty),
        )
        answered: list[bool] = []

        def respond(resp: DeltaWatchResponse) -> None:
            answered.append(True)
            st.cancel = None
            if not self._hold_back(resp):
                self._respond(st, resp)

        cancel = self.watcher.create_delta_watch(request, respond)
        if not answered:
            st.cancel = cancel
            self._waiting.pop(type_url, None)  # nothing to send: nothing waits

    def _respond(self, st: _DeltaType, resp: DeltaWatchResponse) -> None:
        assert self.node_id is not None
        st.cancel = None
        # At the held version, only names subscribed to since were answered: the rest stays held.
        partial = st.hold is not None and resp.version == st.hold
        if not partial:
            st.answer_empty = False
            st.hold = None
        st.unheld = set()
        # The answer brings the view to resp.basis within the subscription, dirty names included
        # (a partial answer has no basis).
        st.basis, st.dirty = resp.basis, set()
        held = self._view(st) if resp.type_url == types.CLUSTER else {}
        nonce = self._next_nonce()
        st.pending[nonce] = _Pending(
            resp.version, {r.name: r.version for r in resp.updated}, resp.removed, partial
        )
        data = _wire.delta_response(
            resp.type_url, resp.version, nonce, (r.delta_entry for r in resp.updated), resp.removed
        )
        st.sent_version = resp.version
        self.status.sent(self.node_id, resp.type_url, resp.version, nonce, len(resp.updated))
        self.queue.put_nowait(data)
        if held:
            names = _eds_names(r for r in resp.updated if held.get(r.name, _WANTED) != _WANTED)
            if names:
                self._resend_endpoints(names)
        if resp.type_url == types.CLUSTER:
            if any(held.get(r.name, _WANTED) == _WANTED for r in resp.updated):
                self._adding = int(nonce)
            self._release()

    def _resend_endpoints(self, names: set[str]) -> None:
        """Envoy re-warms a changed cluster and waits for its endpoints, but does not ask again
        for a name it already watches: forget that the client holds them, so they go again,
        even while a NACK of other endpoints holds the type's version."""
        eds = self.types.get(types.ENDPOINT)
        if eds is None:  # not asked for yet on this stream (a reconnect asks for CDS first)
            self._resend_first |= names
            return
        for name in names:
            eds.client[name] = _WANTED  # so a NACK of other endpoints does not hold them either
            for p in eds.pending.values():
                p.updated.pop(name, None)
        eds.dirty.update(names)
        if eds.hold is not None:
            eds.unheld |= names
        if eds.cancel is not None:  # parked; otherwise the next EDS request sees the gap
            self._open(types.ENDPOINT, eds)

    def _speaks_clusters(self) -> bool:
        return types.CLUSTER in self.types

    def _clusters_sent(self) -> tuple[str | None, ...]:
        cds = self.types[types.CLUSTER]
        return (cds.sent_version, cds.hold)

    def _clusters_unanswered(self) -> bool:
        return any(p.updated for p in self.types[types.CLUSTER].pending.values())

    def _last_clusters_nonce(self) -> int:
        pending = self.types[types.CLUSTER].pending
        return int(next(reversed(pending))) if pending else 0

    def _endpoints_awaited(self, resp: WatchResponse | DeltaWatchResponse) -> bool:
        if not isinstance(resp, DeltaWatchResponse):
            return False
        view = self._view(self.types[types.ENDPOINT])  # _WANTED: asked for, or to be resent
        return any(view.get(r.name, _WANTED) == _WANTED for r in resp.updated) or any(
            view.get(n) == _WANTED for n in resp.removed
        )

    def _watch_open(self, type_url: str) -> bool:
        st = self.types.get(type_url)
        return st is not None and st.cancel is not None

    def _reopen(self, type_url: str) -> None:
        st = self.types.get(type_url)
        if st is not None:
            self._open(type_url, st)

    def close(self) -> None:
        self._cancel_all([st.cancel for st in self.types.values()])
        if self.node_id is not None:
            self.status.stream_closed(self.node_id, self)
