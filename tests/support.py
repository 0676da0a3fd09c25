"""Helpers shared by test modules. `need()`: a missing prerequisite fails in CI, skips elsewhere."""

from __future__ import annotations

import asyncio
import os
import random
import re
import socket
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import TypeVar

import pytest
from aiohttp import web

T = TypeVar("T")

IN_CI = os.environ.get("CI") == "true"


def need(condition: object, reason: str) -> None:
    """Stop the test for a missing prerequisite: fail under CI=true, skip (printed) otherwise."""
    if condition:
        return
    if IN_CI:
        pytest.fail(f"prerequisite missing in CI: {reason}", pytrace=False)
    print(f"SKIP: {reason}", file=sys.stderr)
    pytest.skip(reason)


def _port_candidates() -> Iterator[int]:
    """Ports below the kernel's ephemeral range, shuffled, each offered once per run: a port the
    kernel hands out as an ephemeral one could be taken as a connection's source port before
    the listener (often Envoy) binds it."""
    try:
        low = int(open("/proc/sys/net/ipv4/ip_local_port_range").read().split()[0])
    except (OSError, ValueError, IndexError):
        low = 32768
    ports = list(range(10000, max(10001, low)))
    random.shuffle(ports)
    return iter(ports)


_CANDIDATES = _port_candidates()


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port that is free now and outside the ephemeral range (for listeners that another
    process binds later, such as Envoy's)."""
    for port in _CANDIDATES:
        with socket.socket() as s:
            try:
                s.bind((host, port))
            except OSError:
                continue
            return port
    raise RuntimeError("no free port left below the ephemeral range")


async def eventually(
    check: Callable[[], T], *, timeout: float = 15.0, interval: float = 0.05, what: str = ""
) -> T:
    """Poll `check` (run in a thread, so blocking admin calls do not stall the event loop)
    until it returns a truthy value without raising AssertionError or OSError; fail after
    `timeout`."""
    deadline = time.monotonic() + timeout
    last: BaseException | None = None
    while True:
        try:
            value = await asyncio.to_thread(check)
            if value:
                return value
            last = None
        except (AssertionError, OSError) as exc:  # OSError: a listener not up yet
            last = exc
        if time.monotonic() > deadline:
            detail = f": {last}" if last else ""
            raise AssertionError(f"timed out after {timeout}s waiting for {what or check}{detail}")
        await asyncio.sleep(interval)


def http_get(url: str, headers: dict[str, str] | None = None, timeout: float = 5.0) -> HttpResult:
    """A plain HTTP GET (blocking); returns status, body and headers, never raises on HTTP codes."""
    req = urllib.request.Request(url, headers=headers or {})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as resp:
            return HttpResult(resp.status, resp.read().decode(), dict(resp.headers))
    except urllib.error.HTTPError as exc:
        return HttpResult(exc.code, exc.read().decode(), dict(exc.headers))


@dataclass
class HttpResult:
    status: int
    body: str
    headers: dict[str, str]


class Backend:
    """A tiny HTTP backend on 127.0.0.1 that answers with its name and counts requests.

    `fail_next(n, status)` makes the next n requests answer `status` (for retry tests).
    Runs aiohttp on the test's event loop.
    """

    def __init__(self, name: str) -> None:
        self.name = name
        self.hits = 0
        self.paths: list[str] = []
        self._fail: list[int] = []
        self._runner: web.AppRunner | None = None
        self.port = 0

    def fail_next(self, n: int, status: int = 503) -> None:
        self._fail.extend([status] * n)

    async def _handle(self, request: web.Request) -> web.Response:
        self.hits += 1
        self.paths.append(request.path_qs)
        if self._fail:
            return web.Response(status=self._fail.pop(0), text=f"{self.name} failing\n")
        return web.Response(text=f"{self.name}\n", headers={"x-backend": self.name})

    async def start(self) -> Backend:
        app = web.Application()
        app.router.add_route("*", "/{tail:.*}", self._handle)
        self._runner = web.AppRunner(app, access_log=None)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0)
        await site.start()
        server = site._server
        assert server is not None and server.sockets  # type: ignore[attr-defined]
        self.port = int(server.sockets[0].getsockname()[1])  # type: ignore[attr-defined]
        return self

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()


async def fetch(
    url: str, headers: dict[str, str] | None = None, timeout: float = 5.0
) -> HttpResult:
    """`http_get` off the event loop: the backends and the control plane live on that loop."""
    return await asyncio.to_thread(http_get, url, headers, timeout)


_SAMPLE = re.compile(r"([a-zA-Z_:][a-zA-Z0-9_:]*)(?:\{(.*)\})? (-?[0-9.e+-]+|NaN|[+-]Inf)")
_LABEL = re.compile(r'([a-zA-Z_][a-zA-Z0-9_]*)="((?:[^"\\]|\\.)*)"(,|$)')


def parse_metrics(text: str) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    """The samples of a Prometheus text exposition (version 0.0.4), by (name, labels), checked
    as a scraper reads them: every sample after its family's HELP and TYPE, counters named
    `_total`, each series once."""
    out: dict[tuple[str, frozenset[tuple[str, str]]], float] = {}
    typed: dict[str, str] = {}
    helped: set[str] = set()
    assert text.endswith("\n"), "the exposition ends with a newline"
    for line in text.splitlines():
        if line.startswith("# HELP "):
            helped.add(line.split()[2])
            continue
        if line.startswith("# TYPE "):
            _, _, name, kind = line.split()
            assert name in helped and name not in typed, line
            assert kind in ("gauge", "counter"), line
            assert (kind == "counter") == name.endswith("_total"), line
            typed[name] = kind
            continue
        match = _SAMPLE.fullmatch(line)
        assert match, f"not a sample line: {line!r}"
        name, labels_text, value = match.groups()
        assert name in typed, f"{name}: a sample before its TYPE"
        labels: list[tuple[str, str]] = []
        rest = labels_text or ""
        while rest:
            label = _LABEL.match(rest)
            assert label, f"bad labels in {line!r}"
            labels.append((label.group(1), label.group(2)))
            rest = rest[label.end() :]
        key = (name, frozenset(labels))
        assert key not in out, f"a series twice: {line!r}"
        out[key] = float(value)
    return out


def metric(samples: dict[tuple[str, frozenset[tuple[str, str]]], float], name: str,
           **labels: str) -> float | None:  # fmt: skip
    """One sample's value (None when the series is not there)."""
    return samples.get((name, frozenset(labels.items())))
