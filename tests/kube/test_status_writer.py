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
    with caplog.at_level(logging.INFO, logger="nodemesh.controlplane.kube"):
        source.set(key(0), ACCEPTED)
        source.set(key(0), ACCEPTED)  # unchanged: not logged again
        source.set(key(0), rejected)
        source.set(key(0), ACCEPTED)
        writer.stop()
        source.set(key(0), rejected)  # after stop: not watched any more
    lines = [r.getMessage() for r in caplog.records]
    assert lines == [
        f"accepted {key(0)}",
        f"rejected (ResolvedRefs=BackendNotFound: x) {key(0)}",
        f"accepted {key(0)}",
    ]
    assert source.callbacks == [] and writer.writes == 0
