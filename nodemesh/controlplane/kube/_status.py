"""`StatusWriter`: decides, per object and per timer tick, what status patch kopf should apply.

The pipeline owns the conditions; this module compares them with the object's live status and
fills kopf's `patch.status` only when the leader sees a difference, at most `rate` writes per
second across all objects. Every replica logs each accept/reject transition when the source
reports it (not when a tick happens to see it); only the leader writes.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Mapping, MutableMapping
from typing import Any, Protocol, runtime_checkable

from nodemesh.controlplane.conditions import CONTROLLER_NAME
from nodemesh.controlplane.store import ObjectKey

__all__ = [
    "Leadership",
    "ObservableStatusSource",
    "StatusSource",
    "StatusWriter",
    "always_leader",
]

log = logging.getLogger("nodemesh.controlplane.kube")


class StatusSource(Protocol):
    """Where the desired status of an object comes from (the pipeline).

    Returns the top-level status fields to hold (e.g. `{"conditions": [...]}` or, for Gateway API
    routes, `{"parents": [...]}`), or None while the object has not been built yet.
    The returned mapping must not be altered.
    """

    def __call__(self, key: ObjectKey) -> Mapping[str, Any] | None: ...


@runtime_checkable
class ObservableStatusSource(StatusSource, Protocol):
    """A `StatusSource` that also tells when an object's desired status may have changed (the
    pipeline's `kubernetes_status`). `subscribe` returns the unsubscribe function; callbacks
    come on the event loop.

    The writer logs verdicts from these calls: its timer ticks only sample the status, and a
    verdict that lasts less than a tick (a route accepted, then changed 50 ms later) would
    never be logged.
    """

    def subscribe(self, callback: Callable[[ObjectKey], None]) -> Callable[[], None]: ...


class Leadership(Protocol):
    @property
    def is_leader(self) -> bool: ...


class _Always:
    is_leader = True


always_leader: Leadership = _Always()


class StatusWriter:
    """Compares desired and live status; fills kopf's patch when they differ (leader only)."""

    def __init__(
        self,
        source: StatusSource,
        leadership: Leadership = always_leader,
        *,
        rate: float = 50.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._source = source
        self._leadership = leadership
        self._rate = rate
        self._burst = max(1.0, rate)
        self._tokens = self._burst
        self._clock = clock
        self._last = clock()
        self._verdicts: dict[ObjectKey, str] = {}
        self._unsubscribe: Callable[[], None] | None = None
        self.checks = 0  # reconcile calls (timer ticks with a built object)
        self.writes = 0
        self.throttled = 0

    def reconcile(
        self,
        key: ObjectKey,
        live_status: Mapping[str, Any],
        patch_status: MutableMapping[str, Any],
    ) -> bool:
        """Fill `patch_status` (kopf's `patch.status`) if needed. Returns True if it did."""
        desired = self._source(key)
        if desired is None:
            return False
        self.checks += 1
        self._log_verdict(key, desired)
        return self._write(key, desired, live_status, patch_status)

    def release(
        self,
        key: ObjectKey,
        live_status: Mapping[str, Any],
        patch_status: MutableMapping[str, Any],
    ) -> bool:
        """`key`, a route, has no parentRef of ours any more: fill `patch_status` to remove the
        `parents[]` entries we wrote, keeping the other controllers' (leader only). Returns
        True if it did."""
        self.forget(key)
        return self._write(key, {"parents": []}, live_status, patch_status)

    def _write(
        self,
        key: ObjectKey,
        desired: Mapping[str, Any],
        live_status: Mapping[str, Any],
        patch_status: MutableMapping[str, Any],
    ) -> bool:
        if not self._leadership.is_leader:
            return False
        desired = _against_live(desired, live_status)
        changed = {k: v for k, v in desired.items() if _plain(live_status.get(k)) != _plain(v)}
        if not changed:
            return False
        if not self._take_token():
            self.throttled += 1
            return False  # the next timer tick retries
        for field, value in changed.items():
            patch_status[field] = _plain(value)
        self.writes += 1
        log.debug("status of %s: writing %s", key, sorted(changed))
        return True

    def start(self) -> None:
        """Log every verdict change as it happens, if the source can be watched."""
        if isinstance(self._source, ObservableStatusSource) and self._unsubscribe is None:
            self._unsubscribe = self._source.subscribe(self.observe)

    def stop(self) -> None:
        if self._unsubscribe is not None:
            self._unsubscribe()
            self._unsubscribe = None

    def observe(self, key: ObjectKey) -> None:
        """`key`'s desired status may have changed: log its verdict if that changed."""
        desired = self._source(key)
        if desired is None:
            self.forget(key)
        else:
            self._log_verdict(key, desired)

    def forget(self, key: ObjectKey) -> None:
        self._verdicts.pop(key, None)

    def _take_token(self) -> bool:
        now = self._clock()
        self._tokens = min(self._burst, self._tokens + (now - self._last) * self._rate)
        self._last = now
        if self._tokens < 1.0:
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
      controller for a parentRef to its Gateway) are kept, in front, as they are. A merge
      patch replaces the whole list, and Gateway API lets each controller manage only its own
      entries; ours replaced theirs, and the two then overwrote each other forever.
    - a condition whose status is the live one's keeps the live `lastTransitionTime` (it
      changes when the status does): the pipeline's times start with its process, so a
      restarted or newly elected control plane rewrote every object's status with new times
      though nothing had changed.
    """
    out = dict(desired)
    if "parents" in desired:
        live_parents = [p for p in _as_list(live.get("parents")) if isinstance(p, Mapping)]
        ours = [_keep_times(dict(p), _live_parent(live_parents, p)) for p in desired["parents"]]
        theirs = [p for p in live_parents if p.get("controllerName") != CONTROLLER_NAME]
        out["parents"] = theirs + ours
    if "conditions" in desired:
        out["conditions"] = _conditions_keeping_times(
            desired["conditions"], _as_list(live.get("conditions"))
        )
    return out


def _as_list(value: Any) -> list[Any]:
    return list(value) if isinstance(value, list | tuple) else []


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
