"""The status writer's rules: leader only, skip when unchanged, a global rate limit, retries,
the other controllers' entries and the transition times kept. The writer runs its real loop;
`send` records the patches instead of an API server (tests/kube/test_e2e.py has the server),
except in the last test, an operator and a pipeline against the emulator."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable, Mapping
from typing import Any

import pytest

from nodemesh.controlplane.kube._status import StatusWriter, status_patch
from nodemesh.controlplane.pipeline import Pipeline
from nodemesh.controlplane.store import ObjectKey, Store
from nodemesh.xds.cache import SnapshotCache
from tests.kube.conftest import Kube, eventually
from tests.kube.test_e2e import policy
from tests.kube.test_feed import service

ACCEPTED = {"conditions": [{"type": "Accepted", "status": "True", "reason": "Accepted"}]}


class Leader:
    is_leader = True


def key(i: int) -> ObjectKey:
    return ObjectKey("TrafficPolicy", "shop", f"p{i}")


class Api:
    """Live objects by key, and the patches `send` got; answers `code` (then 200)."""

    def __init__(self) -> None:
        self.objects: dict[ObjectKey, dict[str, Any]] = {}
        self.sent: list[tuple[ObjectKey, Mapping[str, Any]]] = []
        self.codes: list[int] = []

    def lookup(self, k: ObjectKey) -> Mapping[str, Any] | None:
        return self.objects.get(k)

    async def send(self, k: ObjectKey, body: Mapping[str, Any]) -> int:
        self.sent.append((k, body))
        code = self.codes.pop(0) if self.codes else 200
        if code == 200:
            self.objects[k] = {**self.objects[k], "status": {**body["status"]}}
        return code


async def running(writer: StatusWriter, api: Api) -> asyncio.Task[None]:
    return asyncio.create_task(writer.run(api.lookup, api.send))


async def stop(task: asyncio.Task[None]) -> None:
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task


async def test_only_the_leader_writes() -> None:
    leader = Leader()
    leader.is_leader = False
    api = Api()
    api.objects[key(0)] = {"metadata": {"resourceVersion": "7"}}
    writer = StatusWriter(lambda k: ACCEPTED, leader, interval=0.01)
    task = await running(writer, api)
    writer.touch(key(0))
    await asyncio.sleep(0.05)  # (nothing to wait for: a follower writes nothing)
    assert api.sent == []
    leader.is_leader = True  # the key touched before is checked once this replica leads
    await eventually(lambda: api.sent, "a write by the new leader")
    # the version read is a precondition: a newer object is not overwritten
    assert api.sent == [(key(0), {"status": ACCEPTED, "metadata": {"resourceVersion": "7"}})]
    await stop(task)


async def test_unchanged_status_is_skipped() -> None:
    api = Api()
    api.objects[key(0)] = {"status": ACCEPTED}
    writer = StatusWriter(lambda k: ACCEPTED, Leader())
    task = await running(writer, api)
    writer.touch(key(0))
    await eventually(lambda: writer.checks == 1, "a check")
    assert api.sent == [] and writer.writes == 0
    await stop(task)


async def test_writes_are_rate_limited() -> None:
    api = Api()
    for i in range(30):
        api.objects[key(i)] = {}
    writer = StatusWriter(lambda k: ACCEPTED, Leader(), rate=20.0)
    task = await running(writer, api)
    loop = asyncio.get_running_loop()
    start = loop.time()
    for i in range(30):
        writer.touch(key(i))
    await eventually(lambda: len(api.sent) == 30, "every object written")
    # a burst of 20, then 20 per second: the last ten take about half a second
    assert loop.time() - start >= 0.4
    await stop(task)


async def test_a_failed_write_is_tried_again_and_a_conflict_rereads() -> None:
    api = Api()
    api.objects[key(0)] = {"metadata": {"resourceVersion": "1"}}
    api.codes = [503, 409]
    writer = StatusWriter(lambda k: ACCEPTED, Leader(), interval=0.05)
    task = await running(writer, api)
    writer.touch(key(0))
    await eventually(lambda: api.sent and api.sent[-1][0] == key(0) and writer.writes, "written")
    assert len(api.sent) == 3 and writer.failed == 1
    assert api.objects[key(0)]["status"] == ACCEPTED
    await stop(task)


@pytest.mark.parametrize("code", [403, 409])
async def test_a_refused_write_is_not_sent_again_at_once_with_no_interval(code: int) -> None:
    """`--status-interval 0` (write as soon as the status changes) and an API server that
    refuses the write (403), or says the object changed since the writer's copy (409, its
    watch lagging): the retries wait at least a second (403: doubling). They were sent again
    at the full status rate (409: 148 times in 2 s), for good or until the watch caught up."""
    api = Api()
    api.objects[key(0)] = {"metadata": {"resourceVersion": "1"}}
    api.codes = [code] * 1000
    writer = StatusWriter(lambda k: ACCEPTED, Leader(), interval=0.0)
    task = await running(writer, api)
    writer.touch(key(0))
    await eventually(lambda: api.sent, "a first write")
    await asyncio.sleep(1.5)  # (a window to count in: the first retry is due after 1 s)
    assert len(api.sent) == 2
    assert writer.failed == (2 if code == 403 else 0)  # a conflict is no failure
    await stop(task)


async def test_a_404_for_an_object_that_is_still_there_is_tried_again() -> None:
    """A 404 the API server gives for a moment (a CRD being upgraded): the status was dropped
    until the object's next watch event. One for an object that is gone is not sent again."""
    api = Api()
    api.objects[key(0)] = {"metadata": {"resourceVersion": "1"}}
    api.objects[key(1)] = {"metadata": {"resourceVersion": "1"}}
    api.codes = [404]
    writer = StatusWriter(lambda k: ACCEPTED, Leader(), interval=0.05)
    task = await running(writer, api)
    writer.touch(key(0))
    await eventually(lambda: writer.writes == 1, "the write after the 404")
    assert [k for k, _ in api.sent] == [key(0), key(0)]
    api.codes = [404]
    writer.touch(key(1))
    await eventually(lambda: len(api.sent) == 3, "the write that gets a 404")
    del api.objects[key(1)]  # it was deleted: the index no longer holds it
    await asyncio.sleep(1.5)  # (a window to count in: a retry would be due after 1 s)
    assert len(api.sent) == 3
    await stop(task)


