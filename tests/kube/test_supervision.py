"""The operator's own tasks beside kopf (the feed, the status writer, the Lease elector, the
API server check) outlive their own failures: a task that fails (a bug, an answer nobody
foresaw) is said, with its traceback, shown in /status while it fails, and started again."""

from __future__ import annotations

import logging
from typing import Any

import pytest

from nodemesh.controlplane.store import ObjectKey, Store
from tests.kube.conftest import Kube, eventually
from tests.kube.test_outage import FAST

ACCEPTED = {"conditions": [{"type": "Accepted", "status": "True", "reason": "Accepted"}]}
LEASE = ("Lease", "nodemesh", "nodemesh-controlplane")


def policy(name: str) -> dict[str, Any]:
    return {
        "apiVersion": "nodemesh.io/v1alpha1",
        "kind": "TrafficPolicy",
        "metadata": {"name": name, "namespace": "shop"},
        "spec": {"targetRefs": [{"group": "", "kind": "Service", "name": "web"}]},
    }


async def _accepted(kube: Kube, name: str) -> bool:
    obj = await kube.get("TrafficPolicy", "shop", name) or {}
    return bool((obj.get("status") or {}).get("conditions"))


async def test_a_failed_task_is_said_shown_and_started_again(
    kube: Kube, start_operator: Any, caplog: pytest.LogCaptureFixture
) -> None:
    """The Lease elector fails on a Lease whose duration is no number (an answer it did not
    foresee: anything but a failed request ended its task). Before, the task ended without a
    word: the replica never led again, and no status was written, while /status, /readyz and
    the log said nothing; the error came out of the operator at its stop, skipping the Lease's
    release. Now an ERROR with the traceback, an entry in /status while it fails, and the task
    is started again, doubling its delay: once the Lease is whole again it leads and writes."""
    caplog.set_level(logging.INFO, logger="nodemesh.controlplane.kube")
    kind, namespace, name = LEASE
    await kube.create({
        "apiVersion": "coordination.k8s.io/v1", "kind": kind,
        "metadata": {"name": name, "namespace": namespace},
        "spec": {"holderIdentity": "someone", "leaseDurationSeconds": "fifteen"},
    })  # fmt: skip
    store, errors = Store(), []
    handle = await start_operator(
        store, lambda key: ACCEPTED, token="supervised", report=errors.append, **FAST
    )
    await kube.create(policy("p"))
    await eventually(
        lambda: store.get(ObjectKey("TrafficPolicy", "shop", "p")), "the policy in the store"
    )

    def said() -> list[logging.LogRecord]:
        return [r for r in caplog.records if "the Lease elector failed" in r.getMessage()]

    await eventually(said, "the elector's failure said")
    first = said()[0]
    assert first.levelno == logging.ERROR and first.exc_info is not None, first
    assert "fifteen" in first.getMessage(), first.getMessage()
    await eventually(lambda: len(said()) >= 3, "the elector started again, and failing again")
    assert [r.exc_info is not None for r in said()[:3]] == [True, False, False], "traceback once"
    shown = errors[-1]
    assert list(shown) == ["lease-elector"], shown
    assert "fifteen" in shown["lease-elector"], shown
    assert not await _accepted(kube, "p")

    await kube.delete(kind, namespace, name)  # whole again (the next try creates it)
    await eventually(lambda: handle.operator.is_leader, "the replica leads")
    await eventually(lambda: _accepted(kube, "p"), "the policy's status written")
    await eventually(lambda: errors[-1] == {}, "the failure off /status")
    assert any("the Lease elector runs again" in r.getMessage() for r in caplog.records)
    await handle.stop()
    assert handle.task.exception() is None
    lease = await kube.get(kind, namespace, name)
    assert lease is not None and not lease["spec"].get("holderIdentity"), "not released"


async def test_a_replica_whose_elector_failed_does_not_release_a_lease_taken_since(
    kube: Kube, start_operator: Any, caplog: pytest.LogCaptureFixture
) -> None:
    """Replica a leads; its elector fails (the Lease's duration is no number) and waits to be
    started again; meanwhile replica b takes the Lease. a, stopped then, released the Lease
    all the same: its failed elector still took it for its own, and the release was written
    with no precondition, clearing b's hold (b took it back as a new leader at its next try;
    any other replica could have taken it first). Now the release carries the resourceVersion
    of a's last write, and a Lease written by another since is left alone."""
    caplog.set_level(logging.INFO, logger="nodemesh.controlplane.kube")
    kind, namespace, name = LEASE
    slow = dict(restart_delay=30.0, max_restart_delay=30.0)  # a's elector stays down
    a = await start_operator(Store(), lambda key: ACCEPTED, token="a", **slow)
    await eventually(lambda: a.operator.is_leader, "a leads")
    b = await start_operator(Store(), lambda key: ACCEPTED, token="b", **FAST)
    await kube.patch(kind, namespace, name, {"spec": {"leaseDurationSeconds": "fifteen"}})

    def failed() -> bool:
        return any("the Lease elector failed" in r.getMessage() for r in caplog.records)

    await eventually(lambda: failed() and not a.operator.is_leader, "a's elector failed")
    await kube.delete(kind, namespace, name)  # whole again: b, started again soon, creates it
    await eventually(lambda: b.operator.is_leader, "b leads")
    taken = await kube.get(kind, namespace, name)
    assert taken is not None and taken["spec"]["holderIdentity"] == "b", taken

    await a.stop()
    assert a.task.exception() is None
    renewed = taken["spec"]["renewTime"]

    async def renewed_by_b() -> dict[str, Any] | None:
        lease = await kube.get(kind, namespace, name) or {}
        spec = lease.get("spec") or {}
        return spec if spec.get("renewTime") not in (None, renewed) else None

    spec = await eventually(renewed_by_b, "b renews")
    assert spec["holderIdentity"] == "b", spec
    assert spec["leaseTransitions"] == taken["spec"]["leaseTransitions"], "b's hold cleared"
    assert spec["acquireTime"] == taken["spec"]["acquireTime"], "b's hold cleared"
    assert b.operator.elector is not None and b.operator.elector.transitions == 1
