"""The contract between the ADS server and whatever holds configuration (`ConfigWatcher`).

The server imports only this module; caches implement the Protocol. `Resource` is re-exported
because responses carry it.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Protocol

from nodemesh.xds.cache._resource import Resource

__all__ = [
    "Cancel",
    "ConfigWatcher",
    "DeltaWatchRequest",
    "DeltaWatchResponse",
    "Resource",
    "WatchRequest",
    "WatchResponse",
]

Cancel = Callable[[], None]


@dataclass(frozen=True, slots=True)
class WatchRequest:
    """A state-of-the-world watch on one type for one node.

    `names` is None for a wildcard subscription. `known_version` is the version the client
    holds, or the version last sent to it (ACKed or NACKed): the watch is not answered while the
    snapshot's version equals it, unless `names_changed` (the subscription grew).
    """

    node_id: str
    type_url: str
    known_version: str
    names: frozenset[str] | None
    names_changed: bool = False


@dataclass(frozen=True, slots=True)
class WatchResponse:
    type_url: str
    version: str
    resources: tuple[Resource, ...]


@dataclass(frozen=True, slots=True)
class DeltaWatchRequest:
    """An incremental watch on one type for one node.

    `client_versions` is what the client holds (name -> version). The watch is answered when the
    snapshot differs from it within the subscription (`wildcard` or `subscribed`), but not while
    the snapshot's type version equals `hold_version` (a version the client rejected): then only
    the `unheld` names (subscribed to since the client rejected it) are compared, and answered
    alone, with no `basis`.
    `answer_empty` asks for a response even with nothing to send, for a client's first request
    on a fresh stream, so that Envoy finishes initialising a type that is empty.

    `basis` lets the watcher answer at a cost in the changes instead of the subscription's
    size. It is the `basis` of an earlier response of this type, or None. The caller promises:
    for every subscribed name not in `dirty`, `client_versions` has exactly the version that
    response's set had (absent where the set had no such name). `dirty` names what may differ
    since: a NACKed or out-of-order ACKed response, a new subscription, an unsubscribe, a
    resource the client was made to forget. The answer is the same with or without a basis;
    a watcher may ignore it. A false promise gives wrong answers, so when unsure, pass None.
    """

    node_id: str
    type_url: str
    wildcard: bool
    subscribed: frozenset[str]
    client_versions: Mapping[str, str]
    hold_version: str | None = None
    answer_empty: bool = False
    basis: object | None = None
    dirty: frozenset[str] = frozenset()
    unheld: frozenset[str] = frozenset()


@dataclass(frozen=True, slots=True)
class DeltaWatchResponse:
    """The changes for one delta watch. `basis`, when not None, stands for the set of resources
    this answer was made from: a client that applies the answer holds exactly that set within
    its subscription, and the next request can say so (`DeltaWatchRequest.basis`)."""

    type_url: str
    version: str
    updated: tuple[Resource, ...]
    removed: tuple[str, ...] = field(default=())
    basis: object | None = None


class ConfigWatcher(Protocol):
    """What the ADS server needs from a configuration source.

    Contract:
    - A watch is answered at most once, by calling `respond` exactly once, possibly before
      `create_*watch` returns. The client's next request opens the next watch.
    - When one change answers several watches of a node, they are answered in
      `nodemesh.xds.types.order_key` order (CDS, EDS, SDS, LDS, RDS, custom), so a server that
      forwards responses in call order sends them in the order Envoy needs.
    - `current_version(node_id, type_url)` is the version of the type that a watch of that node
      would be answered from now (None: nothing serves it yet). The server compares it with the
      CDS version it last sent on a stream: endpoints, Listeners and routes do not overtake the
      Clusters they may name.
    - The returned `Cancel` removes an unanswered watch; calling it after the answer is a no-op.
    - Everything runs on one event loop thread; `respond` must not block.
    - Responses carry shared `Resource` objects: the caller must not alter them.
    - A delta request's `client_versions` may be a live view of the stream's state: it does not
      change while the watch is open, but the watcher must not keep it after answering or
      being cancelled.

    Usage, from a server's point of view::

        cancel = watcher.create_watch(WatchRequest("node-1", CLUSTER, "", None), queue.put_nowait)
        ...
        cancel()  # stream closed, or the client sent a newer request for the type
    """

    def create_watch(
        self, request: WatchRequest, respond: Callable[[WatchResponse], None]
    ) -> Cancel: ...

    def create_delta_watch(
        self, request: DeltaWatchRequest, respond: Callable[[DeltaWatchResponse], None]
    ) -> Cancel: ...

    def current_version(self, node_id: str, type_url: str) -> str | None: ...
