"""A route or policy the builder refuses, or whose references do not resolve, is said in the
log once per new verdict, not only in /status."""

from __future__ import annotations

import logging
from typing import Any

import pytest

from nodemesh.controlplane.pipeline import Pipeline
from nodemesh.controlplane.store import Store
from nodemesh.xds.cache import SnapshotCache
from nodemesh.xds.server import StatusTracker
from tests.e2e.mesh import service
from tests.e2e.objects import http_route, to

pytestmark = pytest.mark.asyncio


def said(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]


async def test_a_refused_route_is_said_in_the_log_once(caplog: pytest.LogCaptureFixture) -> None:
    store = Store()
    store.apply(service("web"))
    broken: dict[str, Any] = http_route("web", "web", [{"backendRefs": [to("web")]}])
    broken["spec"]["rules"][0]["timeouts"] = {"request": "soon"}
    store.apply(broken)
    store.apply(http_route("lost", "web", [{"backendRefs": [to("ghost")]}]))
    p = Pipeline(store, SnapshotCache(), StatusTracker())
    with caplog.at_level(logging.WARNING, logger="nodemesh.controlplane.pipeline"):
        await p.rebuild()
        await p.rebuild()  # nothing new: not said again
    assert sorted(said(caplog)) == [
        "HTTPRoute shop/lost (Service/web): ResolvedRefs=False BackendNotFound: "
        "spec.rules[0].backendRefs[0]: Service shop/ghost not found",
        "HTTPRoute shop/web (Service/web): Accepted=False UnsupportedValue: "
        "spec.rules[0].timeouts.request: invalid duration 'soon' (expected e.g. 250ms, 1s, 1m30s)",
    ]
    caplog.clear()
    fixed = http_route("web", "web", [{"backendRefs": [to("web")]}])
    store.apply(fixed)
    with caplog.at_level(logging.WARNING, logger="nodemesh.controlplane.pipeline"):
        await p.rebuild()
    assert said(caplog) == []


async def test_many_new_refusals_are_said_in_twenty_lines_and_a_count(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A restart finds every refused route new: the first twenty are said, then how many
    more (a large mesh with many broken routes would fill the log at every start)."""
    store = Store()
    store.apply(service("web"))
    for i in range(25):
        store.apply(http_route(f"lost{i:02}", "web", [{"backendRefs": [to("ghost")]}]))
    p = Pipeline(store, SnapshotCache(), StatusTracker())
    with caplog.at_level(logging.WARNING, logger="nodemesh.controlplane.pipeline"):
        await p.rebuild()
    lines = said(caplog)
    assert len(lines) == 21 and all("ResolvedRefs=False" in line for line in lines[:20])
    assert lines[20] == (
        "5 more conditions Accepted or ResolvedRefs False on routes and policies: see /status"
    )
