"""`StatusWriter`: writes the pipeline's status to the routes' and policies' status subresource.

Event-driven: an object is checked when its desired status changes (the pipeline reports it) or
its live one does (a watch event), or when the pipeline has built again while it waited for its
build (an object created again under its name), and written only when the two differ, by the
leader, at most once per object per `interval` and `rate` times per second in all. No kopf
timer: kopf puts a finalizer on every object a timer runs for, which blocks deleting it while
nodemesh is not running (uninstalled, scaled to 0), and its timers check every object every
interval.
Every replica logs each accept/reject transition when the source reports it.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Awaitable, Callable, Mapping
from typing import Any, Protocol, runtime_checkable

from nodemesh.controlplane.conditions import CONTROLLER_NAME
from nodemesh.controlplane.kube._resources import RESOURCES
from nodemesh.controlplane.store import ObjectKey

__all__ = [
    "Leadership",
    "Lookup",
    "ObservableStatusSource",
    "Send",
    "StatusSource",
    "StatusWriter",
    "always_leader",
    "status_patch",
]

log = logging.getLogger("nodemesh.controlplane.kube")


class StatusSource(Protocol):
    """Where the desired status of an object comes from (the pipeline).

    Returns the top-level status fields to hold (e.g. `{"conditions": [...]}` or, for Gateway API
    routes, `{"parents": [...]}`), or None while the object has not been built yet.
    The returned mapping must not be altered.

    Optional, looked up by name (the pipeline's `kubernetes_status` has both):
    `built_from(key)`, the object the status was computed from, so that an object deleted and
    created again under its name waits for its own build (its uid); and
    `subscribe_built(callback) -> unsubscribe`, `callback()` on the event loop after each
    build, when such an object is looked at again. Without the latter it is looked at again
    after 50 ms, doubling to 5 s. `settling()`: True while the node Envoys may still be
    reconnecting to a control plane that just started; a `Programmed` that waits for them
    does not replace a live True (or Rejected) of the same generation meanwhile (the source
    reports every object once it has settled, so that what was held back is written then).
    """

    def __call__(self, key: ObjectKey) -> Mapping[str, Any] | None: ...


@runtime_checkable
class ObservableStatusSource(StatusSource, Protocol):
    """A `StatusSource` that also tells when an object's desired status may have changed (the
    pipeline's `kubernetes_status`). `subscribe` returns the unsubscribe function; callbacks
    come on the event loop.

    The writer checks the object and logs its verdict on each call, so a verdict that lasts
    a moment (a route accepted, then changed 50 ms later) is logged too. A source without
    `subscribe` is checked on the objects' watch events only.
    """

    def subscribe(self, callback: Callable[[ObjectKey], None]) -> Callable[[], None]: ...


class Leadership(Protocol):
    @property
    def is_leader(self) -> bool: ...


class _Always:
    is_leader = True


always_leader: Leadership = _Always()


# The live object of a key (kopf's index: metadata, spec and status), or None.
Lookup = Callable[[ObjectKey], Mapping[str, Any] | None]
# Send a merge patch to a key's status subresource; returns the HTTP status code (raises
# aiohttp.ClientError or TimeoutError when there is no answer).
Send = Callable[[ObjectKey, Mapping[str, Any]], Awaitable[int]]

# After a failed write, the next try waits `interval`, at least `_MIN_BACKOFF`, doubled per
# failure, at most `_MAX_BACKOFF`. The floor: with `--status-interval 0` the doubling stayed at
# 0, and an object the API server refused (403: RBAC without `patch` on the status) was sent
# again at the full status rate, for good.
_MIN_BACKOFF = 1.0
_MAX_BACKOFF = 30.0
_YIELD_EVERY = 64  # keys checked between two yields to the event loop
# How soon to look again whether an object created again under its name has been built, from
# a source that does not tell when it builds (`subscribe_built`); doubled per look, at most
# `_MAX_REBUILD_POLL`.
_REBUILD_POLL = 0.05
_MAX_REBUILD_POLL = 5.0


class StatusWriter:
    """Compares desired and live status; patches the difference (leader only).

    Usage: `touch(key)` on every watch event of a key, `forget(key)` on its deletion; `start()`
    subscribes to the source's reports; `await run(lookup, send)` writes until cancelled.
    """

    def __init__(
        self,
        source: StatusSource,
        leadership: Leadership = always_leader,
        *,
        rate: float = 50.0,
        interval: float = 1.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if not rate > 0:
            raise ValueError(f"status write rate must be above 0, not {rate}")
        self._source = source
        self._leadership = leadership
        self._rate = rate
        self._interval = interval
        self._burst = max(1.0, rate)
        self._tokens = self._burst
        self._clock = clock
        self._last = clock()
        self._verdicts: dict[ObjectKey, str] = {}
        self._unsubscribe: Callable[[], None] | None = None
        self._unsubscribe_built: Callable[[], None] | None = None
        # Keys to check. A replica that is not the leader keeps them: once it leads, it checks
        # everything that changed since it started, which is everything that may differ.
        self._dirty: set[ObjectKey] = set()
        self._not_before: dict[ObjectKey, float] = {}  # the next write's earliest time
        self._failures: dict[ObjectKey, int] = {}
        self._failing: set[str] = set()  # the causes of the failures, each said once
        # Keys whose live object is not the one the source built (created again under its
        # name), and how often each was looked at so: looked at again after the next build.
        self._unbuilt: dict[ObjectKey, int] = {}
        self._wakeup: asyncio.Event | None = None
        self.checks = 0  # looks at a built object's desired status against the live object
        self.writes = 0
        self.held = 0  # checks while the source settled (Programmed held back, see settling)
        self.throttled = 0
        self.failed = 0

    # -- what to check ---------------------------------------------------------------------
    def touch(self, key: ObjectKey) -> None:
        """`key`'s live or desired status may have changed."""
        if key.kind not in _STATUS_KINDS:
            return  # (the pipeline reports every kind's conditions; a Pod's are notices)
        self._dirty.add(key)
        if self._wakeup is not None:
            self._wakeup.set()

    def forget(self, key: ObjectKey) -> None:
        """`key` is deleted."""
        self._verdicts.pop(key, None)
        self._dirty.discard(key)
        self._not_before.pop(key, None)
        self._unbuilt.pop(key, None)
        if self._failures.pop(key, None) and not self._failures:
            self._failing.clear()  # the next failure is a new one, said again

    def start(self) -> None:
        """Log every verdict change as it happens, and check the object then, if the source
        can be watched."""
        if isinstance(self._source, ObservableStatusSource) and self._unsubscribe is None:
            self._unsubscribe = self._source.subscribe(self.observe)
        subscribe_built = getattr(self._source, "subscribe_built", None)
        if subscribe_built is not None and self._unsubscribe_built is None:
            self._unsubscribe_built = subscribe_built(self.built)

    def stop(self) -> None:
        if self._unsubscribe is not None:
            self._unsubscribe()
            self._unsubscribe = None
        if self._unsubscribe_built is not None:
            self._unsubscribe_built()
            self._unsubscribe_built = None

    def built(self) -> None:
        """The source built again: check the objects that waited for their build."""
        for key in self._unbuilt:
            self.touch(key)

    def observe(self, key: ObjectKey) -> None:
        """`key`'s desired status may have changed: log its verdict if that changed."""
        desired = self._source(key)
        if desired is None:
            self._verdicts.pop(key, None)
        else:
            self._log_verdict(key, desired)
        self.touch(key)

    # -- writing ---------------------------------------------------------------------------
    async def run(self, lookup: Lookup, send: Send) -> None:
        """Check dirty keys and write what differs, until cancelled."""
        self._wakeup = asyncio.Event()
        while True:
            self._wakeup.clear()
            wait = 1.0  # at the latest: whether this replica became the leader
            if self._leadership.is_leader:
                wait = min(wait, await self._pass(lookup, send))
            if not self._wakeup.is_set():
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._wakeup.wait(), max(wait, 0.001))

    async def _pass(self, lookup: Lookup, send: Send) -> float:
        """Check every dirty key that is due; returns how long until the next one is."""
        wait = 1.0
        for n, key in enumerate(list(self._dirty), 1):
            if n % _YIELD_EVERY == 0:
                # A pass over every object (a new leader, kopf listing again) compares them
                # all, 50-60 us each: let the ADS streams and the feed run in between.
                await asyncio.sleep(0)
            now = self._clock()
            due = self._not_before.get(key, 0.0)
            if due > now:
                wait = min(wait, due - now)
                continue
            if self._refill(now) < 1.0:
                return min(wait, (1.0 - self._tokens) / self._rate)  # out of tokens
            if not self._leadership.is_leader:
                break
            self._dirty.discard(key)
            try:
                await self._check(key, lookup, send)
            except Exception:  # a bug must not stop every other object's status
                log.exception("status of %s: check failed", key)
            if key in self._dirty:  # to be tried again
                wait = min(wait, self._not_before.get(key, 0.0) - self._clock())
        return wait

    async def _check(self, key: ObjectKey, lookup: Lookup, send: Send) -> None:
        obj = lookup(key)
        if obj is None:
            return  # deleted, or kopf not (yet) running: its listing touches it again
        live = _as_map(obj.get("status"))
        if key.kind in _ROUTE_KINDS and not _has_service_parent(_as_map(obj.get("spec"))):
            # Not a mesh route (any more): remove the `parents[]` entries we wrote, if any,
            # as Gateway API asks of a controller whose parentRef is gone.
            if not _has_our_entry(live):
                return
            self._verdicts.pop(key, None)
            desired: Mapping[str, Any] = {"parents": []}
        else:
            built = self._source(key)
            if built is None:
                return  # not built yet: the source reports it once it is
            self.checks += 1
            if not self._built_from_live(key, obj):
                # The status is of an object deleted under this name (`kubectl replace
                # --force`): wait for the new one's build. Not only for its report: a build
                # that gives the same conditions reports nothing. Not by looking every 50 ms:
                # the build may never come (it fails, or the new object is refused).
                looks = self._unbuilt[key] = self._unbuilt.get(key, 0) + 1
                if self._unsubscribe_built is None:  # no word of builds: look less and less
                    delay = min(_MAX_REBUILD_POLL, _REBUILD_POLL * 2 ** min(looks - 1, 16))
                    self._dirty.add(key)
                    self._not_before[key] = self._clock() + delay
                return
            self._unbuilt.pop(key, None)
            desired = built
            settling = getattr(self._source, "settling", None)
            if settling is not None and settling():
                self.held += 1
                desired = _hold_programmed(desired, live)
        patch = status_patch(desired, live)
        if not patch:
            self._failures.pop(key, None)
            return
        now = self._clock()
        if self._not_before.get(key, 0.0) > now:
            self._dirty.add(key)
            return
        if not self._take_token():
            self.throttled += 1
            self._dirty.add(key)
            self._not_before[key] = now + 1.0 / self._rate
            return
        body: dict[str, Any] = {"status": patch}
        version = _as_map(obj.get("metadata")).get("resourceVersion")
        if version:
            # In a merge patch a resourceVersion is a precondition: the API server answers 409
            # if the object changed since we read it (another controller's `parents[]` entry
            # would otherwise be lost; the list is replaced whole).
            body["metadata"] = {"resourceVersion": version}
        try:
            code = await send(key, body)
        except Exception as exc:  # aiohttp.ClientError, TimeoutError: no answer
            code, why = 0, repr(exc)
        else:
            why = f"HTTP {code}"
        now = self._clock()
        if code in (200, 201):
            self.writes += 1
            self._not_before[key] = now + self._interval
            if self._failures.pop(key, None) and self._failing and not self._failures:
                log.info("status writes succeed again (%s)", ", ".join(sorted(self._failing)))
                self._failing.clear()
            log.debug("status of %s: wrote %s", key, sorted(patch))
        elif code == 404:
            # deleted meanwhile (its watch event forgets it, or the index no longer holds it
            # when this looks again), or a 404 the API server gave for a moment (a CRD being
            # upgraded): looked at again after the interval, at least a second. The write was
            # dropped until the object's next event.
            self._dirty.add(key)
            self._not_before[key] = now + max(self._interval, _MIN_BACKOFF)
        elif code == 409:
            # changed meanwhile: its watch event brings the new version and touches it; checked
            # again after `interval` (at least `_MIN_BACKOFF`: with `--status-interval 0` a
            # lagging watch had it sent again at the full status rate, 148 times in 2 s), not
            # at once with the stale version
            self._dirty.add(key)
            self._not_before[key] = now + max(self._interval, _MIN_BACKOFF)
        else:
            self.failed += 1
            failures = self._failures.get(key, 0) + 1
            self._failures[key] = failures
            delay = min(_MAX_BACKOFF, max(self._interval, _MIN_BACKOFF) * 2 ** (failures - 1))
            # Said once per cause, not once per object: a Role without `patch` on the status
            # refuses every object's write alike.
            level = logging.DEBUG if why in self._failing else logging.WARNING
            self._failing.add(why)
            log.log(level, "status of %s not written (%s); trying again", key, why)
            self._dirty.add(key)
            self._not_before[key] = now + delay

    def _built_from_live(self, key: ObjectKey, live: Mapping[str, Any]) -> bool:
        """Whether the source's status of `key` is of the live object, as far as the source
        tells (`built_from`) and the objects have uids (always, from an API server)."""
        built_from = getattr(self._source, "built_from", None)
        uid = _as_map(live.get("metadata")).get("uid")
        if built_from is None or not uid:
            return True
        built = built_from(key)
        return built is not None and _as_map(built.get("metadata")).get("uid") == uid

    def _refill(self, now: float) -> float:
        self._tokens = min(self._burst, self._tokens + (now - self._last) * self._rate)
        self._last = now
        return self._tokens

    def _take_token(self) -> bool:
        if self._refill(self._clock()) < 1.0:
            return False
        self._tokens -= 1.0
        return True

    def _log_verdict(self, key: ObjectKey, desired: Mapping[str, Any]) -> None:
        verdict = _verdict(desired)
        if verdict is None or self._verdicts.get(key) == verdict:
            return
        self._verdicts[key] = verdict
        if verdict.startswith("accepted"):
            log.info("%s %s", verdict, key)
        else:
            log.warning("%s %s", verdict, key)


