"""The control plane's HTTP listener against clients that misbehave: idle connections are
closed, and a request it cannot parse is not an ERROR line (the endpoints themselves:
tests/e2e/test_status.py, tests/controlplane/test_status_cli.py)."""

from __future__ import annotations

import asyncio
import logging
import socket
import time
from pathlib import Path

import pytest

from nodemesh.controlplane.files import FilesSource
from nodemesh.controlplane.http import KEEPALIVE_SECONDS, StatusServer
from nodemesh.controlplane.pipeline import Pipeline
from nodemesh.controlplane.store import Store
from nodemesh.xds.cache import SnapshotCache

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"


async def _server(keepalive: float = KEEPALIVE_SECONDS) -> StatusServer:
    store = Store()
    FilesSource(EXAMPLES, store).scan()
    pipeline = Pipeline(store, SnapshotCache())
    await pipeline.rebuild()
    server = StatusServer(pipeline, keepalive=keepalive)
    await server.start("127.0.0.1", 0)
    return server


def _closed_by_peer(sock: socket.socket, timeout: float) -> bool:
    """Whether the server closes `sock` (EOF) within `timeout` seconds."""
    sock.settimeout(0.1)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if sock.recv(65536) == b"":
                return True
        except TimeoutError:
            continue
    return False


async def test_an_idle_connection_is_closed() -> None:
    """aiohttp kept an idle keep-alive connection for an hour (its default): each one a file
    descriptor, shared with the xDS server's streams. (15 s by default; 0.5 s here.)"""
    assert KEEPALIVE_SECONDS == 15.0
    server = await _server(keepalive=0.5)

    def client() -> tuple[bytes, bool]:  # (a thread: the server runs on this loop)
        with socket.create_connection(("127.0.0.1", server.port)) as sock:
            sock.sendall(b"GET /livez HTTP/1.1\r\nHost: x\r\n\r\n")
            sock.settimeout(5)
            return sock.recv(4096), _closed_by_peer(sock, 10)

    try:
        answer, closed = await asyncio.to_thread(client)
        assert answer.startswith(b"HTTP/1.1 200") and closed, (answer, closed)
    finally:
        await server.stop()


async def test_a_request_it_cannot_parse_is_a_400_and_no_error_line(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A header line over 8 KB (a browser with big cookies, a scanner) was an ERROR line with
    a traceback from aiohttp, which any client could add to the log alerts watch."""
    server = await _server()
    caplog.set_level(logging.DEBUG)

    def client() -> bytes:  # (a thread: the server runs on this loop)
        with socket.create_connection(("127.0.0.1", server.port)) as sock:
            sock.sendall(b"GET /livez HTTP/1.1\r\nHost: x\r\nCookie: " + b"a" * 9000 + b"\r\n\r\n")
            sock.settimeout(5)
            return sock.recv(4096)

    try:
        assert (await asyncio.to_thread(client)).split(b" ")[1] == b"400"
        deadline = time.monotonic() + 5  # the handler logs after it answered
        while not any("could not parse" in r.getMessage() for r in caplog.records):
            assert time.monotonic() < deadline, "nothing said"
            await asyncio.sleep(0.02)
        said = [(r.levelname, r.getMessage()) for r in caplog.records if r.levelno >= logging.DEBUG]
        assert [m for level, m in said if level in ("ERROR", "WARNING")] == []
        (line,) = [r for r in caplog.records if "could not parse" in r.getMessage()]
        assert line.levelname == "DEBUG" and line.exc_info is None
    finally:
        await server.stop()
