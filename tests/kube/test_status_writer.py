"""The status writer's rules, with a fake clock: leader only, skip when unchanged, and a global
rate limit whose throttled writes are retried on a later tick."""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

import pytest

from nodemesh.controlplane.kube._status import StatusWriter
from nodemesh.controlplane.store import ObjectKey

ACCEPTED = {"conditions": [{"type": "Accepted", "status": "True", "reason": "Accepted"}]}


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


class Leader:
    is_leader = True


def key(i: int) -> ObjectKey:
    return ObjectKey("HTTPRoute", "shop", f"r{i}")


def test_only_the_leader_fills_the_patch() -> None:
    leader = Leader()
    writer = StatusWriter(lambda k: ACCEPTED, leader)
    leader.is_leader = False
    patch: dict[str, Any] = {}
    assert not writer.reconcile(key(0), {}, patch) and patch == {}
    leader.is_leader = True
    assert writer.reconcile(key(0), {}, patch) and patch == ACCEPTED


def test_unchanged_status_is_skipped() -> None:
    writer = StatusWriter(lambda k: ACCEPTED, Leader())
    patch: dict[str, Any] = {}
    assert not writer.reconcile(key(0), ACCEPTED, patch)
    assert patch == {} and writer.writes == 0


def test_writes_are_rate_limited_and_retried_later() -> None:
    clock = Clock()
    writer = StatusWriter(lambda k: ACCEPTED, Leader(), rate=5.0, clock=clock)
    done = {i for i in range(20) if writer.reconcile(key(i), {}, {})}
    assert len(done) == 5  # the burst
    clock.now = 1.0  # one second later: five more tokens
    done |= {i for i in range(20) if i not in done and writer.reconcile(key(i), {}, {})}
    assert len(done) == 10 and writer.throttled == 15 + 10


class Observable:
    """A status source that reports changes, like the pipeline's `kubernetes_status`."""

    def __init__(self) -> None:
        self.status: dict[ObjectKey, dict[str, Any]] = {}
        self.callbacks: list[Callable[[ObjectKey], None]] = []

    def __call__(self, k: ObjectKey) -> dict[str, Any] | None:
        return self.status.get(k)

    def subscribe(self, callback: Callable[[ObjectKey], None]) -> Callable[[], None]:
        self.callbacks.append(callback)
        return lambda: self.callbacks.remove(callback)

    def set(self, k: ObjectKey, status: dict[str, Any]) -> None:
        self.status[k] = status
        for callback in list(self.callbacks):
            callback(k)


def test_every_verdict_change_is_logged_even_between_ticks(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """No timer tick happens here at all: the verdicts come from the source's reports."""
    source = Observable()
    writer = StatusWriter(source, Leader())
    writer.start()
    rejected = {
        "conditions": [
            {"type": "ResolvedRefs", "status": "False", "reason": "BackendNotFound", "message": "x"}
        ]
    }

    def programmed(reason: str) -> dict[str, Any]:
        cond = {"type": "Programmed", "status": "False", "reason": reason, "message": "y"}
        return {"conditions": [*ACCEPTED["conditions"], cond]}

    with caplog.at_level(logging.INFO, logger="nodemesh.controlplane.kube"):
        source.set(key(0), ACCEPTED)
        source.set(key(0), ACCEPTED)  # unchanged: not logged again
        source.set(key(0), rejected)
        source.set(key(0), ACCEPTED)
        # waiting for ACKs, as every change does: no verdict of its own
        source.set(key(0), programmed("Pending"))
        source.set(key(0), programmed("Rejected"))  # a node Envoy's NACK
        writer.stop()
        source.set(key(0), rejected)  # after stop: not watched any more
    lines = [r.getMessage() for r in caplog.records]
    assert lines == [
        f"accepted {key(0)}",
        f"rejected (ResolvedRefs=BackendNotFound: x) {key(0)}",
        f"accepted {key(0)}",
        f"rejected (Programmed=Rejected: y) {key(0)}",
    ]
    assert source.callbacks == [] and writer.writes == 0


def _parent(controller: str, name: str, status: str, when: str) -> dict[str, Any]:
    return {
        "parentRef": {"group": "", "kind": "Service", "namespace": "shop", "name": name},
        "controllerName": controller,
        "conditions": [
            {"type": "Accepted", "status": status, "reason": "Accepted", "lastTransitionTime": when}
        ],
    }


def test_another_controllers_parents_are_kept() -> None:
    """A route with a Gateway parentRef (another controller's) and a Service one (ours): a
    merge patch replaces the whole list, so ours once wiped theirs on every tick. Theirs stays,
    and once it is in, nothing is written again."""
    gateway = {
        "parentRef": {"group": "gateway.networking.k8s.io", "kind": "Gateway", "name": "public"},
        "controllerName": "example.com/gateway",
        "conditions": [{"type": "Accepted", "status": "True", "reason": "Accepted"}],
    }
    ours = _parent("nodemesh.io/mesh", "web", "True", "2026-11-22T09:00:00Z")
    writer = StatusWriter(lambda k: {"parents": [ours]}, Leader())
    patch: dict[str, Any] = {}
    assert writer.reconcile(key(0), {"parents": [gateway]}, patch)
    assert patch == {"parents": [gateway, ours]}
    again: dict[str, Any] = {}
    assert not writer.reconcile(key(0), patch, again) and again == {}
    # a route only another controller's: nothing to write over its status
    only = StatusWriter(lambda k: {"parents": []}, Leader())
    assert not only.reconcile(key(1), {"parents": [gateway]}, again) and again == {}


def test_a_restarted_control_plane_keeps_the_transition_times() -> None:
    """A new process (a restart, a new leader) starts its transition times at its start; a
    condition whose status did not change keeps the live time, so nothing is rewritten."""
    live = {"parents": [_parent("nodemesh.io/mesh", "web", "True", "2026-11-22T08:00:00Z")]}
    desired = {"parents": [_parent("nodemesh.io/mesh", "web", "True", "2026-11-22T09:30:00Z")]}
    writer = StatusWriter(lambda k: desired, Leader())
    patch: dict[str, Any] = {}
    assert not writer.reconcile(key(0), live, patch) and patch == {}
    changed = {"parents": [_parent("nodemesh.io/mesh", "web", "False", "2026-11-22T09:31:00Z")]}
    writer = StatusWriter(lambda k: changed, Leader())
    assert writer.reconcile(key(0), live, patch)
    (parent,) = patch["parents"]
    assert parent["conditions"][0]["lastTransitionTime"] == "2026-11-22T09:31:00Z"
    policy_live = {"conditions": [{"type": "Accepted", "status": "True", "reason": "Accepted",
                                   "lastTransitionTime": "2026-11-22T08:00:00Z"}]}  # fmt: skip
    policy = StatusWriter(
        lambda k: {"conditions": [{**policy_live["conditions"][0], "lastTransitionTime": "now"}]},
        Leader(),
    )
    assert not policy.reconcile(ObjectKey("TrafficPolicy", "shop", "p"), policy_live, {})
