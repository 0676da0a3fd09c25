"""What the node Envoy leaves to the application, as it is without a mesh: WebSocket upgrades,
responses and connections that take as long as they take (Envoy's own defaults would refuse
the one and cut the others at 15 s), the backend's Server header, and HTTP/1.0 requests; and
the access log an operator can turn on."""

from __future__ import annotations

import asyncio
import json
import time
from pathlib import Path

import pytest

from nodemesh.envoy import find_envoy
from tests.e2e.conftest import Backends
from tests.e2e.mesh import Mesh, endpoint_slice, service
from tests.e2e.objects import http_route, to

pytestmark = pytest.mark.asyncio(loop_scope="module")

# Envoy's default route timeout, which nodemesh turns off unless a route or policy sets one
ENVOY_DEFAULT_TIMEOUT = 15.0


@pytest.mark.parametrize("routed", [False, True], ids=["default-route", "httproute"])
async def test_a_websocket_goes_through_the_node_envoy(
    mesh: Mesh, backends: Backends, routed: bool
) -> None:
    name = f"ws-{'r' if routed else 'd'}"
    backend = await backends.get(name)
    mesh.apply(service(name), endpoint_slice(name, backend.port))
    if routed:
        mesh.apply(http_route(name, name, [{"backendRefs": [to(name)]}]))
    await mesh.converge()
    async with mesh.websocket(f"{name}.shop") as ws:
        await ws.send_str("hello")
        assert (await ws.receive_str(timeout=5)) == f"{name}: hello"


async def test_a_slow_response_and_a_long_websocket_outlast_envoys_default_timeout(
    mesh: Mesh, backends: Backends
) -> None:
    """No route or policy sets a timeout: a response that takes longer than Envoy's default
    15 s arrives, and a WebSocket open as long still carries messages."""
    slow = await backends.get("slow")
    mesh.apply(service("slow"), endpoint_slice("slow", slow.port))
    await mesh.converge()
    async with mesh.websocket("slow.shop") as ws:
        await ws.send_str("first")
        assert (await ws.receive_str(timeout=5)) == "slow: first"
        slow.delay = ENVOY_DEFAULT_TIMEOUT + 1
        reply = await mesh.get("slow.shop", "/report", timeout=ENVOY_DEFAULT_TIMEOUT + 15)
        assert (reply.status, reply.body) == (200, "slow")
        assert reply.seconds > ENVOY_DEFAULT_TIMEOUT
        await ws.send_str("later")
        assert (await ws.receive_str(timeout=5)) == "slow: later"


async def test_a_response_keeps_the_backends_server_header(mesh: Mesh, backends: Backends) -> None:
    backend = await backends.get("srv")
    mesh.apply(service("srv"), endpoint_slice("srv", backend.port))
    await mesh.converge()
    reply = await mesh.get("srv.shop")
    assert reply.status == 200
    assert reply.headers["Server"].startswith("Python/"), reply.headers  # aiohttp's, not "envoy"
    assert "x-envoy-upstream-service-time" in reply.headers  # it did go through Envoy


async def test_an_http_1_0_request_is_answered(mesh: Mesh, backends: Backends) -> None:
    """nginx's proxy_pass sends HTTP/1.0 unless told otherwise; Envoy refuses it by default
    (426 Upgrade Required)."""
    backend = await backends.get("old")
    mesh.apply(service("old"), endpoint_slice("old", backend.port))
    await mesh.converge()
    reader, writer = await asyncio.open_connection("127.0.0.1", mesh.outbound_port)
    try:
        writer.write(b"GET /legacy HTTP/1.0\r\nHost: old.shop\r\n\r\n")
        await writer.drain()
        answer = await asyncio.wait_for(reader.read(), timeout=10)  # HTTP/1.0: until close
    finally:
        writer.close()
    status_line, _, rest = answer.partition(b"\r\n")
    assert status_line.startswith(b"HTTP/1.") and status_line.split()[1] == b"200", answer
    assert rest.endswith(b"old\n") and backend.seen[-1].path == "/legacy"


