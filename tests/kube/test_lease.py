"""Leader election on a Lease in the emulator: one leader at a time, takeover on release and
on expiry, and a leader that cannot renew stops acting as one."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import re
from collections.abc import AsyncIterator
from typing import Any

import pytest

from nodemesh.controlplane.kube._lease import LeaseElector
from nodemesh.controlplane.store import Store
from tests.kube.conftest import ApiFront, Kube, eventually

Running = list[tuple[LeaseElector, "asyncio.Task[None]"]]


@pytest.fixture
async def electors(kube: Kube) -> AsyncIterator[Running]:
    running: Running = []
    yield running
    for _, task in running:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task


def start(kube: Kube, running: Running, identity: str) -> tuple[LeaseElector, asyncio.Task[None]]:
    e = LeaseElector(
        kube.connection(identity), "nodemesh", "nodemesh-controlplane", identity,
        lease_duration=1.0, renew_deadline=0.6, retry_period=0.1,
    )  # fmt: skip
    pair = (e, asyncio.create_task(e.run()))
    running.append(pair)
    return pair


async def holder(kube: Kube) -> str | None:
    lease = await kube.get("Lease", "nodemesh", "nodemesh-controlplane")
    value = ((lease or {}).get("spec") or {}).get("holderIdentity")
    return str(value) if value else None


async def test_one_leader_then_takeover_on_release(kube: Kube, electors: Running) -> None:
    a, _ = start(kube, electors, "a")
    await eventually(lambda: a.is_leader, "a leads")
    b, _ = start(kube, electors, "b")
    for _ in range(3):  # b keeps observing a renewing: it never leads meanwhile
        await eventually(lambda: b.is_leader is False and b.transitions == 0, "b follows")
    assert await holder(kube) == "a"
    await a.release()
    await eventually(lambda: b.is_leader, "b takes over after the release")
    assert await holder(kube) == "b"


async def test_takeover_after_a_leader_stops_renewing(kube: Kube, electors: Running) -> None:
    a, a_task = start(kube, electors, "a")
    await eventually(lambda: a.is_leader, "a leads")
    b, _ = start(kube, electors, "b")
    a_task.cancel()  # a crashes: no release
    with contextlib.suppress(asyncio.CancelledError):
        await a_task
    await eventually(lambda: not a.is_leader, "a stops acting as leader past its renew deadline")
    await eventually(lambda: b.is_leader, "b takes over once the lease expired", 10)
    assert await holder(kube) == "b"


async def test_an_api_server_outage_is_one_warning_not_one_per_retry(
    kube: Kube, api_front: ApiFront, electors: Running, caplog: pytest.LogCaptureFixture
) -> None:
    """Every failed renewal was a WARNING: during an outage, one every retry period (2 s), 300
    lines in ten minutes that buried the operator's own line about the outage."""
    e = LeaseElector(
        kube.connection("a", server=api_front.server), "nodemesh", "nodemesh-controlplane", "a",
        lease_duration=1.0, renew_deadline=0.6, retry_period=0.1,
    )  # fmt: skip
    electors.append((e, asyncio.create_task(e.run())))
    await eventually(lambda: e.is_leader, "a leads")
    caplog.set_level(logging.INFO, logger="nodemesh.controlplane.kube")
    await api_front.refuse()
    await eventually(lambda: not e.is_leader, "a stops acting as leader")
    await asyncio.sleep(1.0)  # ten retries
    await api_front.restore()
    await eventually(lambda: e.is_leader, "a leads again")
    warnings = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert len(warnings) == 1, warnings
    assert warnings[0].startswith("lease nodemesh/nodemesh-controlplane: GET "), warnings
    assert warnings[0].endswith("(said once until a try succeeds)"), warnings
    again = [r.getMessage() for r in caplog.records if "answers again" in r.getMessage()]
    assert len(again) == 1 and re.fullmatch(
        r"lease nodemesh/nodemesh-controlplane: the API server answers again, after \d+ "
        r"failed tries",
        again[0],
    ), again


async def test_a_lease_that_cannot_be_taken_is_an_error_and_a_problem_in_status(
    kube: Kube, electors: Running, caplog: pytest.LogCaptureFixture
) -> None:
    """A --lease-namespace with a typo (404), or a --lease-name the Role does not grant
    (403): no replica ever leads, so none writes status. That was one WARNING, and nothing
    in /status. It is now an ERROR that says what to check, and, once it has lasted a lease
    duration, a problem the operator reports (/status `source_errors`), until a try works."""
    caplog.set_level(logging.INFO, logger="nodemesh.controlplane.kube")
    base = "/apis/coordination.k8s.io/v1/namespaces/nodemesh-sytem/leases"
    kube.emulator.unserved.update({base, f"{base}/nodemesh-controlplane"})
    problems: list[str | None] = []
    e = LeaseElector(
        kube.connection("a"), "nodemesh-sytem", "nodemesh-controlplane", "a",
        lease_duration=1.0, renew_deadline=0.6, retry_period=0.1, on_problem=problems.append,
    )  # fmt: skip
    electors.append((e, asyncio.create_task(e.run())))
    await eventually(lambda: problems, "the problem reported")
    why = problems[0]
    assert why is not None and why.startswith(
        "cannot take or renew Lease nodemesh-sytem/nodemesh-controlplane since "
    ), why
    assert "HTTP 404" in why and why.endswith("this replica does not lead, so it writes no status")
    errors = [r.getMessage() for r in caplog.records if r.levelname == "ERROR"]
    assert len(errors) == 1 and errors[0].endswith(
        "check --lease-namespace, --lease-name and the Role"
    ), errors
    assert not e.is_leader
    kube.emulator.unserved.clear()
    await eventually(lambda: e.is_leader, "it leads once the Lease can be made")
    await eventually(lambda: problems[-1] is None, "the problem cleared")


async def test_the_operator_reports_a_lease_it_cannot_take(kube: Kube, start_operator: Any) -> None:
    """The same through the operator: its report (what /status shows as `source_errors` for
    source "kubernetes") names the Lease while it cannot be taken."""
    base = "/apis/coordination.k8s.io/v1/namespaces/nodemesh-sytem/leases"
    kube.emulator.unserved.update({base, f"{base}/nodemesh-controlplane"})
    reports: list[dict[str, str]] = []
    await start_operator(
        Store(), report=reports.append, lease_namespace="nodemesh-sytem",
        lease_duration=1.0, renew_deadline=0.6, retry_period=0.1,
    )  # fmt: skip
    await eventually(lambda: reports and "lease" in reports[-1], "the Lease reported")
    assert "HTTP 404" in reports[-1]["lease"]
    kube.emulator.unserved.clear()
    await eventually(lambda: "lease" not in reports[-1], "the report cleared")
