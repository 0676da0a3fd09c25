"""`Feed`: moves objects from kopf's indexes into the `Store`, level-based, one dirty key at a time.

kopf index handlers and event handlers only mark keys dirty; `Feed.flush` reads each dirty key's
current value from the index (present -> `Store.apply`, absent -> `Store.delete`). Nothing is
written before the first full listing of every kind is indexed, so a restarted operator
publishes its first snapshot from complete data and Envoy sees no churn. Waiting has no time
limit: a listing that takes long (an API server that is down, or slow at scale) is no empty
cluster, and serving then would withdraw every route from the Envoys that connect.

When kopf lists a kind again (after a 410 Gone: an API server restart, a watch down for long),
the objects that went meanwhile get no DELETED event and would stay in kopf's index and here.
A key listed twice tells the feed that a new listing happened; it then `sweep`s: lists each
kind itself and deletes from the store what no longer exists and had no event since; a kind
whose list fails is listed again until it lists.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Awaitable, Callable, Collection, Mapping
from typing import Any, Protocol

from nodemesh.controlplane.kube._errors import ListingError
from nodemesh.controlplane.kube._resources import RESOURCES, WatchedResource
from nodemesh.controlplane.store import ObjectKey, Store

__all__ = ["Feed", "IndexLike"]

log = logging.getLogger("nodemesh.controlplane.kube")

_CONFIG_KINDS = frozenset(r.kind for r in RESOURCES if r.config)
# A kind whose sweep list failed is listed again after this long, doubling up to the maximum.
_SWEEP_RETRY = 1.0
_MAX_SWEEP_RETRY = 30.0
# Every kind is swept this often anyway: a relisting is told only by a key it repeats, and one
# that repeats none (every object of a kind went while its watch was down) is not seen.
_SWEEP_EVERY = 900.0


class IndexLike(Protocol):
    """The read side of a `kopf.Index` that the feed needs."""

    def get(self, key: Any, default: Any = None) -> Any: ...


# Asked while the first listing is not complete: None if the cluster holds nothing to list,
# else why it may (see `_listing.unlisted`).
Probe = Callable[[], Awaitable[str | None]]
# The keys of every object of a kind that exists now (in the watched namespaces), with their
# uids; raises `ListingError` (see `_listing.existing`).
Lister = Callable[[WatchedResource], Awaitable[Mapping[ObjectKey, str]]]


class Feed:
    """Dirty keys in, store writes out. Loop-confined (kopf handlers run on the same loop).

    `probe` tells an empty cluster (kopf calls no handler, so the listing never looks
    complete) from one whose listing is not done; without one the feed waits for a handler.
    `existing` lists a kind for `sweep`; without one nothing is swept.
    """

    def __init__(
        self,
        store: Store,
        *,
        initial_sync_timeout: float = 10.0,
        probe: Probe | None = None,
        existing: Lister | None = None,
        sweep_delay: float = 1.0,
    ) -> None:
        self._store = store
        self._probe = probe
        self._existing = existing
        self._sweep_delay = sweep_delay
        # per kind, the keys of kopf's latest listing of it (so far): a key listed again
        # begins the next listing
        self._listed: dict[str, set[ObjectKey]] = {}
        self._relisted = asyncio.Event()
        # during a sweep: the keys with an event since it began, and the uids those were of
        self._touched: dict[ObjectKey, set[str]] | None = None
        self._unswept: dict[str, int] = {}  # kinds whose sweep list failed: failures in a row
        self._indexes: dict[str, IndexLike] = {}
        self._dirty: set[ObjectKey] = set()
        # per key, the uids of objects that are gone while kopf's index still holds them (an
        # object deleted while the watch was down, found by the sweep; or one whose DELETED
        # is seen before kopf's per-object worker drops it): see `lookup`
        self._dead: dict[ObjectKey, set[str]] = {}
        self._wakeup = asyncio.Event()
        self._synced = asyncio.Event()
        self._initial_sync_timeout = initial_sync_timeout
        self.flushed = 0  # store writes that changed something, for tests and status
        # time.monotonic() of the last handler call: kopf calls them only once every kind is
        # listed, so a kopf started after it has listed the cluster (see `Operator`)
        self.heard = 0.0

    # -- called from kopf handlers ---------------------------------------------------------
    def attach(self, indexes: Mapping[str, IndexLike]) -> None:
        """Remember kopf's live index objects (from the startup handler's kwargs)."""
        for r in RESOURCES:
            if r.index_id in indexes:
                self._indexes[r.kind] = indexes[r.index_id]
        self._dead.clear()  # a new kopf's indexes: they hold none of the dead uids

    def touch(self, key: ObjectKey, uid: str = "", deleted: bool = False) -> None:
        """An event for `key` (of the object with `uid`, if said; `deleted`: its DELETED)."""
        if deleted and uid:
            self._dead.setdefault(key, set()).add(uid)
        elif uid and key in self._dead:
            # an event of that object: it is there (kopf's worker for a uid ends with its
            # DELETED), whatever a sweep that ran between its indexing and this concluded
            self._dead[key].discard(uid)
        self._dirty.add(key)
        self._wakeup.set()
        if self._touched is not None:
            self._touched.setdefault(key, set()).add(uid)

    def listed(self, key: ObjectKey) -> None:
        """kopf listed `key` (an event of type None). Listed twice: kopf lists again."""
        listing = self._listed.setdefault(key.kind, set())
        if key in listing:
            listing.clear()  # this listing, not the last one, tells when the next one begins
            if self._synced.is_set() and not self._relisted.is_set():
                log.info("kopf lists %s again: sweeping for objects that went meanwhile", key.kind)
                self._relisted.set()
        listing.add(key)

    def watched(self, key: ObjectKey) -> None:
        """A watch event for `key` (added or modified): a key the next listing lists again.
        Without it, once every key of a listing was replaced through the watch (a rollout),
        the next listing repeated none, and what went meanwhile was never swept."""
        self._listed.setdefault(key.kind, set()).add(key)

    def deleted(self, key: ObjectKey) -> None:
        index = self._indexes.get(key.kind)
        if index is not None and index.get(key):
            return  # (an older object's late DELETED: the name is still listed)
        self._listed.get(key.kind, set()).discard(key)

    def mark_synced(self) -> None:
        """kopf runs non-index handlers only once every watched kind is fully indexed."""
        self.heard = time.monotonic()
        if not self._synced.is_set():
            log.info("initial listing indexed: %d objects pending", len(self._dirty))
            self._synced.set()

    @property
    def synced(self) -> bool:
        return self._synced.is_set()

    # -- the loop --------------------------------------------------------------------------
    async def run(self, ready: asyncio.Event | None = None) -> None:
        """Flush dirty keys into the store until cancelled. `ready` is set once the store holds
        the initial listing of every watched kind."""
        await self._initial_sync()
        self.flush()
        if ready is not None:
            ready.set()
        sweeper = asyncio.create_task(self._sweep_on_relisting(), name="nodemesh-kube-sweep")
        try:
            while True:
                await self._wakeup.wait()
                self._wakeup.clear()
                self.flush()
        finally:
            sweeper.cancel()

    async def _sweep_on_relisting(self) -> None:
        retry = _SWEEP_RETRY
        while True:
            kinds: set[str] | None = None  # every kind
            if self._unswept:
                # A kind whose list failed is listed again until it lists: else what went of
                # it while the watch was down would stay until the next relisting, days away.
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._relisted.wait(), retry)
                if not self._relisted.is_set():
                    kinds, retry = set(self._unswept), min(retry * 2, _MAX_SWEEP_RETRY)
            else:
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._relisted.wait(), _SWEEP_EVERY)
            if kinds is None and self._relisted.is_set():
                # Not needed for correctness: lets kopf's listing go on, so one sweep covers it.
                await asyncio.sleep(self._sweep_delay)
                self._relisted.clear()
                retry = _SWEEP_RETRY
            try:
                await self.sweep(kinds)
            except Exception:  # a bug: said, and the next relisting sweeps again
                log.exception("sweep after relisting failed")

    async def sweep(self, kinds: Collection[str] | None = None) -> int:
        """Delete from the store the objects that do not exist and had no event since the
        sweep began (an object created after a kind's list has one); of `kinds`, else of every
        kind. A kind whose list fails is swept again later (see `_sweep_on_relisting`).
        Returns how many went."""
        if self._existing is None:
            return 0
        self._touched = {}
        removed = 0
        try:
            for r in RESOURCES:
                if kinds is not None and r.kind not in kinds:
                    continue
                if not self._store.keys(r.kind):
                    self._unswept.pop(r.kind, None)  # nothing to remove (a CRD not installed)
                    continue
                try:
                    now = await self._existing(r)
                except ListingError as exc:
                    # Kept: a kind that cannot be listed now (a 404 from an API server that
                    # does not serve its CRD yet, a 429 from one that every client lists
                    # again) may well exist.
                    failed = self._unswept[r.kind] = self._unswept.get(r.kind, 0) + 1
                    log.log(
                        logging.WARNING if failed == 1 else logging.DEBUG,
                        "sweep: %s, its objects are kept until it lists (tried again, said once)",
                        exc,
                    )
                    continue
                if self._unswept.pop(r.kind, None):
                    log.info("sweep: %s listed again", r.plural)
                for key in self._store.keys(r.kind):
                    # Every object kopf holds for the name is gone but the one listed and
                    # those with an event since the list began (made since, or changed).
                    seen = self._touched.get(key)
                    listed = now.get(key)
                    alive = (seen or set()) | ({listed} if listed else set())
                    buried = self._bury(key, alive)
                    if listed is None and seen is None:
                        if self._store.delete(key):
                            removed += 1
                            log.info("removed %s: it went while the watch was down", key)
                    elif buried and (listed is None or self._holds(key, listed)):
                        # made again under its name while the watch was down: the object
                        # that exists is the one to store
                        self._dirty.add(key)
                        self._wakeup.set()
        finally:
            self._touched = None
        self.flushed += removed
        return removed

    async def _initial_sync(self) -> None:
        waited = 0.0
        while not self._synced.is_set():
            try:
                await asyncio.wait_for(self._synced.wait(), self._initial_sync_timeout)
                return
            except TimeoutError:
                waited += self._initial_sync_timeout
            why = "no way to ask" if self._probe is None else await self._probe()
            if self._synced.is_set():
                return
            if why is None:
                # An empty cluster never calls a non-index handler; its empty state is complete.
                log.info("nothing to list after %.1fs: an empty cluster", waited)
                self._synced.set()
            else:
                log.warning(
                    "initial listing not complete after %.0fs (%s): not ready, xDS not served",
                    waited,
                    why,
                )

    def flush(self) -> int:
        """Write every dirty key's current indexed value into the store. Returns writes done."""
        dirty, self._dirty = self._dirty, set()
        writes = 0
        for key in sorted(dirty):
            level = logging.INFO if key.kind in _CONFIG_KINDS else logging.DEBUG
            # A bug downstream must not stop the feed for every other object: the rest of the
            # batch, out of `_dirty`, would never be stored (the feed's task started again has
            # none of it), and after the first flush `ready` would be set without them.
            try:
                obj = self.lookup(key)
                if obj is None:
                    if self._store.delete(key):
                        writes += 1
                        log.log(level, "removed %s", key)
                    continue
                try:
                    changed = self._store.apply(obj)
                except ValueError as exc:
                    log.warning("rejected %s: %s", key, exc)
                    continue
            except Exception:
                log.exception("storing %s failed", key)
                continue
            if changed:
                writes += 1
                log.log(level, "stored %s", key)
        self.flushed += writes
        return writes

    def lookup(self, key: ObjectKey) -> Mapping[str, Any] | None:
        """`key`'s object in kopf's index (what the store gets), or None.

        kopf keeps a value per (namespace, name, uid), and runs one worker per uid: for one
        name, an object's events may come after those of the next object of that name (a
        DELETED after the new one's ADDED). An object that went while the watch was down had
        no DELETED event, so its value stays: one made again under its name (a StatefulSet's
        pod, a Service re-applied) is a second value, after it. The one read is the last that
        is not known dead (a DELETED seen for it, or a sweep found it neither listed nor with
        an event since its list began).
        Until 2026-11-23 the first was read: the deleted object's, which the store then kept,
        every change of the new object ignored."""
        index = self._indexes.get(key.kind)
        values = list(index.get(key) or ()) if index is not None else []
        dead = self._dead.get(key)
        if dead is not None:
            dead.intersection_update(_uid(v) for v in values)  # what kopf still holds
            if not dead:
                del self._dead[key]
            values = [v for v in values if _uid(v) not in dead]
        # the newest: a value kopf holds keeps its place, a new uid's comes last
        return values[-1] if values else None

    def _holds(self, key: ObjectKey, uid: str) -> bool:
        """Whether kopf's index holds the object of `key` with `uid` (not yet: the store keeps
        what it has until that object's event)."""
        index = self._indexes.get(key.kind)
        return index is not None and any(_uid(v) == uid for v in index.get(key) or ())

    def _bury(self, key: ObjectKey, alive: set[str]) -> bool:
        """Mark dead every object kopf's index holds for `key` but those with a uid in
        `alive`. Whether any was."""
        index = self._indexes.get(key.kind)
        held = {_uid(v) for v in (index.get(key) or ())} if index is not None else set()
        gone = held - alive - {None}
        if not gone:
            return False
        self._dead.setdefault(key, set()).update(gone)
        return True


# The spec and status fields of the largest inventory kinds that the build reads
# (`builder/node.py`; a Node's conditions for its Ready one, which the store keeps alone); the
# rest (a Pod's containers, volumes and container statuses, a Node's images) is not copied
# into kopf's index and the store. At 100,000 Pods it was most of the control plane's memory,
# and of each Pod event's copying and comparing.
_READ: Mapping[str, Mapping[str, tuple[str, ...]]] = {
    "Pod": {"spec": ("nodeName", "hostNetwork"), "status": ("phase", "podIP", "podIPs")},
    "Node": {"spec": (), "status": ("addresses", "conditions")},
}


def _uid(obj: Mapping[str, Any]) -> Any:
    meta = obj.get("metadata")
    return meta.get("uid") if isinstance(meta, Mapping) else None


def plain_object(resource: WatchedResource, body: Mapping[str, Any]) -> dict[str, Any]:
    """A plain dict of a kopf body, with apiVersion/kind set (list items may lack them)."""
    read = _READ.get(resource.kind)
    obj: dict[str, Any] = {
        k: _plain(v) if read is None or k not in read else _only(v, read[k])
        for k, v in body.items()
    }
    obj["apiVersion"] = resource.api_version
    obj["kind"] = resource.kind
    meta = obj.get("metadata")
    if isinstance(meta, dict):
        meta.pop("managedFields", None)
    return obj


def _only(value: Any, fields: tuple[str, ...]) -> dict[str, Any]:
    if not isinstance(value, Mapping):
        return {}
    return {f: _plain(value[f]) for f in fields if f in value}


def _plain(value: Any) -> Any:
    if isinstance(value, Mapping):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_plain(v) for v in value]
    return value