async def test_writes_refused_alike_are_one_warning(caplog: pytest.LogCaptureFixture) -> None:
    """A Role without `patch` on the status refuses every object's write: one WARNING for the
    cause, and one INFO once writes succeed again. It was a WARNING per object (2,000 lines
    at 2,000 objects) and an INFO per object after."""
    api = Api()
    for i in range(20):
        api.objects[key(i)] = {}
    api.codes = [403] * 20
    writer = StatusWriter(lambda k: ACCEPTED, Leader(), interval=0.01)
    with caplog.at_level(logging.DEBUG, logger="nodemesh.controlplane.kube"):
        task = await running(writer, api)
        for i in range(20):
            writer.touch(key(i))
        await eventually(lambda: writer.writes == 20, "every object written after the refusals")
        await stop(task)
    said = [(r.levelname, r.getMessage()) for r in caplog.records if r.levelno >= logging.INFO]
    assert [level for level, _ in said] == ["WARNING", "INFO"], said
    assert said[0][1].endswith("not written (HTTP 403); trying again"), said
    assert said[1][1] == "status writes succeed again (HTTP 403)", said


def test_a_route_without_a_service_parent_loses_only_our_entries() -> None:
    ours = _parent("nodemesh.io/mesh", "web", "True", "2026-11-22T09:00:00Z")
    gateway = {**ours, "controllerName": "example.com/gateway"}
    assert status_patch({"parents": []}, {"parents": [gateway, ours]}) == {"parents": [gateway]}
    assert status_patch({"parents": []}, {"parents": [gateway]}) == {}


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