_GATEWAY_API = "gateway.networking.k8s.io"
_STATUS_KINDS = frozenset(r.kind for r in RESOURCES if r.status)
_ROUTE_KINDS = frozenset(r.kind for r in RESOURCES if r.status and r.group == _GATEWAY_API)


def _has_service_parent(spec: Mapping[str, Any]) -> bool:
    """A mesh route: a parentRef to a Service (GAMMA), the only parents we write status for
    (the builder's rule in `builder/_routes.py`)."""
    refs = spec.get("parentRefs")
    return isinstance(refs, list) and any(
        isinstance(ref, Mapping)
        and ref.get("kind") == "Service"
        and ref.get("group", "") in ("", "core")
        for ref in refs
    )


def _has_our_entry(status: Mapping[str, Any]) -> bool:
    parents = status.get("parents")
    return isinstance(parents, list) and any(
        isinstance(p, Mapping) and p.get("controllerName") == CONTROLLER_NAME for p in parents
    )


def status_patch(desired: Mapping[str, Any], live: Mapping[str, Any]) -> dict[str, Any]:
    """The top-level status fields to write so that `live` holds `desired` (see
    `_against_live`); empty when it already does."""
    desired = _against_live(desired, live)
    return {k: _plain(v) for k, v in desired.items() if _plain(live.get(k)) != _plain(v)}


