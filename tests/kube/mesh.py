"""End-to-end harness: control-plane replicas (operator + pipeline + ADS server, as
`nodemesh controlplane --source kubernetes` wires them) against the emulator, and a real
node Envoy connected to one of them."""

from __future__ import annotations

import asyncio
import functools
import time
from typing import Any

import aiohttp

from nodemesh.controlplane.http import StatusServer
from nodemesh.controlplane.pipeline import Pipeline
from nodemesh.controlplane.store import Store
from nodemesh.envoy import EnvoyProcess
from nodemesh.xds import types
from nodemesh.xds.bootstrap import bootstrap
from nodemesh.xds.cache import SnapshotCache
from nodemesh.xds.server import AdsServer
from tests.e2e.mesh import NODE, Reply
from tests.kube.conftest import RunningOperator, eventually

ALL_TYPES = (types.CLUSTER, types.ENDPOINT, types.LISTENER, types.ROUTE)


class Replica:
    """One control-plane process: the operator first, then the pipeline and the ADS server
    once the store holds the initial listing (never a partial snapshot)."""

    def __init__(self, start_operator: Any, outbound_port: int, token: str) -> None:
        self.start_operator = start_operator
        self.token = token
        self.store = Store()
        self.cache = SnapshotCache()
        self.server = AdsServer(self.cache)
        self.pipeline = Pipeline(
            self.store, self.cache, self.server.status, debounce=0.05,
            outbound_address="127.0.0.1", outbound_port=outbound_port,
        )  # fmt: skip
        self.operator: RunningOperator | None = None
        self.xds_port = 0
        self.http: StatusServer | None = None  # with peers_service: /programmed for its peers
        self.http_port = 0

    async def start(self, xds_port: int = 0, **options: Any) -> Replica:
        self.operator = await self.start_operator(
            self.store,
            self.pipeline.kubernetes_status,
            token=self.token,
            report=functools.partial(self.pipeline.set_source_errors, "kubernetes"),
            **options,
        )
        peers = self.operator.operator.peers
        if peers is not None:  # as `nodemesh controlplane` wires them (run_operator)
            self.pipeline.use_peers(peers)
            self.http = StatusServer(self.pipeline)
            self.http_port = await self.http.start("127.0.0.1", 0)
        await self.pipeline.start()
        self.xds_port = await self.server.start(f"127.0.0.1:{xds_port}")
        return self

    async def stop(self) -> None:
        if self.operator is not None:
            await self.operator.stop()
        if self.http is not None:
            await self.http.stop()
        await self.pipeline.stop()
        await self.server.stop(grace=0)

    @property
    def is_leader(self) -> bool:
        return self.operator is not None and self.operator.operator.is_leader

    def acked(self, node: str = NODE) -> bool:
        """The node Envoy holds exactly this replica's current snapshot for it (its own, if it
        has one: clients of a consumer namespace there)."""
        snap = self.cache.get_snapshot(node)
        status = self.server.status.node(node)
        if snap is None or status is None:
            return False
        for t in ALL_TYPES:
            ts = status.types.get(t)
            have = ts.acked_resources if ts is not None else {}
            want = {name: r.version for name, r in snap.resources(t).items()}
            if have != want:
                return False
        return True

    async def converge(self, timeout: float = 20.0) -> None:
        await self.pipeline.wait_built(self.store.revision, timeout)
        await eventually(self.acked, "Envoy ACKs the current snapshot", timeout)


class NodeEnvoy:
    """A real node Envoy on a control-plane replica's ADS port, and a client through it."""

    def __init__(self, binary: str, outbound_port: int, node: str = NODE) -> None:
        self.binary = binary
        self.outbound_port = outbound_port
        self.node = node
        self.envoy: EnvoyProcess | None = None
        self.session: aiohttp.ClientSession | None = None

    async def start(self, xds_port: int) -> NodeEnvoy:
        self.envoy = EnvoyProcess(bootstrap(self.node, f"127.0.0.1:{xds_port}"), binary=self.binary)
        await asyncio.to_thread(self.envoy.start)
        return await self.start_client()

    async def start_client(self) -> NodeEnvoy:
        self.session = aiohttp.ClientSession(connector=aiohttp.TCPConnector(force_close=True))
        return self

    async def stop(self) -> None:
        if self.session is not None:
            await self.session.close()
            self.session = None
        if self.envoy is not None:
            await asyncio.to_thread(self.envoy.stop)
            self.envoy = None

    def stats(self, regex: str) -> dict[str, int]:
        assert self.envoy is not None
        return self.envoy.stats(regex)

    async def get(
        self, host: str, path: str = "/", timeout: float = 10.0, source: str = ""
    ) -> Reply:
        """GET through the node Envoy (from the local address `source`, if given)."""
        assert self.session is not None
        started = time.monotonic()
        session = self.session
        if source:
            session = aiohttp.ClientSession(
                connector=aiohttp.TCPConnector(force_close=True, local_addr=(source, 0))
            )
        try:
            return await self._get(session, host, path, timeout, started)
        finally:
            if source:
                await session.close()

    async def _get(
        self, session: aiohttp.ClientSession, host: str, path: str, timeout: float, started: float
    ) -> Reply:
        async with session.get(
            f"http://127.0.0.1:{self.outbound_port}{path}",
            headers={"Host": host},
            timeout=aiohttp.ClientTimeout(total=timeout),
        ) as resp:
            body = await resp.text()
            return Reply(resp.status, body.strip(), dict(resp.headers), time.monotonic() - started)
