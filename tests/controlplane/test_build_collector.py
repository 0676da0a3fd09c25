"""The garbage collector around rebuilds: paused for a cold build and everything alive frozen
after it, left alone for warm builds, and enabled again whatever the build does."""

from __future__ import annotations

import gc
from collections.abc import Iterator

import pytest

from nodemesh.controlplane.builder import BuildMemo, build
from nodemesh.controlplane.pipeline import build_collector
from nodemesh.controlplane.store import Store
from tests.e2e.mesh import endpoint_slice, service


@pytest.fixture(autouse=True)
def _thawed() -> Iterator[None]:
    yield
    gc.unfreeze()  # later tests get a collector as usual
    gc.enable()


def test_cold_build_pauses_the_collector_and_freezes_what_it_made() -> None:
    store, memo = Store(), BuildMemo()
    store.apply(service("web"))
    store.apply(endpoint_slice("web", 8080))
    assert memo.cold
    frozen = gc.get_freeze_count()
    with build_collector(cold=memo.cold):
        assert not gc.isenabled()
        build(store.view(), memo=memo)
    assert gc.isenabled()
    assert not memo.cold
    assert gc.get_freeze_count() > frozen


def test_warm_build_leaves_the_collector_alone() -> None:
    frozen = gc.get_freeze_count()
    with build_collector(cold=False):
        assert gc.isenabled()
    assert gc.get_freeze_count() == frozen


def test_collector_is_enabled_again_when_the_build_fails() -> None:
    with pytest.raises(RuntimeError), build_collector(cold=True):
        raise RuntimeError("build failed")
    assert gc.isenabled()
