"""The garbage collector around rebuilds: paused for a big cold build and everything alive frozen
after it, left alone for warm and small builds, and enabled again whatever the build does."""

from __future__ import annotations

import gc
from collections.abc import Iterator

import pytest

from nodemesh.controlplane.builder import BuildMemo, build
from nodemesh.controlplane.pipeline import BULK_OBJECTS, build_collector
from nodemesh.controlplane.store import Store
from tests.e2e.mesh import endpoint_slice, service


@pytest.fixture(autouse=True)
def _thawed() -> Iterator[None]:
    yield
    gc.unfreeze()  # later tests get a collector as usual
    gc.enable()


def test_big_cold_build_pauses_the_collector_and_freezes_what_it_made() -> None:
    store, memo = Store(), BuildMemo()
    store.apply(service("web"))
    store.apply(endpoint_slice("web", 8080))
    assert memo.cold
    frozen = gc.get_freeze_count()
    with build_collector(cold=memo.cold, objects=BULK_OBJECTS):
        assert not gc.isenabled()
        build(store.view(), memo=memo)
    assert gc.isenabled()
    assert not memo.cold
    assert gc.get_freeze_count() > frozen


def test_warm_or_small_builds_leave_the_collector_alone() -> None:
    frozen = gc.get_freeze_count()
    with build_collector(cold=False, objects=10 * BULK_OBJECTS):
        assert gc.isenabled()
    with build_collector(cold=True, objects=BULK_OBJECTS - 1):
        assert gc.isenabled()
    assert gc.get_freeze_count() == frozen


def test_collector_is_enabled_again_when_the_build_fails() -> None:
    with pytest.raises(RuntimeError), build_collector(cold=True, objects=BULK_OBJECTS):
        raise RuntimeError("build failed")
    assert gc.isenabled()
