"""`StatusTracker`: what each node Envoy was sent, what it ACKed, and what it rejected."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, fields
from typing import Any, Literal

from nodemesh.xds.types import short_name

__all__ = ["AckEvent", "NackRecord", "NodeStatus", "StatusTracker", "TypeStatus"]

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class NackRecord:
    """Envoy rejected a response: which version, which resources, and Envoy's own message."""

    node_id: str
    type_url: str
    version: str
    nonce: str
    resource_names: tuple[str, ...]
    code: int
    message: str
    at: float
    # name -> version of each resource in the rejected response (a removal has none): what
    # was rejected is these versions, not the names, so a fix sent since is not. Left out of
    # `/status`, where it could list 10,000 names.
    resource_versions: Mapping[str, str] = field(default_factory=dict, compare=False)

    def public(self) -> dict[str, Any]:
        """The record as `/status` shows it."""
        return {
            f.name: getattr(self, f.name) for f in fields(self) if f.name != "resource_versions"
        }


@dataclass(slots=True)
class TypeStatus:
    version_sent: str = ""
    version_acked: str = ""
    nonce_sent: str = ""
    responses_sent: int = 0
    resources_sent: int = 0
    acked_resources: dict[str, str] = field(default_factory=dict)  # name -> version, as ACKed
    last_nack: NackRecord | None = None
    # The nonce of the last response sent on the stream that speaks for the type, while its
    # client has not answered it ("": answered, or nothing sent)
    awaiting: str = ""
    # The stream that speaks for this type: the last one to say what its client holds (its
    # first request for the type). None: no open stream does, so the node holds nothing we know.
    stream: object | None = None
    # (version, resources) the node held when that stream closed: a SotW client that comes
    # back stating that version (the same Envoy, reconnecting) holds those resources again
    left: tuple[str, dict[str, str]] | None = None
    # The other open streams that spoke for the type before a newer one did (an Envoy hot
    # restart's parent, a second Envoy with the node's id): what each client holds, kept up
    # by its ACKs, oldest first. When the speaking stream closes, the newest of them speaks
    # again with what its client holds (it held nothing known until the type next changed).
    others: dict[object, tuple[str, dict[str, str]]] = field(default_factory=dict)


@dataclass(slots=True)
class NodeStatus:
    node_id: str
    streams: int = 0
    last_connected: float = 0.0
    last_disconnected: float = 0.0
    types: dict[str, TypeStatus] = field(default_factory=dict)

    @property
    def connected(self) -> bool:
        return self.streams > 0


@dataclass(frozen=True, slots=True)
class AckEvent:
    """Delivered to listeners on every ACK and NACK, when a node's stream opens or closes
    (`type_url` and `version` empty then), and when a stream's first request for a type says
    what its client holds (`resumed`: `resource_versions` empty)."""

    kind: Literal["ack", "nack", "opened", "closed", "resumed"]
    node_id: str
    type_url: str
    version: str
    # ack: the resources this ACK covered (SotW: the whole set; delta: the update), not all the
    # node holds (that is `TypeStatus.acked_resources`; copying it per ACK cost ~6 ms at
    # 10,000 resources); nack: what was sent
    resource_versions: dict[str, str]
    nack: NackRecord | None = None


Listener = Callable[[AckEvent], None]