def _as_map(value: Any) -> Mapping[str, Any]:
    return value if isinstance(value, Mapping) else {}


def _conditions(desired: Mapping[str, Any]) -> list[Mapping[str, Any]]:
    found: list[Mapping[str, Any]] = list(desired.get("conditions") or [])
    for parent in desired.get("parents") or []:
        found.extend(parent.get("conditions") or [])
    return found


def _verdict(desired: Mapping[str, Any]) -> str | None:
    """'accepted' or 'rejected (<reason>: <message>)' from the Accepted and ResolvedRefs
    conditions, and Programmed when a node Envoy rejected the object (reason Rejected). A
    Programmed that waits for ACKs (Pending) is no verdict: every change passes through it."""
    conditions = _conditions(desired)
    bad = [
        c
        for c in conditions
        if c.get("status") == "False"
        and (
            c.get("type") in ("Accepted", "ResolvedRefs")
            or (c.get("type") == "Programmed" and c.get("reason") == "Rejected")
        )
    ]
    if bad:
        c = bad[0]
        return f"rejected ({c.get('type')}={c.get('reason')}: {c.get('message', '')})"
    if any(c.get("type") == "Accepted" and c.get("status") == "True" for c in conditions):
        return "accepted"
    return None


def _against_live(desired: Mapping[str, Any], live: Mapping[str, Any]) -> dict[str, Any]:
    """`desired` made ready to compare with, and patch over, the live status:

    - `parents[]`: the live entries of other controllers (another `controllerName`, a Gateway
      controller for a parentRef to its Gateway) are kept as they are. A merge patch replaces
      the whole list, and Gateway API lets each controller manage only its own entries; ours
      replaced theirs, and the two then overwrote each other forever. The live order is kept
      too: ours are updated where they stand (or dropped), new ones added at the end. Putting
      theirs in front reordered a list that another controller keeps with its own entries
      last (Istio does), and each then reordered it back, once a second, for good.
    - a condition whose status is the live one's keeps the live `lastTransitionTime` (it
      changes when the status does): the pipeline's times start with its process, so a
      restarted or newly elected control plane rewrote every object's status with new times
      though nothing had changed.
    """
    out = dict(desired)
    if "parents" in desired:
        live_parents = [p for p in _as_list(live.get("parents")) if isinstance(p, Mapping)]
        ours = [_keep_times(dict(p), _live_parent(live_parents, p)) for p in desired["parents"]]
        out["parents"] = _in_live_order(ours, live_parents)
    if "conditions" in desired:
        out["conditions"] = _conditions_keeping_times(
            desired["conditions"], _as_list(live.get("conditions"))
        )
    return out


