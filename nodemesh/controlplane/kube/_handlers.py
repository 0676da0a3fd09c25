"""The kopf handlers: thin, and all of them registered from the `RESOURCES` table.

Per watched kind: an index (`@kopf.index`) that holds the objects; an event handler that marks
the object's key dirty (kopf calls it after the index is updated, and only once every kind's
initial listing is indexed, which is how the feed knows the listing is complete);
for kinds with status, a timer that asks the `StatusWriter` for a status patch. No handler
builds configuration: the feed moves indexed objects into the store, the pipeline does the rest.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from typing import Any

import kopf

from nodemesh.controlplane.conditions import CONTROLLER_NAME
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


def build_registry(*, status_interval: float = 1.0) -> kopf.OperatorRegistry:
    """A fresh registry (not kopf's global one), so that several operators can share a process."""
    registry = kopf.OperatorRegistry()
    kopf.on.login(registry=registry, id="nm_login")(_login)
    kopf.on.startup(registry=registry, id="nm_attach_indexes")(_attach_indexes)
    for r in RESOURCES:
        kopf.index(r.group, r.version, r.plural, id=r.index_id, registry=registry)(_indexer(r))
        kopf.on.event(r.group, r.version, r.plural, id=f"nm_event_{r.plural}", registry=registry)(
            _watcher(r)
        )
        if r.status:
            # kopf puts a finalizer on every object a timer runs for (so that it can stop the
            # timer), which blocks its deletion while no replica runs. Gateway API routes
            # attached only to Gateways are another controller's: no timer, no finalizer, once
            # the status entries we wrote while it had a Service parent are removed.
            kopf.timer(
                r.group,
                r.version,
                r.plural,
                id=f"nm_status_{r.plural}",
                interval=status_interval,
                when=_is_ours if r.group == _GATEWAY_API else None,
                registry=registry,
            )(_status_writer(r))
    return registry


# Every handler is `async def`: kopf runs sync handlers in threads, and these touch loop-confined
# state (the feed's asyncio.Event, the status writer's token bucket).


async def _login(memo: kopf.Memo, **_: Any) -> kopf.ConnectionInfo:
    return _ctx(memo).connection


async def _attach_indexes(memo: kopf.Memo, **kwargs: Any) -> None:
    # kopf passes every index to startup handlers as a kwarg named after the index;
    # these are live views that kopf keeps updating.
    _ctx(memo).feed.attach({k: v for k, v in kwargs.items() if k.startswith("nm_")})


_GATEWAY_API = "gateway.networking.k8s.io"


def _has_service_parent(spec: kopf.Spec, **_: Any) -> bool:
    """A mesh route: a parentRef to a Service (GAMMA), the only parents we write status for
    (the builder's rule in `builder/_routes.py`)."""
    refs = spec.get("parentRefs")
    return isinstance(refs, list) and any(
        isinstance(ref, Mapping)
        and ref.get("kind") == "Service"
        and ref.get("group", "") in ("", "core")
        for ref in refs
    )


def _has_our_entry(status: kopf.Status) -> bool:
    parents = status.get("parents")
    return isinstance(parents, list) and any(
        isinstance(p, Mapping) and p.get("controllerName") == CONTROLLER_NAME for p in parents
    )


def _is_ours(spec: kopf.Spec, status: kopf.Status, **_: Any) -> bool:
    """A route we write status for: it has a Service parent, or had one and still carries the
    `status.parents` entries we wrote for it (Gateway API: removed with the parentRef)."""
    return _has_service_parent(spec) or _has_our_entry(status)


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
        type: str | None, name: str, namespace: str | None, memo: kopf.Memo, **_: Any
    ) -> None:
        ctx = _ctx(memo)
        key = _key(r, namespace, name)
        ctx.feed.touch(key)
        ctx.feed.mark_synced()
        if type is None:  # listed, not watched
            ctx.feed.listed(key)
        elif type == "DELETED":
            ctx.feed.deleted(key)
            ctx.status.forget(key)

    return on_event


def _status_writer(r: WatchedResource) -> Callable[..., Awaitable[None]]:
    async def write_status(
        name: str,
        namespace: str | None,
        status: kopf.Status,
        patch: kopf.Patch,
        memo: kopf.Memo,
        spec: kopf.Spec,
        **_: Any,
    ) -> None:
        key = _key(r, namespace, name)
        if r.group == _GATEWAY_API and not _has_service_parent(spec):
            _ctx(memo).status.release(key, status, patch.status)
        else:
            _ctx(memo).status.reconcile(key, status, patch.status)

    return write_status
