"""`AdsServer`: Envoy's Aggregated Discovery Service over grpc.aio, SotW and delta on one port."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
from collections.abc import AsyncIterator
from typing import Any

import grpc
from envoy.service.discovery.v3 import discovery_pb2
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from nodemesh.xds.cache.protocol import ConfigWatcher
from nodemesh.xds.server._status import StatusTracker
from nodemesh.xds.server._streams import DeltaStream, ProtocolError, SotwStream
from nodemesh.xds.server.exceptions import ServerError

__all__ = ["ADS_SERVICE", "AdsServer", "DEFAULT_OPTIONS"]

log = logging.getLogger(__name__)

ADS_SERVICE = "envoy.service.discovery.v3.AggregatedDiscoveryService"

# Tuned for thousands of long-lived streams: keepalives find dead Envoys within ~40 s, and
# Envoy's own pings are allowed without strikes; messages may be large (big EDS/CDS sets).
DEFAULT_OPTIONS: tuple[tuple[str, Any], ...] = (
    ("grpc.keepalive_time_ms", 30_000),
    ("grpc.keepalive_timeout_ms", 10_000),
    ("grpc.keepalive_permit_without_calls", 1),
    ("grpc.http2.min_ping_interval_without_data_ms", 5_000),
    ("grpc.http2.max_ping_strikes", 0),
    ("grpc.max_send_message_length", 256 * 1024 * 1024),
    ("grpc.max_receive_message_length", 16 * 1024 * 1024),
    # Two control planes must never share a port by accident (tests run several).
    ("grpc.so_reuseport", 0),
)


def _identity(data: bytes) -> bytes:
    return data  # responses are encoded by the streams from pre-serialized resources


class AdsServer:
    """Serves ADS from a `ConfigWatcher`, tracking per-node status.

    >>> server = AdsServer(cache)                          # doctest: +SKIP
    >>> port = await server.start("127.0.0.1:0")          # doctest: +SKIP
    >>> server.status.snapshot()["node-1"]["types"]["cds"]["version_acked"]  # doctest: +SKIP
    >>> await server.stop(grace=5)                         # doctest: +SKIP
    """

    def __init__(
        self,
        watcher: ConfigWatcher,
        *,
        status: StatusTracker | None = None,
        options: tuple[tuple[str, Any], ...] = DEFAULT_OPTIONS,
    ) -> None:
        self.watcher = watcher
        self.status = status if status is not None else StatusTracker()
        self._options = options
        self._server: grpc.aio.Server | None = None
        self._health = health.aio.HealthServicer()
        self._streams: set[SotwStream | DeltaStream] = set()
        self._stale_closed = 0
        self._no_streams = asyncio.Event()
        self._no_streams.set()
        self.port = 0

    @property
    def open_streams(self) -> int:
        return len(self._streams)

    @property
    def stale_requests(self) -> int:
        """Requests ignored because they answered a superseded nonce, over all streams."""
        return self._stale_closed + sum(s.stale_requests for s in self._streams)

    async def start(self, address: str = "127.0.0.1:0") -> int:
        """Bind and start serving; returns the bound port."""
        server = grpc.aio.server(options=self._options)
        handlers = {
            "StreamAggregatedResources": grpc.stream_stream_rpc_method_handler(
                self._stream_sotw,
                request_deserializer=discovery_pb2.DiscoveryRequest.FromString,
                response_serializer=_identity,
            ),
            "DeltaAggregatedResources": grpc.stream_stream_rpc_method_handler(
                self._stream_delta,
                request_deserializer=discovery_pb2.DeltaDiscoveryRequest.FromString,
                response_serializer=_identity,
            ),
        }
        server.add_generic_rpc_handlers(
            (grpc.method_handlers_generic_handler(ADS_SERVICE, handlers),)
        )
        health_pb2_grpc.add_HealthServicer_to_server(self._health, server)
        _check_bind(address)
        try:
            port = int(server.add_insecure_port(address))
        except RuntimeError as exc:
            raise ServerError(f"bind xDS listener {address}: {exc}") from exc
        if port == 0:
            raise ServerError(f"bind xDS listener {address}: address unavailable")
        await server.start()
        for service in ("", ADS_SERVICE):
            await self._health.set(service, health_pb2.HealthCheckResponse.SERVING)
        self._server = server
        self.port = port
        log.info("xDS server listening on %s (port %d)", address, port)
        return port

    async def stop(self, grace: float | None = 5.0) -> None:
        """Stop accepting streams; open streams are served until `grace` seconds, then cut."""
        if self._server is None:
            return
        await self._health.enter_graceful_shutdown()
        await self._server.stop(grace)
        # The cut cancels the open streams' handlers, and grpc is done before they are. If the
        # caller's event loop then ends (the CLI's asyncio.run), it cancels them again and grpc
        # logs each stream as an unhandled CancelledError, with two tracebacks.
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._no_streams.wait(), 1)
        self._server = None
        log.info("xDS server stopped")

    async def wait_for_termination(self) -> None:
        if self._server is not None:
            await self._server.wait_for_termination()

    async def _stream_sotw(
        self, requests: AsyncIterator[discovery_pb2.DiscoveryRequest], context: Any
    ) -> None:
        await self._run(SotwStream(self.watcher, self.status), requests, context)

    async def _stream_delta(
        self, requests: AsyncIterator[discovery_pb2.DeltaDiscoveryRequest], context: Any
    ) -> None:
        await self._run(DeltaStream(self.watcher, self.status), requests, context)

    async def _run(
        self, stream: SotwStream | DeltaStream, requests: AsyncIterator[Any], context: Any
    ) -> None:
        self._streams.add(stream)
        self._no_streams.clear()
        failure: list[tuple[grpc.StatusCode, str]] = []

        async def read() -> None:
            try:
                async for req in requests:
                    stream.handle(req)
            except ProtocolError as exc:
                failure.append((grpc.StatusCode.INVALID_ARGUMENT, str(exc)))
            except Exception:
                # Our failure, not the client's: ending the stream quietly would look to it like
                # a normal close, and to us like nothing at all.
                log.exception("xDS stream of node %s failed", stream.node_id or "(unknown)")
                failure.append((grpc.StatusCode.INTERNAL, "the xDS server failed; see its log"))
            finally:
                stream.queue.put_nowait(None)

        reader = asyncio.create_task(read())
        try:
            while (data := await stream.queue.get()) is not None:
                await context.write(data)
            if failure:
                await context.abort(*failure[0])
        finally:
            reader.cancel()
            stream.close()
            self._streams.discard(stream)
            self._stale_closed += stream.stale_requests
            if not self._streams:
                self._no_streams.set()


def _check_bind(address: str) -> None:
    """Bind `address` (HOST:PORT) with a plain socket and let it go, for the reason a port
    cannot be had: gRPC says only "Failed to bind", and logs a line of its own to stderr
    first."""
    host, _, port = address.rpartition(":")
    if not port.isdigit() or int(port) == 0:
        return
    try:
        infos = socket.getaddrinfo(
            host.strip("[]") or None, int(port), type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
        )
    except OSError as exc:
        raise ServerError(f"bind xDS listener {address}: {exc.strerror or exc}") from exc
    first: OSError | None = None
    for family, kind, proto, _, sockaddr in infos:  # gRPC binds what it can of them
        with socket.socket(family, kind, proto) as probe:
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                probe.bind(sockaddr)
            except OSError as exc:
                first = first or exc
            else:
                return
    if first is not None:
        why = (first.strerror or str(first)).lower()
        raise ServerError(f"bind xDS listener {address}: {why}") from first
