"""The status writer's rules, with a fake clock: leader only, skip when unchanged, and a global
rate limit whose throttled writes are retried on a later tick."""

from __future__ import annotations

from typing import Any

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