async def test_the_access_log_says_where_each_request_went(
    backends: Backends, tmp_path: Path
) -> None:
    """`--access-log PATH`: one JSON line per request, with its route, the cluster and host
    that answered, its status and how many tries it took (here a retry that turned a 503 into
    a 200)."""
    binary = find_envoy()
    assert binary is not None  # the module's `mesh` fixture needed it already
    log = tmp_path / "access.log"
    logged = Mesh(binary, access_log=str(log))
    flaky = await backends.get("logged")
    try:
        await logged.start()
        logged.apply(
            service("logged"),
            endpoint_slice("logged", flaky.port),
            http_route("logged", "logged", [
                {"backendRefs": [to("logged")], "retry": {"codes": [503], "attempts": 2}},
            ]),
        )  # fmt: skip
        await logged.converge()
        flaky.fail_next(1, 503)
        reply = await logged.get("logged.shop", "/orders?id=7")
        assert reply.status == 200
        # Envoy writes a log's first line at once, the later ones every 10 s (its default)
        deadline = time.monotonic() + 10
        while not (log.exists() and log.read_text().strip()):
            assert time.monotonic() < deadline, "no access log line"
            await asyncio.sleep(0.1)
        (line,) = log.read_text().splitlines()
        entry = json.loads(line)
        assert entry["method"] == "GET" and entry["path"] == "/orders?id=7"
        assert entry["authority"] == "logged.shop" and entry["response_code"] == 200
        assert entry["route_name"] == "HTTPRoute/shop/logged/rule-0/0"
        assert entry["upstream_cluster"] == "shop/logged:80"
        assert entry["upstream_host"] == f"127.0.0.1:{flaky.port}"
        assert entry["attempts"] == 2 and entry["request_id"]
    finally:
        await logged.stop()


async def test_an_access_log_to_envoys_standard_output_is_taken(
    backends: Backends, tmp_path: Path
) -> None:
    """`--access-log stdout`: Envoy's own standard output, which a node Envoy always has (a
    file path is opened on the node, and a Listener naming one it cannot open is refused).
    One JSON line per request, as with a file."""
    binary = find_envoy()
    assert binary is not None
    stdout = tmp_path / "envoy.stdout"
    logged = Mesh(binary, access_log="stdout", envoy_stdout=stdout)
    backend = await backends.get("stdout-logged")
    try:
        await logged.start()
        logged.apply(service("stdoutlog"), endpoint_slice("stdoutlog", backend.port))
        await logged.converge()  # the node Envoy ACKed the Listener
        assert (await logged.get("stdoutlog.shop", "/to-stdout")).status == 200
        deadline = time.monotonic() + 10  # Envoy writes its access log asynchronously
        while "/to-stdout" not in stdout.read_text():
            assert time.monotonic() < deadline, "no access log line on Envoy's stdout"
            await asyncio.sleep(0.1)
        (line,) = [x for x in stdout.read_text().splitlines() if "/to-stdout" in x]
        entry = json.loads(line)
        assert (entry["authority"], entry["response_code"]) == ("stdoutlog.shop", 200)
    finally:
        await logged.stop()


async def test_removing_the_last_route_leaves_open_connections_alone(backends: Backends) -> None:
    """The last HTTPRoute of the mesh goes: the outbound Listener loses its last filter chain,
    and Envoy updates a Listener in place only if it keeps one. Before, it made a new Listener
    and drained the old one, so every open connection on the node was closed after Envoy's
    drain time (10 minutes by default, 1 s here): a WebSocket to another Service was cut."""
    binary = find_envoy()
    assert binary is not None
    drained = Mesh(binary, envoy_args=("--drain-time-s", "1"))
    own, other = await backends.get("last"), await backends.get("last-v2")
    try:
        await drained.start()
        assert drained.envoy is not None
        drained.apply(
            service("last", cluster_ip="10.96.0.50"), service("last-v2"),
            endpoint_slice("last", own.port), endpoint_slice("last-v2", other.port),
            http_route("last", "last", [{"backendRefs": [to("last-v2")]}]),
        )  # fmt: skip
        await drained.converge()
        async with drained.websocket("last-v2.shop") as ws:
            await ws.send_str("before")
            assert (await ws.receive_str(timeout=5)) == "last-v2: before"
            drained.delete("HTTPRoute", "last")
            await drained.converge()
            assert (await drained.get("last.shop")).body == "last"
            # a Listener drained whole counts here until its drain time is over
            draining = "listener_manager.total_listeners_draining"
            deadline = time.monotonic() + 10
            while drained.envoy.stats("listener_manager")[draining]:
                assert time.monotonic() < deadline, "the old Listener is still draining"
                await asyncio.sleep(0.05)
            await ws.send_str("after")
            assert (await ws.receive_str(timeout=5)) == "last-v2: after"
    finally:
        await drained.stop()