def _hold_programmed(desired: Mapping[str, Any], live: Mapping[str, Any]) -> Mapping[str, Any]:
    """`desired` with each `Programmed` that waits for node Envoys (`Pending`, `NoNodes`) put
    back to the live one where that is True, or `Rejected`, for the same generation: while a
    control plane that just started settles (its node Envoys reconnecting, with the config
    they kept), the last leader's word stands. A rejection, or a generation the live status is
    not of, is written as it is."""
    out = dict(desired)
    if "conditions" in desired:
        out["conditions"] = _held(desired["conditions"], _as_list(live.get("conditions")))
    if "parents" in desired:
        live_parents = [p for p in _as_list(live.get("parents")) if isinstance(p, Mapping)]
        out["parents"] = [
            {
                **p,
                "conditions": _held(
                    p.get("conditions", []),
                    _as_list(_live_parent(live_parents, p).get("conditions")),
                ),
            }
            for p in desired["parents"]
        ]
    return out


def _held(desired: Any, live: list[Any]) -> list[Any]:
    seen = next((c for c in live if isinstance(c, Mapping) and c.get("type") == "Programmed"), None)
    out = []
    for c in desired:
        if (
            seen is not None
            and c.get("type") == "Programmed"
            and c.get("status") != "True"
            and c.get("reason") in ("Pending", "NoNodes")
            # True, or a rejection: the Envoy that rejected it keeps its last good config, and
            # rejects the route again once it is back (a Pending in between is two writes)
            and (seen.get("status") == "True" or seen.get("reason") == "Rejected")
            and seen.get("observedGeneration") == c.get("observedGeneration")
        ):
            c = dict(seen)
        out.append(c)
    return out


