"""Graceful shutdown over real gRPC: new streams refused, open ones served until the deadline."""

from __future__ import annotations

import asyncio

import grpc
import pytest
from envoy.service.discovery.v3 import discovery_pb2

from nodemesh.xds import types
from nodemesh.xds.cache import Snapshot
from tests.support import eventually
from tests.xds import resources as R
from tests.xds.conftest import ControlPlane

SOTW = "/envoy.service.discovery.v3.AggregatedDiscoveryService/StreamAggregatedResources"


def open_stream(ch: grpc.aio.Channel) -> grpc.aio.StreamStreamCall:
    return ch.stream_stream(
        SOTW,
        request_serializer=discovery_pb2.DiscoveryRequest.SerializeToString,
        response_deserializer=discovery_pb2.DiscoveryResponse.FromString,
    )()


def request(type_url: str) -> discovery_pb2.DiscoveryRequest:
    r = discovery_pb2.DiscoveryRequest(type_url=type_url)
    r.node.id = "n"
    return r


async def test_draining_refuses_new_streams_and_serves_open_ones_until_the_deadline() -> None:
    cp = await ControlPlane().start()
    cp.cache.set_snapshot(
        "n",
        Snapshot.from_messages(
            [R.eds_cluster("a"), R.endpoints("a", 80), R.http_listener("l", 1, "r")]
        ),
    )
    async with grpc.aio.insecure_channel(cp.address) as ch:
        old = open_stream(ch)
        await old.write(request(types.CLUSTER))
        assert (await old.read()).type_url == types.CLUSTER

        stopping = asyncio.create_task(cp.server.stop(grace=3))

        async def refused() -> bool:
            async with grpc.aio.insecure_channel(cp.address) as other:
                new = open_stream(other)
                try:
                    await new.write(request(types.CLUSTER))
                    await asyncio.wait_for(new.read(), 2)
                except (grpc.aio.AioRpcError, grpc.aio.UsageError):
                    return True
                return False

        await eventually(lambda: asyncio.run(refused()), what="a new stream is refused")
        assert not stopping.done()
        # The open stream still gets answers while the server drains.
        await old.write(request(types.ENDPOINT))
        assert (await old.read()).type_url == types.ENDPOINT

        await stopping
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await old.read()
        assert err.value.code() in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.CANCELLED)