def test_every_verdict_change_is_logged_even_between_checks(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """No check happens here at all (the writer does not run): the verdicts come from the
    source's reports."""
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
    patch = status_patch({"parents": [ours]}, {"parents": [gateway]})
    assert patch == {"parents": [gateway, ours]}
    assert status_patch({"parents": [ours]}, patch) == {}


def test_a_restarted_control_plane_keeps_the_transition_times() -> None:
    """A new process (a restart, a new leader) starts its transition times at its start; a
    condition whose status did not change keeps the live time, so nothing is rewritten."""
    live = {"parents": [_parent("nodemesh.io/mesh", "web", "True", "2026-11-22T08:00:00Z")]}
    desired = {"parents": [_parent("nodemesh.io/mesh", "web", "True", "2026-11-22T09:30:00Z")]}
    assert status_patch(desired, live) == {}
    changed = {"parents": [_parent("nodemesh.io/mesh", "web", "False", "2026-11-22T09:31:00Z")]}
    (parent,) = status_patch(changed, live)["parents"]
    assert parent["conditions"][0]["lastTransitionTime"] == "2026-11-22T09:31:00Z"
    policy_live = {"conditions": [{"type": "Accepted", "status": "True", "reason": "Accepted",
                                   "lastTransitionTime": "2026-11-22T08:00:00Z"}]}  # fmt: skip
    now = {"conditions": [{**policy_live["conditions"][0], "lastTransitionTime": "now"}]}
    assert status_patch(now, policy_live) == {}


async def test_a_pass_over_many_objects_lets_the_event_loop_run() -> None:
    """A new leader compares every object (50-60 us each): the ADS streams and the feed, on
    the same loop, must run in between. Before, 2,000 objects held the loop for 114 ms."""
    api = Api()
    for i in range(2000):
        api.objects[key(i)] = {"status": ACCEPTED}
    writer = StatusWriter(lambda k: ACCEPTED, Leader())
    seen: list[int] = []  # the writer's count of checks at each turn of another task

    async def ticker() -> None:
        while True:
            seen.append(writer.checks)
            await asyncio.sleep(0)

    for i in range(2000):
        writer.touch(key(i))
    other = asyncio.create_task(ticker())
    task = await running(writer, api)
    await eventually(lambda: writer.checks == 2000, "every object compared")
    await stop(task)
    other.cancel()
    most = max(b - a for a, b in zip(seen, seen[1:], strict=False))
    assert most <= 100, f"{most} objects compared without letting another task run"


def test_a_write_rate_of_zero_is_refused() -> None:
    with pytest.raises(ValueError, match="rate"):
        StatusWriter(lambda k: ACCEPTED, Leader(), rate=0)


class BuiltFrom:
    """A status source that tells which object it built (`built_from`), but not when it builds
    (no `subscribe_built`)."""

    def __init__(self, uid: str) -> None:
        self.uid = uid

    def __call__(self, k: ObjectKey) -> dict[str, Any]:
        return ACCEPTED

    def built_from(self, k: ObjectKey) -> dict[str, Any]:
        return {"metadata": {"uid": self.uid}}


async def test_an_object_waiting_for_its_build_is_looked_at_less_and_less_often() -> None:
    """A source that does not tell when it builds: the object created again under its name is
    looked at again after 50 ms, doubling (to 5 s); it was every 50 ms for good (32 looks in
    1.6 s)."""
    api = Api()
    api.objects[key(0)] = {"metadata": {"uid": "new", "resourceVersion": "1"}}
    source = BuiltFrom("deleted")
    writer = StatusWriter(source, Leader(), interval=0.01)
    task = await running(writer, api)
    writer.touch(key(0))
    await eventually(lambda: writer.checks, "a first look")
    await asyncio.sleep(1.6)  # (a window to count in: looks at 0.05, 0.15, 0.35, 0.75, 1.55 s)
    assert writer.checks <= 7 and api.sent == [], writer.checks
    source.uid = "new"  # built at last
    await eventually(lambda: api.sent, "the new object's status", deadline=5.0)
    await stop(task)


async def _resolved_refs(kube: Kube, name: str) -> tuple[str, str | None]:
    """The live policy's uid and its ResolvedRefs status."""
    obj = await kube.get("TrafficPolicy", "shop", name) or {}
    conditions = (obj.get("status") or {}).get("conditions") or []
    found = {c["type"]: c["status"] for c in conditions}.get("ResolvedRefs")
    return obj.get("metadata", {}).get("uid", ""), found


async def test_a_re_created_object_waits_for_its_build_without_polling(
    kube: Kube, start_operator: Any
) -> None:
    """`kubectl replace --force` of a TrafficPolicy, and a pipeline that does not build the new
    object (its build fails, or it does not rebuild: stopped here). The writer waits for the
    new object's build; it looked every 50 ms for as long as that lasted (about 40 looks in
    2 s, each a lookup and a compare, per such object). Once the pipeline builds it, its status
    is written at once: the build gives the same conditions, so the pipeline reports no
    change, and the build itself is what wakes the writer."""
    store = Store()
    pipeline = Pipeline(store, SnapshotCache(), debounce=0.01)
    handle = await start_operator(store, pipeline.kubernetes_status, token="recreated")
    await pipeline.start()
    try:
        await kube.create(service("web"))
        await kube.create(policy("p", "web"))
        first, _ = await eventually(
            lambda: _has(_resolved_refs(kube, "p"), "True"), "the first policy's status"
        )
        await pipeline.stop()  # nothing is built from here on
        await kube.delete("TrafficPolicy", "shop", "p")
        created = await kube.create(policy("p", "web"))
        uid = created["metadata"]["uid"]
        assert uid != first
        writer = handle.operator.status
        key = ObjectKey("TrafficPolicy", "shop", "p")

        def seen_and_checked() -> bool:
            live = handle.operator.feed.lookup(key) or {}
            return live.get("metadata", {}).get("uid") == uid and writer.checks > 0

        await eventually(seen_and_checked, "the new policy seen by the writer")
        before = writer.checks
        await asyncio.sleep(2.0)  # (a window to count the writer's looks in)
        looks = writer.checks - before
        assert looks <= 2, f"{looks} looks at an object waiting for its build in 2 s"
        assert (await _resolved_refs(kube, "p"))[1] is None  # no status of the deleted one

        loop = asyncio.get_running_loop()
        began = loop.time()
        await pipeline.start()
        await eventually(lambda: _has(_resolved_refs(kube, "p"), "True"), "the new one's status")
        assert loop.time() - began < 1.0, "the built object's status was slow to come"
    finally:
        await pipeline.stop()


async def _has(pair: Awaitable[tuple[str, str | None]], want: str) -> tuple[str, str | None] | None:
    uid, found = await pair
    return (uid, found) if found == want else None