def _as_list(value: Any) -> list[Any]:
    return list(value) if isinstance(value, list | tuple) else []


def _in_live_order(ours: list[dict[str, Any]], live: list[Mapping[str, Any]]) -> list[Any]:
    """The live list with the other controllers' entries as they are, ours replaced by the
    entry of `ours` for the same parentRef (or dropped), and the rest of `ours` at the end."""
    pending = list(ours)
    out: list[Any] = []
    for p in live:
        if p.get("controllerName") != CONTROLLER_NAME:
            out.append(p)
            continue
        ref = _plain(p.get("parentRef"))
        for i, d in enumerate(pending):
            if _plain(d.get("parentRef")) == ref:
                out.append(pending.pop(i))
                break
    return out + pending


def _live_parent(live: list[Mapping[str, Any]], desired: Mapping[str, Any]) -> Mapping[str, Any]:
    for p in live:
        if p.get("controllerName") == CONTROLLER_NAME and _plain(p.get("parentRef")) == _plain(
            desired.get("parentRef")
        ):
            return p
    return {}


def _keep_times(desired: dict[str, Any], live: Mapping[str, Any]) -> dict[str, Any]:
    desired["conditions"] = _conditions_keeping_times(
        desired.get("conditions", []), _as_list(live.get("conditions"))
    )
    return desired


def _conditions_keeping_times(desired: Any, live: list[Any]) -> list[Any]:
    by_type = {c.get("type"): c for c in live if isinstance(c, Mapping)}
    out = []
    for c in desired:
        seen = by_type.get(c.get("type"))
        if (
            seen is not None
            and seen.get("status") == c.get("status")
            and seen.get("lastTransitionTime")
        ):
            c = {**c, "lastTransitionTime": seen["lastTransitionTime"]}
        out.append(c)
    return out


def _plain(value: Any) -> Any:
    if isinstance(value, Mapping):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_plain(v) for v in value]
    return value
