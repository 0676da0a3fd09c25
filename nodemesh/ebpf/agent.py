"""`Agent`: the node agent. Keeps the data plane enabled and the maps equal to the service map
the control plane sends over ADS (custom type `nodemesh.api.v1.NodeServiceMap`).

One SotW stream, one type, wildcard: every response carries the whole map of this node. A map
that applies is ACKed; one that does not is NACKed with the reason, and the maps keep the last
good map. The stream reconnects with backoff; the maps stay in force while it is down.
"""

from __future__ import annotations

import asyncio
import logging
import os
from collections.abc import AsyncIterator
from pathlib import Path

import grpc
from envoy.config.core.v3 import base_pb2
from envoy.service.discovery.v3 import discovery_pb2
from google.rpc import status_pb2  # type: ignore[import-untyped]

from nodemesh.api import TYPE_URL, NodeMap, from_proto
from nodemesh.api import servicemap_pb2 as pb
from nodemesh.ebpf.errors import NodemeshEbpfError
from nodemesh.ebpf.loader import Dataplane
from nodemesh.ebpf.maps import ApplyResult, NodeMaps

__all__ = ["Agent"]

log = logging.getLogger(__name__)

_METHOD = "/envoy.service.discovery.v3.AggregatedDiscoveryService/StreamAggregatedResources"
_INVALID_ARGUMENT = 3


class Agent:
    """Run with `await agent.run()`; cancel the task to stop. The data plane stays installed."""

    def __init__(
        self,
        node: str,
        controlplane: str,
        dataplane: Dataplane,
        envoy_cgroup: Path | None = None,
        max_backoff: float = 5.0,
        socket_redirect: bool = True,
    ) -> None:
        self.node = node
        self.controlplane = controlplane
        self.dataplane = dataplane
        self.envoy_cgroup_id = os.stat(envoy_cgroup).st_ino if envoy_cgroup else 0
        self.max_backoff = max_backoff
        self.socket_redirect = socket_redirect
        self.applied_version = ""
        self.last_error = ""

    async def run(self) -> None:
        result = self.dataplane.enable()
        log.info("node %s: data plane %s", self.node, result)
        backoff = 0.1
        with NodeMaps(self.dataplane.pin_root) as maps:
            maps.set_socket_redirect(self.socket_redirect)
            while True:
                try:
                    await self._stream(maps)
                    backoff = 0.1
                except grpc.aio.AioRpcError as exc:
                    log.warning(
                        "ADS stream to %s: %s %s", self.controlplane, exc.code(), exc.details()
                    )
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, self.max_backoff)

    async def _stream(self, maps: NodeMaps) -> None:
        node = base_pb2.Node(id=self.node, cluster="nodemesh-agent")
        outbox: asyncio.Queue[discovery_pb2.DiscoveryRequest] = asyncio.Queue()

        async def requests() -> AsyncIterator[discovery_pb2.DiscoveryRequest]:
            while True:
                yield await outbox.get()

        await outbox.put(
            discovery_pb2.DiscoveryRequest(
                node=node, type_url=TYPE_URL, version_info=self.applied_version
            )
        )
        async with grpc.aio.insecure_channel(self.controlplane) as channel:
            call = channel.stream_stream(
                _METHOD,
                request_serializer=discovery_pb2.DiscoveryRequest.SerializeToString,
                response_deserializer=discovery_pb2.DiscoveryResponse.FromString,
            )(requests())
            log.info("ADS stream to %s open", self.controlplane)
            async for response in call:
                if response.type_url != TYPE_URL:
                    continue
                await outbox.put(self._answer(maps, node, response))

    def _answer(
        self, maps: NodeMaps, node: base_pb2.Node, response: discovery_pb2.DiscoveryResponse
    ) -> discovery_pb2.DiscoveryRequest:
        ack = discovery_pb2.DiscoveryRequest(
            node=node, type_url=TYPE_URL, response_nonce=response.nonce
        )
        try:
            result = self.apply(maps, response)
        except (ValueError, NodemeshEbpfError) as exc:
            self.last_error = str(exc)
            log.error("NACK %s version %s: %s", self.node, response.version_info, exc)
            ack.version_info = self.applied_version
            ack.error_detail.CopyFrom(status_pb2.Status(code=_INVALID_ARGUMENT, message=str(exc)))
            return ack
        self.applied_version = response.version_info
        self.last_error = ""
        log.info("ACK %s version %s: %s", self.node, response.version_info, result)
        ack.version_info = response.version_info
        return ack

    def apply(self, maps: NodeMaps, response: discovery_pb2.DiscoveryResponse) -> ApplyResult:
        if len(response.resources) > 1:
            raise ValueError(f"{len(response.resources)} service maps for one node, expected 1")
        if not response.resources:
            model = NodeMap(self.node)  # the control plane withdrew this node's map
        else:
            msg = pb.NodeServiceMap()
            if not response.resources[0].Unpack(msg):
                raise ValueError(f"resource is {response.resources[0].type_url}, not {TYPE_URL}")
            model = from_proto(msg)
            if model.node != self.node:
                raise ValueError(f"service map is for node {model.node!r}, not {self.node!r}")
        return maps.apply(model, self.envoy_cgroup_id, self.socket_redirect)