class StatusTracker:
    """Per-node xDS status, updated by the ADS server; read by status APIs and the `Programmed`
    condition. Loop-confined, like the cache. `snapshot()` returns plain JSON-able data.

    A node with no stream for `forget_after` seconds is forgotten (its status, what it held
    when it left, its last NACK): nodes come and go (autoscaling), and each kept what it held
    of every type, up to 10,000 names, for as long as the control plane ran.
    """

    def __init__(
        self, *, forget_after: float = 3600.0, clock: Callable[[], float] = time.time
    ) -> None:
        self._nodes: dict[str, NodeStatus] = {}
        self._listeners: list[Listener] = []
        self.forget_after = forget_after
        self._clock = clock
        # nodes with no open stream -> when their last one closed, oldest first
        self._departed: dict[str, float] = {}
        # bumped by every change to what a node holds, ACKed or NACKed, or to its streams (not
        # by `sent`): equal epochs mean equal answers for whoever derives state from it
        self.epoch = 0
        # ACKs, NACKs and unsubscriptions from a stream that no longer speaks for their type
        self.stale_reports = 0
        # since start, per type URL (for /metrics): responses sent, and NACKs of them (each
        # NACK, a reconnecting Envoy's refusal of the same version too)
        self.responses_total: dict[str, int] = {}
        self.nacks_total: dict[str, int] = {}

    # -- read ------------------------------------------------------------------------------
    def node(self, node_id: str) -> NodeStatus | None:
        return self._nodes.get(node_id)

    def nodes(self) -> tuple[NodeStatus, ...]:
        return tuple(self._nodes[n] for n in sorted(self._nodes))

    def type_status(self, node_id: str, type_url: str) -> TypeStatus:
        return self._node(node_id).types.setdefault(type_url, TypeStatus())

    def snapshot(self) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for node in self.nodes():
            types_out: dict[str, Any] = {}
            for type_url, ts in sorted(node.types.items()):
                types_out[short_name(type_url)] = {
                    "type_url": type_url,
                    "version_sent": ts.version_sent,
                    "version_acked": ts.version_acked,
                    "responses_sent": ts.responses_sent,
                    "resources_sent": ts.resources_sent,
                    "last_nack": ts.last_nack.public() if ts.last_nack else None,
                }
            out[node.node_id] = {
                "connected": node.connected,
                "streams": node.streams,
                "types": types_out,
            }
        return out

    def add_listener(self, listener: Listener) -> Callable[[], None]:
        """Call `listener` on every ACK/NACK and stream open/close. Returns a function that
        removes it."""
        self._listeners.append(listener)
        return lambda: self._listeners.remove(listener)

    # -- written by the server -------------------------------------------------------------
    def stream_opened(self, node_id: str) -> None:
        self._forget_departed()
        self.epoch += 1
        self._departed.pop(node_id, None)
        node = self._node(node_id)
        node.streams += 1
        node.last_connected = self._clock()
        self._emit(AckEvent("opened", node_id, "", "", {}))

    def stream_closed(self, node_id: str, stream: object | None = None) -> None:
        """`stream` closed. What it ACKed of the types it spoke for no longer counts as held:
        a restarted Envoy holds nothing, and its new stream may never ask for some of those
        types (RDS after its Listener was rejected). Types another stream took over since are
        left alone (a new stream can open before the old one is seen closing, and the node's
        eBPF agent has a stream of its own). The last NACK stays, for `/status`."""
        self.epoch += 1
        node = self._node(node_id)
        node.streams = max(0, node.streams - 1)
        node.last_disconnected = self._clock()
        if node.streams == 0:
            self._departed.pop(node_id, None)
            self._departed[node_id] = node.last_disconnected
        for ts in node.types.values():
            ts.others.pop(stream, None)
            if ts.stream is stream:
                ts.left = (ts.version_acked, ts.acked_resources) if ts.version_acked else None
                ts.awaiting = ""
                if ts.others:  # the newest other stream speaks again, with what it holds
                    ts.stream = next(reversed(ts.others))
                    ts.version_acked, ts.acked_resources = ts.others.pop(ts.stream)
                else:
                    ts.version_acked = ""
                    ts.acked_resources = {}
                    ts.stream = None
        self._emit(AckEvent("closed", node_id, "", "", {}))
        self._forget_departed()

    def sent(self, node_id: str, type_url: str, version: str, nonce: str, count: int) -> None:
        ts = self.type_status(node_id, type_url)
        ts.version_sent = version
        ts.nonce_sent = nonce
        ts.awaiting = nonce
        ts.responses_sent += 1
        ts.resources_sent += count
        self.responses_total[type_url] = self.responses_total.get(type_url, 0) + 1

    def acked(
        self,
        node_id: str,
        type_url: str,
        version: str,
        resource_versions: dict[str, str],
        *,
        replace: bool,
        stream: object | None = None,
        partial: bool = False,
        nonce: str = "",
    ) -> None:
        """Record an ACK. `replace`: the ACKed set is the whole state (SotW wildcard) rather
        than an update to merge (delta, or a named subscription). `partial`: the ACK covers
        only names subscribed to after the client rejected `version` (delta): the node holds
        them, but not that version, and the NACK stands. From a `stream` that no longer speaks
        for the type (another stream of the node took it over: an Envoy hot restart, or two
        Envoys with one node id), it is ignored: the newer stream's client is the one whose
        config counts. `nonce`: the response it answers."""
        ts = self.type_status(node_id, type_url)
        if not _speaks(ts, stream):
            self.stale_reports += 1
            other = ts.others.get(stream)
            if other is not None:  # what that client holds, should it speak again
                held = dict(resource_versions) if replace else {**other[1], **resource_versions}
                ts.others[stream] = (other[0] if partial else version, held)
            return
        self.epoch += 1
        if nonce and nonce == ts.awaiting:
            ts.awaiting = ""
        if not partial:
            ts.version_acked = version
            ts.last_nack = None
        if replace:
            ts.acked_resources = dict(resource_versions)
        else:
            ts.acked_resources.update(resource_versions)
        self._emit(AckEvent("ack", node_id, type_url, version, dict(resource_versions)))

    def resumed(
        self,
        node_id: str,
        type_url: str,
        version: str,
        resource_versions: dict[str, str] | None,
        *,
        stream: object,
        current: dict[str, str] | None = None,
    ) -> None:
        """`stream`'s first request for a type said what its client holds; that is all the node
        holds of it now, and `stream` speaks for the type from here on. Delta: the resources
        (`initial_resource_versions`). SotW: only a version (`resource_versions` None), empty
        for a restarted Envoy; a client stating the version the node held when its last
        stream closed holds what it held then; one stating the version of the node's snapshot
        now holds `current`, its resources (an Envoy that kept its config while the control
        plane restarted: nothing is sent to it, and without this it would count as holding
        nothing until the next change). Any other version is taken to hold nothing we know
        of. An event says so: nothing new was delivered, but what the node holds changed (an
        Envoy that kept its config while the control plane restarted holds the current
        version from here on, and may never ACK anything until the next change)."""
        self.epoch += 1
        ts = self.type_status(node_id, type_url)
        if ts.stream is not None and ts.stream is not stream:
            ts.others[ts.stream] = (ts.version_acked, ts.acked_resources)
        ts.others.pop(stream, None)
        if resource_versions is None:
            before = ts.left if ts.stream is None else (ts.version_acked, ts.acked_resources)
            if before is not None and version and before[0] == version:
                resource_versions = before[1]
            elif current is not None:
                resource_versions = current
            else:
                resource_versions = {}
        ts.version_acked = version
        ts.acked_resources = dict(resource_versions)
        ts.last_nack = None  # that was another client, or the same one before it restarted
        ts.awaiting = ""  # (another stream's nonces)
        ts.stream = stream
        ts.left = None
        self._emit(AckEvent("resumed", node_id, type_url, version, {}))

    def removed(
        self, node_id: str, type_url: str, names: tuple[str, ...], stream: object | None = None
    ) -> None:
        ts = self.type_status(node_id, type_url)
        if not _speaks(ts, stream):
            self.stale_reports += 1
            other = ts.others.get(stream)
            if other is not None:
                gone = set(names)
                ts.others[stream] = (other[0], {k: v for k, v in other[1].items() if k not in gone})
            return
        self.epoch += 1
        for n in names:
            ts.acked_resources.pop(n, None)

    def nacked(
        self, record: NackRecord, sent_versions: dict[str, str], stream: object | None = None
    ) -> None:
        ts = self.type_status(record.node_id, record.type_url)
        if not _speaks(ts, stream):
            self.stale_reports += 1
            return
        self.epoch += 1
        self.nacks_total[record.type_url] = self.nacks_total.get(record.type_url, 0) + 1
        if record.nonce == ts.awaiting:
            ts.awaiting = ""
        if ts.last_nack is None or (ts.last_nack.version, ts.last_nack.message) != (
            record.version,
            record.message,
        ):
            # once per rejected version: the server holds the type until the next one, but a
            # reconnecting Envoy refuses it again. (Nothing was logged: an operator saw a
            # NACK only in /status.)
            log.warning(
                "node %s rejected %s version %s: %s",
                record.node_id,
                short_name(record.type_url),
                record.version,
                record.message,
            )
        ts.last_nack = record
        self._emit(
            AckEvent("nack", record.node_id, record.type_url, record.version, sent_versions, record)
        )

    def _forget_departed(self) -> None:
        horizon = self._clock() - self.forget_after
        departed = self._departed
        while departed:
            node_id, left_at = next(iter(departed.items()))
            if left_at > horizon:
                return
            del departed[node_id]
            self._nodes.pop(node_id, None)
            self.epoch += 1

    def _node(self, node_id: str) -> NodeStatus:
        node = self._nodes.get(node_id)
        if node is None:
            node = self._nodes[node_id] = NodeStatus(node_id)
        return node

    def _emit(self, event: AckEvent) -> None:
        for listener in list(self._listeners):
            listener(event)


def _speaks(ts: Any, stream: object | None) -> bool:
    """Whether a report from `stream` counts for the type: None (a caller that does not say,
    such as a test scripting ACKs) always does."""
    return stream is None or ts.stream is None or ts.stream is stream
