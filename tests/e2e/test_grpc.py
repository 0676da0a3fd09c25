"""GRPCRoute with a real gRPC server and client through the node Envoy (HTTP/2 upstream)."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator

import grpc
import pytest
import pytest_asyncio
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from nodemesh.controlplane.store import ObjectKey
from tests.e2e.mesh import Mesh, endpoint_slice, service
from tests.e2e.objects import grpc_route, policy, to

pytestmark = pytest.mark.asyncio(loop_scope="module")

H2 = (("grpc", 50051, "kubernetes.io/h2c"),)


async def start_server(
    status: health_pb2.HealthCheckResponse.ServingStatus.ValueType,
) -> tuple[grpc.aio.Server, int]:
    server = grpc.aio.server()
    servicer = health.aio.HealthServicer()
    await servicer.set("", status)  # type: ignore[arg-type]
    health_pb2_grpc.add_HealthServicer_to_server(servicer, server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    return server, port


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def grpc_backends(mesh: Mesh) -> AsyncIterator[None]:
    serving, serving_port = await start_server(health_pb2.HealthCheckResponse.SERVING)
    other, other_port = await start_server(health_pb2.HealthCheckResponse.NOT_SERVING)
    mesh.apply(
        service("catalog", ports=H2), service("catalog-check", ports=H2),
        endpoint_slice("catalog", other_port, port_name="grpc"),
        endpoint_slice("catalog-check", serving_port, port_name="grpc"),
        grpc_route("catalog", "catalog", [
            {"matches": [{"method": {"service": "grpc.health.v1.Health", "method": "Check"}}],
             "backendRefs": [to("catalog-check", port=50051)]},
            {"backendRefs": [to("catalog", port=50051)]},
        ]),
    )  # fmt: skip
    await mesh.converge()
    try:
        yield
    finally:
        await serving.stop(0)
        await other.stop(0)


async def test_grpc_method_match_routes_check_and_watch_apart(
    mesh: Mesh, grpc_backends: None
) -> None:
    options = [("grpc.default_authority", "catalog.shop:50051")]
    async with grpc.aio.insecure_channel(f"127.0.0.1:{mesh.outbound_port}", options=options) as ch:
        stub = health_pb2_grpc.HealthStub(ch)
        check = await stub.Check(health_pb2.HealthCheckRequest(service=""), timeout=5)
        assert check.status == health_pb2.HealthCheckResponse.SERVING  # catalog-check
        watch = stub.Watch(health_pb2.HealthCheckRequest(service=""), timeout=5)
        first = await watch.read()
        watch.cancel()
        assert first.status == health_pb2.HealthCheckResponse.NOT_SERVING  # catalog


async def test_plain_http_does_not_match_a_grpc_route(mesh: Mesh, grpc_backends: None) -> None:
    reply = await mesh.get("catalog.shop:50051", "/grpc.health.v1.Health/Check")
    assert reply.status == 404


async def flaky_server(
    failures: int, after_headers: bool
) -> tuple[grpc.aio.Server, int, list[int]]:
    """A server of /t.Svc/Call answering UNAVAILABLE to its first `failures` calls: in a
    trailers-only reply (grpc-status in the response headers), or after sending headers."""
    calls: list[int] = []

    async def call(request: bytes, context: grpc.aio.ServicerContext[bytes, bytes]) -> bytes:
        calls.append(1)
        if len(calls) <= failures:
            if after_headers:
                await context.send_initial_metadata((("x-sent", "headers"),))
            await context.abort(grpc.StatusCode.UNAVAILABLE, "not yet")
        return b"ok"

    server = grpc.aio.server()
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(
        "t.Svc", {"Call": grpc.unary_unary_rpc_method_handler(call)}),))  # fmt: skip
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    return server, port, calls


async def call_through_mesh(mesh: Mesh, name: str) -> grpc.StatusCode:
    options = [("grpc.default_authority", f"{name}.shop:50051")]
    async with grpc.aio.insecure_channel(f"127.0.0.1:{mesh.outbound_port}", options=options) as ch:
        try:
            await ch.unary_unary("/t.Svc/Call")(b"", timeout=5)
        except grpc.aio.AioRpcError as e:
            return e.code()
        return grpc.StatusCode.OK


@pytest.mark.parametrize(
    ("after_headers", "code", "tries"),
    [(False, grpc.StatusCode.OK, 3), (True, grpc.StatusCode.UNAVAILABLE, 1)],
    ids=["trailers-only-retried", "after-headers-not-retried"],
)
async def test_a_policy_retries_unavailable_only_in_a_trailers_only_reply(
    mesh: Mesh, after_headers: bool, code: grpc.StatusCode, tries: int
) -> None:
    """retryOn: [unavailable] reads grpc-status in the response headers: a reply that is only
    an error (trailers-only) is retried, one that sent headers first is not (its status comes
    in trailers, after Envoy has started the response)."""
    name = f"gretry{int(after_headers)}"
    server, port, calls = await flaky_server(2, after_headers)
    try:
        mesh.apply(
            service(name, ports=H2),
            endpoint_slice(name, port, port_name="grpc"),
            policy(name, name, retry={
                "retryOn": ["unavailable"], "attempts": 3, "backoff": {"baseInterval": "5ms"},
            }),
            grpc_route(name, name, [{"backendRefs": [to(name, port=50051)]}]),
        )  # fmt: skip
        await mesh.converge()
        assert await call_through_mesh(mesh, name) == code
        assert len(calls) == tries
    finally:
        await server.stop(0)


async def test_a_grpc_route_to_a_port_that_does_not_say_http2_says_why_it_fails(
    mesh: Mesh,
) -> None:
    """A GRPCRoute to a Service port named `api`, without appProtocol: its cluster spoke
    HTTP/1.1, and every call failed ("protocol error") while the route said Accepted,
    ResolvedRefs and Programmed. The backend is now unresolved, UnsupportedProtocol, saying
    what to set (making the port's one cluster HTTP/2 would break its HTTP/1.1 clients);
    with appProtocol kubernetes.io/grpc the calls go through."""
    server, port, calls = await flaky_server(0, after_headers=False)
    try:
        mesh.apply(
            service("plainapi", ports=(("api", 50051, ""),)),
            endpoint_slice("plainapi", port, port_name="api"),
            grpc_route("plainapi", "plainapi", [{"backendRefs": [to("plainapi", port=50051)]}]),
        )
        await mesh.converge()
        assert await call_through_mesh(mesh, "plainapi") == grpc.StatusCode.UNAVAILABLE
        assert calls == []
        conditions = mesh.pipeline.conditions()[ObjectKey("GRPCRoute", "shop", "plainapi")]
        (resolved,) = [c for c in conditions if c.type == "ResolvedRefs"]
        assert (resolved.status, resolved.reason) == ("False", "UnsupportedProtocol")
        assert resolved.message.endswith("give it appProtocol kubernetes.io/grpc (or a name grpc)")

        mesh.apply(service("plainapi", ports=(("api", 50051, "kubernetes.io/grpc"),)))
        await mesh.converge()
        assert await call_through_mesh(mesh, "plainapi") == grpc.StatusCode.OK
        assert len(calls) == 1
    finally:
        await server.stop(0)


@pytest.mark.parametrize("with_route", [True, False], ids=["grpcroute", "grpc-port-alone"])
async def test_a_policy_request_timeout_ends_calls_and_streams_with_deadline_exceeded(
    mesh: Mesh, with_route: bool
) -> None:
    """`timeouts.request` on a gRPC Service: a bidi stream that kept sending ran past it
    without end (Envoy's route timeout starts once the request has ended), and a unary call
    it cut failed UNAVAILABLE, which clients retry, where a deadline is DEADLINE_EXCEEDED.
    The same with a GRPCRoute, or without one on a port whose appProtocol says gRPC."""

    async def slow(request: bytes, context: grpc.aio.ServicerContext[bytes, bytes]) -> bytes:
        await asyncio.sleep(3)
        return b"late"

    async def chat(
        requests: AsyncIterator[bytes], context: grpc.aio.ServicerContext[bytes, bytes]
    ) -> AsyncIterator[bytes]:
        async for r in requests:
            yield r

    server = grpc.aio.server()
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler("t.Svc", {
        "Slow": grpc.unary_unary_rpc_method_handler(slow),
        "Chat": grpc.stream_stream_rpc_method_handler(chat),
    }),))  # fmt: skip
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    try:
        name = f"deadline{int(with_route)}"
        mesh.apply(
            service(name, ports=H2 if with_route else (("rpc", 50051, "kubernetes.io/grpc"),)),
            endpoint_slice(name, port, port_name="grpc" if with_route else "rpc"),
            policy(name, name, timeouts={"request": "500ms"}),
        )
        if with_route:
            mesh.apply(grpc_route(name, name, [{"backendRefs": [to(name, port=50051)]}]))
        await mesh.converge()
        options = [("grpc.default_authority", f"{name}.shop:50051")]
        target = f"127.0.0.1:{mesh.outbound_port}"
        async with grpc.aio.insecure_channel(target, options=options) as ch:
            started = time.monotonic()
            with pytest.raises(grpc.aio.AioRpcError) as unary:
                await ch.unary_unary("/t.Svc/Slow")(b"", timeout=10)
            assert unary.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
            assert time.monotonic() - started < 2.5

            async def talk() -> AsyncIterator[bytes]:
                for _ in range(50):  # 5 s of messages, never a half-close before
                    yield b"hi"
                    await asyncio.sleep(0.1)

            started = time.monotonic()
            echoed = 0
            with pytest.raises(grpc.aio.AioRpcError):
                async for _ in ch.stream_stream("/t.Svc/Chat")(talk(), timeout=10):
                    echoed += 1
            assert 0 < echoed < 50
            assert time.monotonic() - started < 2.5
    finally:
        await server.stop(0)
