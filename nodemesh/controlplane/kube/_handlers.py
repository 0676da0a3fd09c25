"""The kopf handlers: thin, and all of them registered from the `RESOURCES` table.

Per watched kind: an index (`@kopf.index`) that holds the objects; an event handler that marks
the object's key dirty (kopf calls it after the index is updated, and only once every kind's
initial listing is indexed, which is how the feed knows the listing is complete);
for kinds with status, the same event tells the `StatusWriter` to compare the live status with
the desired one. No handler builds configuration or writes status: the feed moves indexed
objects into the store, the pipeline does the rest.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import kopf

from nodemesh.controlplane.kube._feed import Feed, plain_object
from nodemesh.controlplane.kube._resources import RESOURCES, WatchedResource
from nodemesh.controlplane.kube._status import StatusWriter
from nodemesh.controlplane.store import ObjectKey

__all__ = ["CONTEXT_KEY", "Context", "build_registry"]

log = logging.getLogger("nodemesh.controlplane.kube")

CONTEXT_KEY = "nodemesh"


@dataclass(frozen=True, slots=True)
class Context:
    """What the handlers reach through kopf's memo (one per operator instance)."""

    feed: Feed
    status: StatusWriter
    connection: kopf.ConnectionInfo


def _ctx(memo: kopf.Memo) -> Context:
    ctx = memo[CONTEXT_KEY]
    assert isinstance(ctx, Context)
    return ctx


def build_registry() -> kopf.OperatorRegistry:
    """A fresh registry (not kopf's global one), so that several operators can share a process.

    No timers, daemons or change handlers: kopf would put its finalizer on the objects. The
    finalizer's name stays set (`FINALIZER`), so kopf removes it from objects that still carry
    it from an older nodemesh, whose status timers needed it."""
    registry = kopf.OperatorRegistry()
    kopf.on.login(registry=registry, id="nm_login")(_login)
    kopf.on.startup(registry=registry, id="nm_attach_indexes")(_attach_indexes)
    for r in RESOURCES:
        kopf.index(r.group, r.version, r.plural, id=r.index_id, registry=registry)(_indexer(r))
        kopf.on.event(r.group, r.version, r.plural, id=f"nm_event_{r.plural}", registry=registry)(
            _watcher(r)
        )
    return registry


# Every handler is `async def`: kopf runs sync handlers in threads, and these touch loop-confined
# state (the feed's asyncio.Event, the status writer's token bucket).


async def _login(memo: kopf.Memo, **_: Any) -> kopf.ConnectionInfo:
    return _ctx(memo).connection


async def _attach_indexes(memo: kopf.Memo, **kwargs: Any) -> None:
    # kopf passes every index to startup handlers as a kwarg named after the index;
    # these are live views that kopf keeps updating.
    _ctx(memo).feed.attach({k: v for k, v in kwargs.items() if k.startswith("nm_")})


def _key(r: WatchedResource, namespace: str | None, name: str) -> ObjectKey:
    return ObjectKey(r.kind, (namespace or "") if r.namespaced else "", name)


def _indexer(r: WatchedResource) -> Callable[..., Awaitable[dict[ObjectKey, dict[str, Any]]]]:
    async def index(
        body: kopf.Body, name: str, namespace: str | None, **_: Any
    ) -> dict[ObjectKey, dict[str, Any]]:
        return {_key(r, namespace, name): plain_object(r, body)}

    index.__name__ = r.index_id
    return index


def _watcher(r: WatchedResource) -> Callable[..., Awaitable[None]]:
    async def on_event(
        type: str | None,
        name: str,
        namespace: str | None,
        memo: kopf.Memo,
        uid: str | None = None,
        **_: Any,
    ) -> None:
        ctx = _ctx(memo)
        key = _key(r, namespace, name)
        ctx.feed.touch(key, uid or "", deleted=type == "DELETED")
        ctx.feed.mark_synced()
        if type is None:  # listed, not watched
            ctx.feed.listed(key)
        elif type != "DELETED":
            ctx.feed.watched(key)
        if type == "DELETED":
            ctx.feed.deleted(key)
            ctx.status.forget(key)
        elif r.status:
            ctx.status.touch(key)

    return on_event
