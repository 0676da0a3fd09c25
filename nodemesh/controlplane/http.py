"""The control plane's HTTP listener: `/status` (JSON: objects, conditions, nodes, versions),
`/metrics` (Prometheus text: `nodemesh.controlplane.metrics`), `/livez` (the process answers:
a liveness probe), `/readyz` and its older name `/healthz` (a snapshot is built and served: a
readiness probe), and `/programmed` (this replica's verdicts for the node Envoys connected to
it, for its peers: `nodemesh.controlplane.peers`)."""

from __future__ import annotations

import logging
from typing import Any

from aiohttp import web
from aiohttp.http_exceptions import HttpProcessingError

from nodemesh._http import listen
from nodemesh.controlplane import metrics
from nodemesh.controlplane.pipeline import Pipeline

__all__ = ["StatusServer"]

log = logging.getLogger("nodemesh.controlplane.http")

# aiohttp keeps an idle connection an hour by default: a client that opens many (or a probe
# that never closes) holds a file descriptor each, shared with the xDS server's streams.
KEEPALIVE_SECONDS = 15.0


class _ServerLog(logging.LoggerAdapter):  # type: ignore[type-arg]
    """aiohttp's server logger, but a request it could not parse (a header line over 8 KB, a
    browser's big cookies, a scanner) is one DEBUG line, not an ERROR with a traceback: ERROR
    lines are what alerts watch for, and any client could make them."""

    def exception(self, msg: object, *args: Any, exc_info: Any = True, **kwargs: Any) -> None:
        if isinstance(exc_info, HttpProcessingError) and 400 <= (exc_info.code or 0) < 500:
            text = " ".join(str(exc_info).split())[:200]
            self.debug("a request it could not parse: %s", text)
            return
        super().exception(msg, *args, exc_info=exc_info, **kwargs)


class StatusServer:
    def __init__(self, pipeline: Pipeline, *, keepalive: float = KEEPALIVE_SECONDS) -> None:
        self.pipeline = pipeline
        self._runner: web.AppRunner | None = None
        self.port = 0
        self.keepalive = keepalive

    async def _status(self, request: web.Request) -> web.Response:
        return web.json_response(self.pipeline.status_json())

    async def _metrics(self, request: web.Request) -> web.Response:
        body = metrics.render(self.pipeline).encode()
        return web.Response(body=body, headers={"Content-Type": metrics.CONTENT_TYPE})

    async def _programmed(self, request: web.Request) -> web.Response:
        etag, body = self.pipeline.programmed_report()
        if request.headers.get("If-None-Match") == etag:
            return web.Response(status=304, headers={"ETag": etag})
        return web.Response(body=body, content_type="application/json", headers={"ETag": etag})

    async def _readyz(self, request: web.Request) -> web.Response:
        ok = self.pipeline.snapshot is not None
        return web.Response(status=200 if ok else 503, text="ok\n" if ok else "not built yet\n")

    async def _livez(self, request: web.Request) -> web.Response:
        # Up before the first snapshot: a first listing of a large cluster may take minutes,
        # and a liveness probe on readiness would restart the process before it is done.
        return web.Response(text="ok\n")

    async def start(self, host: str, port: int) -> int:
        app = web.Application()
        app.router.add_get("/status", self._status)
        app.router.add_get("/metrics", self._metrics)
        app.router.add_get("/programmed", self._programmed)
        app.router.add_get("/livez", self._livez)
        app.router.add_get("/readyz", self._readyz)
        app.router.add_get("/healthz", self._readyz)
        self._runner, self.port = await listen(
            app, host, port, keepalive=self.keepalive, logger=_ServerLog(log, {})
        )
        return self.port

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None
