"""Leader election on a Lease in the emulator: one leader at a time, takeover on release and
on expiry, and a leader that cannot renew stops acting as one."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import re
from collections.abc import AsyncIterator

import pytest

from nodemesh.controlplane.kube._lease import LeaseElector
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
