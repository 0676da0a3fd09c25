"""An aiohttp application on HOST:PORT, for the HTTP listeners of the control plane and of the
node agent."""

from __future__ import annotations

import logging

from aiohttp import web
from aiohttp.log import server_logger

__all__ = ["listen"]


async def listen(
    app: web.Application,
    host: str,
    port: int,
    *,
    keepalive: float,
    logger: logging.Logger | logging.LoggerAdapter = server_logger,  # type: ignore[type-arg]
) -> tuple[web.AppRunner, int]:
    """Serve `app` without an access log, closing connections idle `keepalive` seconds (aiohttp
    keeps one an hour by default, a file descriptor each). Returns the runner (`cleanup()` to
    stop) and the port (the one picked when `port` is 0)."""
    runner = web.AppRunner(app, access_log=None, keepalive_timeout=keepalive, logger=logger)
    await runner.setup()
    try:
        site = web.TCPSite(runner, host, port)
        await site.start()
    except BaseException:
        await runner.cleanup()
        raise
    server = site._server
    assert server is not None
    return runner, int(server.sockets[0].getsockname()[1])  # type: ignore[attr-defined]
