"""`Agent`: the node agent. Keeps the data plane enabled and the maps equal to what the control
plane sends over one delta ADS stream: this node's `NodeServiceMap` (subscribed by name) and
every `MeshService` (wildcard), joined by `MapView`.

A response that validates is applied and ACKed. One that does not is NACKed with the reason: a
bad node map changes nothing; a bad `MeshService` keeps that Service's last good entries while
the rest of the response applies (one bad Service must not stop every other update).

Until both types have answered once the maps are left as they are (after a restart they still
hold the last run's map; the first type's responses are ACKed meanwhile); then they are
converged once (`NodeMaps.apply`), and afterwards each response writes only the
entries it touches (`NodeMaps.patch`). A kernel write that fails NACKs, and the agent converges
whole again with backoff until it succeeds. The stream reconnects with backoff, resuming with
the versions the agent holds, and the maps stay in force while it is down; keepalive pings
notice a stream whose path went dark without an error.

The node Envoy's cgroup id is the agent's own setting, not the control plane's: written at
start, and again whenever the directory `--envoy-cgroup` names is a new cgroup.
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path

import grpc
from envoy.config.core.v3 import base_pb2
from envoy.service.discovery.v3 import discovery_pb2
from google.rpc import status_pb2  # type: ignore[import-untyped]

from nodemesh.api import (
    NODE_TYPE_URL,
    SERVICE_TYPE_URL,
    MapView,
    MeshService,
    NodePart,
    node_from_proto,
    service_from_proto,
)
from nodemesh.api import servicemap_pb2 as pb
from nodemesh.ebpf.errors import NodemeshEbpfError
from nodemesh.ebpf.loader import Dataplane
from nodemesh.ebpf.maps import ApplyResult, NodeMaps, SocketRedirect, svc6_key

__all__ = ["Agent"]

log = logging.getLogger(__name__)

_METHOD = "/envoy.service.discovery.v3.AggregatedDiscoveryService/DeltaAggregatedResources"
_INVALID_ARGUMENT = 3
_TYPES = (NODE_TYPE_URL, SERVICE_TYPE_URL)
# (seconds between HTTP/2 pings, seconds to wait for the answer): what the node Envoy's own
# xDS connection uses (xds/bootstrap.py), and what the ADS server allows. A stream whose path
# went dark without a FIN or a RST (a partition, a control-plane node that lost power) gives
# no error by itself: without pings the agent would wait on it for good.
KEEPALIVE = (30.0, 10.0)
# The largest response taken: what the ADS server sends at most (xds/server). A new stream's
# first MeshService response holds every Service; gRPC's default (4 MiB) is reached by 2,000
# Services of 100 endpoints, and a refused response came again on every reconnect.
MAX_RESPONSE_BYTES = 256 * 1024 * 1024
# Seconds between two looks at the directory --envoy-cgroup names. When it is removed and made
# again (systemd does so when it restarts a service) it is a new cgroup with a new id, and the
# node Envoy's connections from it are rewritten like a pod's until the agent writes that id,
# one poll after the new cgroup appears (longer while a large map write holds the loop). A
# stat() and a map read each time.
ENVOY_CGROUP_POLL = 0.2
# Seconds between two tries to take the pin root while another agent holds it (a DaemonSet
# rollout with maxSurge starts the new pod before the old one stops).
PIN_ROOT_POLL = 0.5


class Agent:
    """Run with `await agent.run()`; cancel the task to stop. The data plane stays installed.
    One agent at a time per pin root: a second one waits until the first has stopped."""

    def __init__(
        self,
        node: str,
        controlplane: str,
        dataplane: Dataplane,
        envoy_cgroup: Path | None = None,
        max_backoff: float = 5.0,
        socket_redirect: SocketRedirect = SocketRedirect.ALL,
        keepalive: tuple[float, float] = KEEPALIVE,
        envoy_cgroup_poll: float = ENVOY_CGROUP_POLL,
    ) -> None:
        self.node = node
        self.controlplane = controlplane
        self.dataplane = dataplane
        self.envoy_cgroup = Path(envoy_cgroup) if envoy_cgroup else None
        self.envoy_cgroup_id = os.stat(envoy_cgroup).st_ino if envoy_cgroup else 0
        self.envoy_cgroup_poll = envoy_cgroup_poll
        self.max_backoff = max_backoff
        self.socket_redirect = socket_redirect
        self.keepalive = keepalive
        self.view = MapView(node)
        # per type, the resources applied (name -> version): resumed on reconnect
        self.versions: dict[str, dict[str, str]] = {t: {} for t in _TYPES}
        self._answered: set[str] = set()  # types answered at least once since start
        self._converged = False  # the maps were made equal to the view once
        self._repair: asyncio.Task[None] | None = None
        self.last_error = ""
        self.responses = 0  # received, over every stream
        self.nacks = 0  # responses NACKed
        self.last_response_at = 0.0  # time.time() of the last response (0: none yet)

    async def run(self, owned: Callable[[], Awaitable[object]] | None = None) -> None:
        """`owned`: awaited once the pin root is this agent's, before anything is installed
        (what must not start while another agent runs: the metrics listener on its port)."""
        lock = await self._own_pin_root()
        try:
            if owned is not None:
                await owned()
            await self._run()
        finally:
            os.close(lock)  # the next agent may take over

    async def _own_pin_root(self) -> int:
        """Wait until no other agent holds the pin root, and hold it. A second agent would
        converge the maps to its own view (another --node, another control plane, another
        --socket-redirect), and the two would overwrite each other at every change."""
        waited = False
        while (lock := self.dataplane.try_lock()) is None:
            if not waited:
                log.warning(
                    "node %s: another agent (%s) runs on the pin root %s: waiting until it "
                    "stops, touching nothing meanwhile (one agent per node)",
                    self.node,
                    self.dataplane.lock_holder(),
                    self.dataplane.pin_root,
                )
                waited = True
            await asyncio.sleep(PIN_ROOT_POLL)
        if waited:
            log.warning("node %s: the other agent stopped; taking over", self.node)
        return lock

    async def _run(self) -> None:
        result = self.dataplane.enable()
        log.info("node %s: data plane %s", self.node, result)
        backoff = 0.1
        with NodeMaps(self.dataplane.pin_root) as maps:
            maps.set_socket_redirect(self.socket_redirect)
            follow = None
            if self.envoy_cgroup is not None:
                follow = asyncio.get_running_loop().create_task(self._follow_envoy_cgroup(maps))
            try:
                while True:
                    answered = self.responses
                    try:
                        await self._stream(maps)
                        log.warning("ADS stream to %s: closed by the server", self.controlplane)
                    except grpc.aio.AioRpcError as exc:
                        log.warning(
                            "ADS stream to %s: %s %s", self.controlplane, exc.code(), exc.details()
                        )
                    if self.responses != answered:
                        backoff = 0.1  # the stream worked: this outage starts from the beginning
                    await asyncio.sleep(backoff)
                    backoff = min(backoff * 2, self.max_backoff)
            finally:
                for task in (self._repair, follow):
                    if task is not None:
                        task.cancel()  # they write through `maps`, closed next

    async def _stream(self, maps: NodeMaps) -> None:
        node = base_pb2.Node(id=self.node, cluster="nodemesh-agent")
        outbox: asyncio.Queue[discovery_pb2.DeltaDiscoveryRequest] = asyncio.Queue()

        async def requests() -> AsyncIterator[discovery_pb2.DeltaDiscoveryRequest]:
            while True:
                yield await outbox.get()

        for type_url, names in ((NODE_TYPE_URL, [self.node]), (SERVICE_TYPE_URL, ["*"])):
            await outbox.put(
                discovery_pb2.DeltaDiscoveryRequest(
                    node=node,
                    type_url=type_url,
                    resource_names_subscribe=names,
                    initial_resource_versions=self.versions[type_url],
                )
            )
        options = (
            ("grpc.keepalive_time_ms", round(self.keepalive[0] * 1000)),
            ("grpc.keepalive_timeout_ms", round(self.keepalive[1] * 1000)),
            # gRPC 1.85 waits for a ping's answer the longer of these two (60 s by default)
            ("grpc.http2.ping_timeout_ms", round(self.keepalive[1] * 1000)),
            # by default it sends at most 2 pings while no data goes out, and an agent's
            # stream is quiet between changes: keepalive would stop after two
            ("grpc.http2.max_pings_without_data", 0),
            ("grpc.max_receive_message_length", MAX_RESPONSE_BYTES),
        )
        async with grpc.aio.insecure_channel(self.controlplane, options=options) as channel:
            call = channel.stream_stream(
                _METHOD,
                request_serializer=discovery_pb2.DeltaDiscoveryRequest.SerializeToString,
                response_deserializer=discovery_pb2.DeltaDiscoveryResponse.FromString,
            )(requests())
            log.info("ADS stream to %s open", self.controlplane)
            async for response in call:
                self.responses += 1
                self.last_response_at = time.time()
                if response.type_url in self.versions:
                    await outbox.put(self._answer(maps, response))

    def _answer(
        self, maps: NodeMaps, response: discovery_pb2.DeltaDiscoveryResponse
    ) -> discovery_pb2.DeltaDiscoveryRequest:
        ack = discovery_pb2.DeltaDiscoveryRequest(
            type_url=response.type_url, response_nonce=response.nonce
        )
        try:
            result = self.apply(maps, response)
        except (ValueError, NodemeshEbpfError) as exc:
            self.nacks += 1
            self.last_error = str(exc)
            log.error("NACK %s version %s: %s", self.node, response.system_version_info, exc)
            ack.error_detail.CopyFrom(status_pb2.Status(code=_INVALID_ARGUMENT, message=str(exc)))
            return ack
        self.last_error = ""
        log.info(
            "ACK %s %s version %s: %s",
            self.node,
            response.type_url.rpartition(".")[2],
            response.system_version_info,
            result if result is not None else "held until both types have answered",
        )
        return ack

    def apply(
        self, maps: NodeMaps, response: discovery_pb2.DeltaDiscoveryResponse
    ) -> ApplyResult | None:
        """Validate, then update the view and the maps. Returns what was written; None while
        the first converge waits. A node map that does not validate changes nothing; a
        `MeshService` that does not validate keeps that Service's last good entries while the
        others in the response apply, and the response is NACKed naming it (ValueError)."""
        removed = tuple(response.removed_resources)
        keys4: set[tuple[str, int]] = set()
        keys6: set[tuple[str, int]] = set()
        refused: dict[str, str] = {}  # MeshService name -> why
        rezoned = False
        if response.type_url == NODE_TYPE_URL:
            part = self._node_part(response)
            if self.node in removed:
                part = NodePart(self.node)  # the control plane withdrew this node's map
            # another zone: entries that follow topology hints may pick other backends
            rezoned = part.zone != self.view.part.zone
            self.view.part = part
        else:
            upserts = []
            for r in response.resources:
                try:
                    upserts.append(self._mesh_service(r))
                except ValueError as exc:
                    refused[r.name] = str(exc)
            keys4, keys6 = self.view.update(upserts, removed)
        versions = self.versions[response.type_url]
        for name in (*removed, *refused):
            versions.pop(name, None)
        versions.update((r.name, r.version) for r in response.resources if r.name not in refused)
        self._answered.add(response.type_url)

        result: ApplyResult | None = None
        if self._converged and rezoned:
            self._converged = False  # written whole (only the entries that differ)
        if self._converged or self._answered == set(_TYPES):
            result = self._write(maps, response, keys4, keys6)
        if refused:
            raise ValueError(
                f"{len(refused)} of {len(response.resources)} MeshService resources refused "
                "(they keep their last good entries; the others applied): "
                + "; ".join(refused[n] for n in sorted(refused))
            )
        return result

    def _write(
        self,
        maps: NodeMaps,
        response: discovery_pb2.DeltaDiscoveryResponse,
        keys4: set[tuple[str, int]],
        keys6: set[tuple[str, int]],
    ) -> ApplyResult:
        try:
            if not self._converged:
                result = maps.apply(self.view.model(), self.envoy_cgroup_id, self.socket_redirect)
                self._converged = True
                return result
            if response.type_url == NODE_TYPE_URL:
                return maps.apply_node(self.view.part, self.envoy_cgroup_id, self.socket_redirect)
            return maps.patch(self.view, keys4, keys6)
        except NodemeshEbpfError:
            # The view holds what the control plane wants, the maps only part of it: converge
            # whole again, now with backoff (a NACKed version is not sent again until the
            # control plane changes something) and on the next response.
            self._converged = False
            versions = self.versions[response.type_url]
            for name in {r.name for r in response.resources} | set(response.removed_resources):
                versions.pop(name, None)  # so a resumed stream sends them again
            self._start_repair(maps)
            raise

    def _start_repair(self, maps: NodeMaps) -> None:
        if self._repair is None or self._repair.done():
            self._repair = asyncio.get_running_loop().create_task(self._repair_maps(maps))

    async def _repair_maps(self, maps: NodeMaps) -> None:
        backoff = 0.5
        while not self._converged:
            await asyncio.sleep(backoff)
            if self._converged:
                return  # a response converged them meanwhile
            try:
                result = maps.apply(self.view.model(), self.envoy_cgroup_id, self.socket_redirect)
            except NodemeshEbpfError as exc:
                log.error("node %s: converging the maps again failed: %s", self.node, exc)
                backoff = min(backoff * 2, self.max_backoff)
                continue
            self._converged = True
            self.last_error = ""
            log.info("node %s: maps converged again: %s", self.node, result)

    async def _follow_envoy_cgroup(self, maps: NodeMaps) -> None:
        """Keep nm_config's Envoy cgroup id that of the directory `--envoy-cgroup` names: at
        start (the maps may still hold a last run's, and stay otherwise untouched until the
        control plane answers), and whenever the directory is a new cgroup. While it is
        missing, the last id stays (a removed cgroup holds no process, and its id is never
        given to another)."""
        assert self.envoy_cgroup is not None
        problem = ""
        while True:
            try:
                cgroup_id = os.stat(self.envoy_cgroup).st_ino
                if cgroup_id != self.envoy_cgroup_id:
                    log.warning(
                        "node %s: --envoy-cgroup %s is a new cgroup (id %d, was %d): the node "
                        "Envoy's connections from it are left alone from now on",
                        self.node,
                        self.envoy_cgroup,
                        cgroup_id,
                        self.envoy_cgroup_id,
                    )
                    self.envoy_cgroup_id = cgroup_id  # for every later nm_config write
                maps.set_envoy_cgroup(cgroup_id)
                problem = ""
            except (OSError, NodemeshEbpfError) as exc:
                if str(exc) != problem:  # once, not every poll
                    problem = str(exc)
                    log.warning(
                        "node %s: --envoy-cgroup %s: %s (tried again every %.1f s; nm_config "
                        "keeps the id it holds until then)",
                        self.node,
                        self.envoy_cgroup,
                        exc,
                        self.envoy_cgroup_poll,
                    )
            await asyncio.sleep(self.envoy_cgroup_poll)

    def _node_part(self, response: discovery_pb2.DeltaDiscoveryResponse) -> NodePart:
        part = self.view.part
        for r in response.resources:
            msg = pb.NodeServiceMap()
            if not r.resource.Unpack(msg):
                raise ValueError(f"resource {r.name!r} is {r.resource.type_url}, not a node map")
            if r.name != self.node or msg.node != self.node:
                raise ValueError(f"service map is for node {msg.node!r}, not {self.node!r}")
            part = node_from_proto(msg)
        return part

    @staticmethod
    def _mesh_service(r: discovery_pb2.Resource) -> MeshService:
        msg = pb.MeshService()
        if not r.resource.Unpack(msg):
            raise ValueError(f"resource {r.name!r} is {r.resource.type_url}, not a MeshService")
        svc = service_from_proto(msg)
        if svc.name != r.name:
            raise ValueError(f"MeshService {svc.name!r} sent under the name {r.name!r}")
        # `ipaddress` (the check above, and the control plane's) takes an IPv6 address with
        # a zone ("fd00::1%eth0"), which no kernel key holds: refused here, so it is NACKed
        # instead of raising from the map write (which ended the agent, after every restart).
        bad = []
        for e in svc.services_ipv6:
            try:
                svc6_key(e)
            except OSError:
                bad.append(
                    f"service {e.name} ([{e.address}]:{e.port}): {e.address!r} cannot be a "
                    "kernel map key (a ClusterIP has no zone)"
                )
        if bad:
            raise ValueError(f"MeshService {svc.name!r}: " + "; ".join(bad))
        return svc
