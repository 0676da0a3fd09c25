"""Test harness for end-to-end mesh tests: an in-process control plane (store, pipeline, ADS
server), one real node Envoy, and programmable HTTP backends on 127.0.0.1."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
from aiohttp import web

from nodemesh.controlplane.pipeline import Pipeline
from nodemesh.controlplane.store import ObjectKey, Store
from nodemesh.envoy import EnvoyProcess
from nodemesh.xds import types
from nodemesh.xds.bootstrap import bootstrap
from nodemesh.xds.cache import SnapshotCache
from nodemesh.xds.server import AdsServer
from tests.support import free_port

NODE = "node-1"
ALL_TYPES = (types.CLUSTER, types.ENDPOINT, types.LISTENER, types.ROUTE)


@dataclass
class Seen:
    path: str
    headers: dict[str, str]  # one value per name (the last); `values` has them all
    at: float
    pairs: tuple[tuple[str, str], ...] = ()

    def values(self, name: str) -> list[str]:
        """Every value the request carried for `name` (any case), in order."""
        return [v for k, v in self.pairs if k.lower() == name.lower()]


@dataclass
class HttpBackend:
    """An HTTP backend that answers with its name, counts requests and records them.

    Behaviour knobs: `fail_next(n, status)` answers the next n requests with `status`;
    `delay` (seconds) holds every answer; `fail_always` answers every request with a status.
    """

    name: str
    port: int = 0
    hits: int = 0
    seen: list[Seen] = field(default_factory=list)
    delay: float = 0.0
    fail_always: int = 0
    _fail: list[int] = field(default_factory=list)
    _runner: web.AppRunner | None = None

    def fail_next(self, n: int, status: int = 503) -> None:
        self._fail.extend([status] * n)

    def reset(self) -> None:
        self.hits, self.seen, self.delay, self.fail_always, self._fail = 0, [], 0.0, 0, []

    async def _handle(self, request: web.Request) -> web.StreamResponse:
        self.hits += 1
        self.seen.append(
            Seen(request.path_qs, dict(request.headers), time.monotonic(),
                 tuple(request.headers.items()))
        )  # fmt: skip
        if request.headers.get("Upgrade", "").lower() == "websocket":
            return await self._websocket(request)
        if self.delay:
            await asyncio.sleep(self.delay)
        headers = {"x-backend": self.name, "x-path": request.path_qs}
        if self._fail:
            return web.Response(
                status=self._fail.pop(0), text=f"{self.name} failing\n", headers=headers
            )
        if self.fail_always:
            return web.Response(
                status=self.fail_always, text=f"{self.name} failing\n", headers=headers
            )
        return web.Response(text=f"{self.name}\n", headers=headers)

    async def _websocket(self, request: web.Request) -> web.StreamResponse:
        """A WebSocket that answers each text message with "<name>: <message>"."""
        ws = web.WebSocketResponse()
        await ws.prepare(request)
        async for msg in ws:
            if msg.type == aiohttp.WSMsgType.TEXT:
                await ws.send_str(f"{self.name}: {msg.data}")
        return ws

    async def start(self) -> HttpBackend:
        app = web.Application()
        app.router.add_route("*", "/{tail:.*}", self._handle)
        self._runner = web.AppRunner(app, access_log=None)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0)
        await site.start()
        assert site._server is not None
        self.port = int(site._server.sockets[0].getsockname()[1])  # type: ignore[attr-defined]
        return self

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()


HTTP_PORT = (("http", 80, ""),)


def service(
    name: str,
    ns: str = "shop",
    ports: Iterable[tuple[str, int, str]] = HTTP_PORT,
    cluster_ip: str = "",
) -> dict[str, Any]:
    spec: dict[str, Any] = {
        "ports": [{"name": n, "port": p, **({"appProtocol": a} if a else {})} for n, p, a in ports]
    }
    if cluster_ip:
        spec["clusterIP"] = cluster_ip
    return {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": {"name": name, "namespace": ns},
        "spec": spec,
    }


def endpoint_slice(svc: str, backend_port: int, ns: str = "shop", port_name: str = "http",
                   suffix: str = "", address: str = "127.0.0.1", ready: bool = True,
                   terminating: bool = False) -> dict[str, Any]:  # fmt: skip
    return {
        "apiVersion": "discovery.k8s.io/v1",
        "kind": "EndpointSlice",
        "metadata": {
            "name": f"{svc}-{suffix or backend_port}",
            "namespace": ns,
            "labels": {"kubernetes.io/service-name": svc},
        },
        "addressType": "IPv4",
        "ports": [{"name": port_name, "port": backend_port, "protocol": "TCP"}],
        "endpoints": [
            {
                "addresses": [address],
                "conditions": {"ready": ready, "serving": True, "terminating": terminating},
                "nodeName": NODE,
            }
        ],
    }


@dataclass
class Reply:
    status: int
    body: str
    headers: dict[str, str]
    seconds: float


class Mesh:
    """Control plane + one node Envoy. `apply()` objects, `await converge()`, then `get()`."""

    def __init__(
        self,
        envoy_binary: str,
        access_log: str = "",
        envoy_args: tuple[str, ...] = (),
        envoy_stdout: Path | None = None,
        cluster_domain: str = "cluster.local",
    ) -> None:
        self.store = Store()
        self.cache = SnapshotCache()
        self.server = AdsServer(self.cache)
        self.outbound_port = free_port()
        self.pipeline = Pipeline(
            self.store, self.cache, self.server.status, debounce=0.01,
            outbound_address="127.0.0.1", outbound_port=self.outbound_port,
            access_log=access_log, cluster_domain=cluster_domain,
        )  # fmt: skip
        self.envoy_binary = envoy_binary
        self.envoy_args = envoy_args
        self.envoy_stdout = envoy_stdout
        self.envoy: EnvoyProcess | None = None
        self.session: aiohttp.ClientSession | None = None

    async def start(self) -> Mesh:
        await self.pipeline.start()
        port = await self.server.start("127.0.0.1:0")
        self.envoy = EnvoyProcess(
            bootstrap(NODE, f"127.0.0.1:{port}"),
            binary=self.envoy_binary,
            extra_args=self.envoy_args,
            stdout=self.envoy_stdout,
        )
        await asyncio.to_thread(self.envoy.start)
        self.session = aiohttp.ClientSession(connector=aiohttp.TCPConnector(force_close=True))
        return self

    async def stop(self) -> None:
        if self.session is not None:
            await self.session.close()
        if self.envoy is not None:
            await asyncio.to_thread(self.envoy.stop)
        await self.pipeline.stop()
        await self.server.stop(grace=0)

    def apply(self, *objs: dict[str, Any]) -> None:
        for obj in objs:
            self.store.apply(obj)

    def delete(self, kind: str, name: str, ns: str = "shop") -> None:
        self.store.delete(ObjectKey(kind, ns, name))

    def acked(self) -> bool:
        snap = self.cache.get_snapshot(NODE)  # the node's own, else the shared one
        node = self.server.status.node(NODE)
        if snap is None or node is None:
            return False
        for t in ALL_TYPES:
            ts = node.types.get(t)
            have = ts.acked_resources if ts is not None else {}
            for name, r in snap.resources(t).items():
                if have.get(name) != r.version:
                    return False
        return True

    async def converge(self, timeout: float = 15.0) -> None:
        """Wait until the store's current revision is built and the node Envoy ACKed it."""
        await self.pipeline.wait_built(self.store.revision, timeout)
        deadline = time.monotonic() + timeout
        while not self.acked():
            if time.monotonic() > deadline:
                assert self.envoy is not None
                raise AssertionError(
                    f"Envoy did not ACK revision {self.store.revision}: "
                    f"{self.server.status.snapshot()} {self.pipeline.last_error} "
                    f"{self.envoy.log_tail()}"
                )
            await asyncio.sleep(0.02)

    async def get(self, host: str, path: str = "/", headers: dict[str, str] | None = None,
                  method: str = "GET", timeout: float = 10.0,
                  source: str = "") -> Reply:  # fmt: skip
        """A request through the node Envoy; from the local address `source` if given (a
        "pod" of the node, for consumer routes), else from 127.0.0.1."""
        if source:
            connector = aiohttp.TCPConnector(force_close=True, local_addr=(source, 0))
            async with aiohttp.ClientSession(connector=connector) as session:
                return await self._get(session, host, path, headers, method, timeout)
        assert self.session is not None
        return await self._get(self.session, host, path, headers, method, timeout)

    async def _get(self, session: aiohttp.ClientSession, host: str, path: str,
                   headers: dict[str, str] | None, method: str,
                   timeout: float) -> Reply:  # fmt: skip
        started = time.monotonic()
        async with session.request(
            method, f"http://127.0.0.1:{self.outbound_port}{path}",
            headers={"Host": host, **(headers or {})},
            timeout=aiohttp.ClientTimeout(total=timeout), allow_redirects=False,
        ) as resp:  # fmt: skip
            body = await resp.text()
            return Reply(resp.status, body.strip(), dict(resp.headers), time.monotonic() - started)

    def websocket(self, host: str, path: str = "/") -> Any:
        """`async with mesh.websocket(host) as ws:` a WebSocket through the node Envoy."""
        assert self.session is not None
        return self.session.ws_connect(
            f"http://127.0.0.1:{self.outbound_port}{path}",
            headers={"Host": host},
            timeout=aiohttp.ClientWSTimeout(ws_close=10),
        )

    async def get_many(
        self, n: int, host: str, path: str = "/", headers: dict[str, str] | None = None
    ) -> list[Reply]:
        parallel = 16
        sem = asyncio.Semaphore(parallel)

        async def one() -> Reply:
            async with sem:
                return await self.get(host, path, headers)

        return list(await asyncio.gather(*(one() for _ in range(n))))
