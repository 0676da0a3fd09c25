"""The node agent against the real ADS server: ACK/NACK, restart without disruption, uninstall."""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import json
import os
import socket
import subprocess
import sys
import threading
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from nodemesh.api import (
    NODE_TYPE_URL,
    SERVICE_TYPE_URL,
    Backend,
    NodeMap,
    Service,
    node_to_proto,
    service_to_proto,
    split,
)
from nodemesh.api import servicemap_pb2 as pb
from nodemesh.ebpf import NodeMaps
from nodemesh.ebpf import _libbpf as bpf
from nodemesh.ebpf import _maps as m
from nodemesh.ebpf._maps import NM_CFG_REDIRECT_OPTED_IN, NM_CFG_SOCKET_REDIRECT
from nodemesh.ebpf.agent import Agent
from nodemesh.ebpf.loader import MAP_NAMES, Dataplane
from nodemesh.ebpf.maps import addr_text
from nodemesh.ebpf.probe import sockmap_reads_are_safe
from nodemesh.ebpf.testing import NodeLab, Proc
from nodemesh.xds.cache import Resource, Snapshot, SnapshotCache
from nodemesh.xds.server import AdsServer
from tests.ebpf.conftest import VIP, pin_other_version
from tests.support import free_port, http_get, metric, parse_metrics

NODE = "node-under-test"


@dataclass
class ControlPlane:
    cache: SnapshotCache
    server: AdsServer
    port: int
    lab: NodeLab

    def publish(self, model: NodeMap, *extra: pb.MeshService, node: str = NODE) -> dict[str, str]:
        """Serve `model` to `node` as the control plane does (its node part and one
        MeshService per Service), plus `extra` MeshService messages as they are; returns the
        versions by type."""
        part, services = split(model)
        messages = [service_to_proto(s) for s in services] + list(extra)
        snap = Snapshot(
            {
                NODE_TYPE_URL: [
                    Resource.from_message(node_to_proto(part), name=node, type_url=NODE_TYPE_URL)
                ],
                SERVICE_TYPE_URL: [
                    Resource.from_message(m, name=m.name, type_url=SERVICE_TYPE_URL)
                    for m in messages
                ],
            }
        )
        self.cache.set_snapshot(node, snap)
        versions = {t: snap.version(t) for t in (NODE_TYPE_URL, SERVICE_TYPE_URL)}
        return {t: v for t, v in versions.items() if v is not None}

    def acked(self, versions: dict[str, str], node: str = NODE) -> bool:
        return all(self.type_status(t, node).get("version_acked") == v for t, v in versions.items())

    def map_for(self, *backends: str, node: str = NODE) -> NodeMap:
        pods = self.lab.pods
        ready = tuple(Backend(pods[b].ip, 7000) for b in backends)
        return NodeMap(
            node,
            (Service("shop/echo:80", VIP, 80, False, ready),),
            envoy=(self.lab.gateway, 15001),
            local_addresses=tuple(p.ip for p in pods.values()),
        )

    def type_status(self, type_url: str = SERVICE_TYPE_URL, node: str = NODE) -> dict[str, object]:
        status = self.server.status.snapshot().get(node, {})
        return dict(status.get("types", {}).get(type_url.rpartition(".")[2], {}))

    def start_agent(self, node: str = NODE, *extra: str) -> Proc:
        lab = self.lab
        argv = [
            sys.executable, "-m", "nodemesh", "agent", "--node", node,
            "--controlplane", f"127.0.0.1:{self.port}", "--cgroup", str(lab.cgroup),
            "--envoy-cgroup", str(lab.envoy_cgroup), "--pin-root", str(lab.pin_root), *extra,
        ]  # fmt: skip
        return lab.spawn(argv, "agent")


async def until(cond: Callable[[], object], what: str, timeout: float = 20) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.05)


@pytest.fixture
async def cp(node: NodeLab) -> AsyncIterator[ControlPlane]:
    for name in ("b", "c"):
        node.pods[name].serve(7000)
    cache = SnapshotCache()
    server = AdsServer(cache)
    port = await server.start("127.0.0.1:0")
    plane = ControlPlane(cache, server, port, node)
    try:
        yield plane
    finally:
        await plane.server.stop(0)  # a test may have restarted it


def backends(lab: NodeLab, address: str, port: int) -> list[str]:
    """The backend addresses the kernel map holds for a Service entry ([] without one)."""
    with NodeMaps(lab.pin_root) as maps:
        svc = maps.services().get((address, port))
    return [] if svc is None else [addr_text(b.addr) for b in svc.backends[: svc.n_backends]]


def _uninstall(lab: NodeLab) -> subprocess.CompletedProcess[str]:
    """`nodemesh agent --uninstall` on the lab's cgroup and pin root, as an operator runs it."""
    return subprocess.run(
        [sys.executable, "-m", "nodemesh", "agent", "--uninstall", "--cgroup", str(lab.cgroup),
         "--pin-root", str(lab.pin_root)],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip


def _stop(proc: Proc) -> None:
    proc.popen.terminate()
    assert proc.popen.wait(10) == 0, proc.stderr()


async def test_agent_acks_and_programs_the_service_map(cp: ControlPlane) -> None:
    version = cp.publish(cp.map_for("b"))
    cp.start_agent()
    await until(lambda: cp.acked(version), "the agent's ACK")

    a = cp.lab.pods["a"]
    result = await asyncio.to_thread(a.tool, "conns", "--to", f"{VIP}:80", "--count", "5")
    assert result == {"backends": {"b": 5}, "errors": {}}
    # --socket-redirect=auto (the default): for every pod exactly when the kernel passes the
    # probe, else for the pods that opted in only
    probe = await asyncio.to_thread(sockmap_reads_are_safe)
    with NodeMaps(cp.lab.pin_root) as maps:
        flags = maps.config().flags & (NM_CFG_SOCKET_REDIRECT | NM_CFG_REDIRECT_OPTED_IN)
    assert flags == (NM_CFG_SOCKET_REDIRECT if probe.ok else NM_CFG_REDIRECT_OPTED_IN), probe


async def test_agent_nacks_a_bad_service_and_applies_the_rest(cp: ControlPlane) -> None:
    """One response carries a good change (echo to c) and a Service that does not validate:
    the agent NACKs naming the bad one, and the good change still applies (one bad Service
    must not freeze every other on every node). Its /metrics count the NACK and say it is
    rejecting."""
    good = cp.publish(cp.map_for("b"))
    port = free_port()
    cp.start_agent(NODE, "--metrics-listen", f"127.0.0.1:{port}")
    await until(lambda: cp.acked(good), "the first ACK")

    bad = service_to_proto(split(cp.map_for("c"))[1][0])
    bad.name = "shop/bad"
    bad.services[0].address, bad.services[0].mode = "10.96.0.99", pb.Service.MODE_UNSPECIFIED
    bad_version = cp.publish(cp.map_for("c"), bad)[SERVICE_TYPE_URL]
    await until(lambda: cp.type_status().get("last_nack") is not None, "the NACK")

    nack = cp.type_status()["last_nack"]
    assert isinstance(nack, dict)
    assert nack["version"] == bad_version and "mode is unset" in nack["message"]
    assert "1 of 2 MeshService resources refused" in nack["message"]
    assert "shop/bad" in nack["message"]
    a = cp.lab.pods["a"]
    result = await asyncio.to_thread(a.tool, "conns", "--to", f"{VIP}:80", "--count", "5")
    assert result["backends"] == {"c": 5}, "the good change must apply"
    with NodeMaps(cp.lab.pin_root) as maps:
        assert ("10.96.0.99", 80) not in maps.services(), "the bad Service is not written"
    reply = await asyncio.to_thread(http_get, f"http://127.0.0.1:{port}/metrics")
    m = parse_metrics(reply.body)
    assert metric(m, "nodemesh_agent_nacks_total") == 1
    assert metric(m, "nodemesh_agent_rejecting") == 1


async def agent_serving_b(cp: ControlPlane) -> tuple[Proc, Any]:
    """An agent that ACKed a map sending the VIP to pod b; the agent's process and the
    data plane's links then."""
    version = cp.publish(cp.map_for("b"))
    agent = cp.start_agent()
    await until(lambda: cp.acked(version), "the agent's ACK")
    assert cp.lab.dataplane is not None
    return agent, cp.lab.dataplane.links()


async def test_agent_restart_keeps_flows_and_attachments(cp: ControlPlane) -> None:
    lab = cp.lab
    agent, links_before = await agent_serving_b(cp)
    held = lab.pods["a"].hold(f"{VIP}:80")
    assert (await asyncio.to_thread(held.json)) == {"hello": "HELLO b"}

    _stop(agent)
    held.send("ping")
    assert (await asyncio.to_thread(held.json)) == {"ok": True}, "flow broke with agent down"
    a = lab.pods["a"]
    down = await asyncio.to_thread(a.tool, "conns", "--to", f"{VIP}:80", "--count", "3")
    assert down["backends"] == {"b": 3}, "the maps must keep working without the agent"

    cp.start_agent()
    v2 = cp.publish(cp.map_for("c"))
    await until(lambda: cp.acked(v2), "the restarted agent's ACK")

    assert lab.dataplane.links() == links_before, "restart must reuse links and programs"
    cgroup_progs = json.loads(
        subprocess.run(
            ["bpftool", "-j", "cgroup", "show", str(lab.cgroup)], capture_output=True, text=True
        ).stdout
    )
    assert sorted(p["name"] for p in cgroup_progs) == sorted(
        ["nm_sock4_connect", "nm_sock6_connect", "nm_sockops", "nm_getsockopt"]
    ), "no duplicate attachments"
    held.send("ping")
    assert (await asyncio.to_thread(held.json)) == {"ok": True}
    after = await asyncio.to_thread(a.tool, "conns", "--to", f"{VIP}:80", "--count", "5")
    assert after["backends"] == {"c": 5}


async def test_uninstall_leaves_nothing_behind(cp: ControlPlane) -> None:
    lab = cp.lab
    agent, links = await agent_serving_b(cp)
    map_ids = set(lab.dataplane.map_ids().values())
    prog_ids = {info.prog_id for info in links.values()}
    link_ids = {info.id for info in links.values()}
    assert len(links) == 7 and len(map_ids) == len(MAP_NAMES) == 11
    _stop(agent)

    proc = _uninstall(lab)
    assert proc.returncode == 0, proc.stderr

    assert not lab.pin_root.exists()

    def ids(kind: str) -> set[int]:
        out = subprocess.run(["bpftool", "-j", kind, "show"], capture_output=True, text=True)
        return {int(o["id"]) for o in json.loads(out.stdout or "[]")}

    # the kernel frees programs and maps after an RCU grace period: poll
    await until(lambda: not (ids("link") & link_ids), "links to go")
    await until(lambda: not (ids("prog") & prog_ids), "programs to go")
    await until(lambda: not (ids("map") & map_ids), "maps to go")
    # pods still talk, now over plain TCP
    a = lab.pods["a"]
    direct = await asyncio.to_thread(a.tool, "connect", "--to", f"{lab.pods['b'].ip}:7000")
    assert direct["ok"] and direct["hello"] == "HELLO b"
    with pytest.raises(Exception, match="open pinned object"):
        NodeMaps(lab.pin_root)


async def test_the_agents_metrics_count_what_the_kernel_did(cp: ControlPlane) -> None:
    """`--metrics-listen`: /metrics as a scraper reads it; the kernel's counters follow the
    pods' connections (L4 picks, the Envoy port's refusals) and the stream's answers."""
    lab = cp.lab
    port = free_port()
    version = cp.publish(cp.map_for("b"))
    cp.start_agent(NODE, "--metrics-listen", f"127.0.0.1:{port}")
    await until(lambda: cp.acked(version), "the agent's ACK")

    async def scrape() -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
        reply = await asyncio.to_thread(http_get, f"http://127.0.0.1:{port}/metrics")
        assert reply.status == 200, reply
        assert reply.headers["Content-Type"] == "text/plain; version=0.0.4; charset=utf-8"
        return parse_metrics(reply.body)

    before = await scrape()
    assert (metric(before, "nodemesh_agent_responses_total") or 0) >= 2  # both types
    assert metric(before, "nodemesh_agent_services") == 1
    assert metric(before, "nodemesh_agent_nacks_total") == 0
    assert metric(before, "nodemesh_agent_rejecting") == 0
    assert metric(before, "nodemesh_agent_kernel_counters") == 1
    assert (metric(before, "nodemesh_agent_last_response_timestamp_seconds") or 0) > 0

    conns = await asyncio.to_thread(
        lab.pods["a"].tool, "conns", "--to", f"{VIP}:80", "--count", "3"
    )
    assert conns["backends"] == {"b": 3}
    other = lab.outside_host("other")
    refused = await asyncio.to_thread(other.tool, "get", "--to", f"{lab.gateway}:15001")
    assert refused == {"status": 0, "errno": "ECONNREFUSED"}, refused

    after = await scrape()

    def grew(name: str) -> float:
        return (metric(after, name) or 0) - (metric(before, name) or 0)

    assert grew("nodemesh_agent_l4_picks_total") == 3
    assert grew("nodemesh_agent_envoy_refused_total") == 1


class Log:
    """The lines a process writes to stderr, read as they come (a thread)."""

    def __init__(self, proc: Proc) -> None:
        self.lines: list[str] = []
        assert proc.popen.stderr is not None
        self._stream = proc.popen.stderr
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        with contextlib.suppress(ValueError, OSError):  # closed by Proc.stop()
            for line in self._stream:
                self.lines.append(line)

    def find(self, text: str) -> str:
        return next((line for line in self.lines if text in line), "")


async def test_a_second_agent_on_the_node_waits_until_the_first_stops(cp: ControlPlane) -> None:
    """Two agents on one pin root (the DaemonSet installed twice, a rollout with maxSurge, an
    agent started by hand with a typo in --node): the second converged the maps to its own
    node map, so pods on the node were balanced to another node's backends, and the two
    would overwrite each other at every change. The second now waits, saying which process
    holds the node, and takes over once the first has stopped. Both with the same
    --metrics-listen (host network): the second opens it once it holds the node (it exited
    on the taken port before)."""
    lab = cp.lab
    port = free_port()
    metrics = ("--metrics-listen", f"127.0.0.1:{port}")
    mine = cp.publish(cp.map_for("b"))
    first = cp.start_agent(NODE, *metrics)
    await until(lambda: cp.acked(mine), "the first agent's ACK")
    typo = "node-under-tset"
    theirs = cp.publish(cp.map_for("c", node=typo), node=typo)
    second = cp.start_agent(typo, *metrics)
    log = Log(second)
    waiting = "waiting until it stops"
    await until(lambda: log.find(waiting) or cp.acked(theirs, typo), "the second agent")

    assert not cp.acked(theirs, typo), "the second agent took the node over"
    assert f"pid {first.popen.pid}" in log.find(waiting), log.lines
    assert backends(lab, VIP, 80) == [lab.pods["b"].ip]
    a = lab.pods["a"]
    result = await asyncio.to_thread(a.tool, "conns", "--to", f"{VIP}:80", "--count", "3")
    assert result == {"backends": {"b": 3}, "errors": {}}

    _stop(first)
    await until(lambda: cp.acked(theirs, typo), "the second agent, once the first stopped")
    assert log.find("the other agent stopped; taking over"), log.lines
    result = await asyncio.to_thread(a.tool, "conns", "--to", f"{VIP}:80", "--count", "3")
    assert result == {"backends": {"c": 3}, "errors": {}}
    assert second.popen.poll() is None, log.lines

    def served() -> bool:  # (a blocking GET of a few ms: the ADS server waits that long)
        try:
            reply = http_get(f"http://127.0.0.1:{port}/metrics")
        except OSError:
            return False
        return metric(parse_metrics(reply.body), "nodemesh_agent_services") == 1

    await until(served, "the second agent's /metrics")


async def test_an_agent_killed_while_it_writes_is_followed_by_the_next(cp: ControlPlane) -> None:
    """SIGKILL while the agent writes a large change (a node OOM kill, a kubelet giving up on
    a stop): the next agent is not kept waiting by the dead one's hold on the pin root, keeps
    its links, and ends with the maps equal to the control plane's, no entry of the earlier
    map left."""
    lab = cp.lab
    base = cp.map_for("b")
    many = tuple(Service(f"bulk/s{i}:80", f"10.244.254.{i}", 80, True) for i in range(1, 201))
    first = cp.publish(NodeMap(NODE, (*base.services, *many), base.envoy, base.local_addresses))
    agent = cp.start_agent()
    await until(lambda: cp.acked(first), "the first ACK")
    assert lab.dataplane is not None
    links = lab.dataplane.links()

    moved = cp.publish(cp.map_for("c"))  # 200 deletes and one write
    agent.popen.kill()
    assert agent.popen.wait(10) == -9
    cp.start_agent()
    await until(lambda: cp.acked(moved), "the next agent's ACK")

    assert lab.dataplane.links() == links
    with NodeMaps(lab.pin_root) as maps:
        assert set(maps.services()) == {(VIP, 80)}
    result = await asyncio.to_thread(
        lab.pods["a"].tool, "conns", "--to", f"{VIP}:80", "--count", "3"
    )
    assert result == {"backends": {"c": 3}, "errors": {}}


async def test_uninstall_refuses_while_an_agent_runs(cp: ControlPlane) -> None:
    """`nodemesh agent --uninstall` on a node whose agent runs removed every pin: the
    programs were detached, and the agent went on ACKing maps that no program read, so the
    control plane showed a healthy node without a data plane. Uninstall now refuses (exit 1,
    naming the agent's process) and changes nothing."""
    lab = cp.lab
    agent, links = await agent_serving_b(cp)

    proc = _uninstall(lab)

    assert proc.returncode == 1, proc.stderr
    assert f"an agent (pid {agent.popen.pid}) runs on the pin root" in proc.stderr
    assert lab.dataplane.links() == links
    moved = cp.publish(cp.map_for("c"))
    await until(lambda: cp.acked(moved), "the ACK of a new map")
    a = lab.pods["a"]
    result = await asyncio.to_thread(a.tool, "conns", "--to", f"{VIP}:80", "--count", "3")
    assert result == {"backends": {"c": 3}, "errors": {}}


async def test_a_failed_map_write_is_nacked_and_repaired_without_a_new_response(
    cp: ControlPlane,
) -> None:
    """nm_services full of entries the agent did not write (keys in 198.51.100.0/24,
    TEST-NET-2): a new Service cannot be written (E2BIG). The agent NACKs, then its repair
    loop converges the maps whole on its own, with no new response from the control plane:
    the stale entries go first, so the new Service fits."""
    first = cp.publish(cp.map_for("b"))
    cp.start_agent()
    await until(lambda: cp.acked(first), "the first ACK")

    fd = bpf.obj_get(str(cp.lab.pin_root / "nm_services"))
    try:
        capacity = bpf.map_info(fd, "nm_services").max_entries
        with NodeMaps(cp.lab.pin_root) as maps:
            room = capacity - len(maps.services())
        base = int.from_bytes(socket.inet_aton("198.51.100.0"), "little")
        junk = m.Service()
        for i in range(room):
            key = m.SvcKey(base + ((i & 0xFF) << 24), socket.htons(1024 + (i >> 8)), 0)
            bpf.map_update(fd, key, junk, "nm_services")
    finally:
        os.close(fd)

    pods = cp.lab.pods
    grown = cp.map_for("b")
    new = Service("shop/new:80", "10.96.0.77", 80, False, (Backend(pods["c"].ip, 7000),))
    grown = NodeMap(NODE, (*grown.services, new), grown.envoy, grown.local_addresses)
    version = cp.publish(grown)[SERVICE_TYPE_URL]
    await until(lambda: cp.type_status().get("last_nack") is not None, "the NACK")
    nack = cp.type_status()["last_nack"]
    assert isinstance(nack, dict) and nack["version"] == version, nack
    # says what is wrong, not the kernel's "E2BIG (Argument list too long)"
    assert f"nm_services is full: it holds {capacity} entries" in nack["message"], nack

    def repaired() -> bool:
        with NodeMaps(cp.lab.pin_root) as maps:
            return set(maps.services()) == {(VIP, 80), ("10.96.0.77", 80)}

    await until(repaired, "the repair loop to converge the maps", timeout=30)
    result = await asyncio.to_thread(
        pods["a"].tool, "conns", "--to", "10.96.0.77:80", "--count", "3"
    )
    assert result == {"backends": {"c": 3}, "errors": {}}


class Partition:
    """A TCP relay to the control plane whose connections can be cut off silently, like a
    network partition or a control-plane node that lost power: `cut()` drops every byte on
    the connections open now, both ways, and closes nothing, so neither end gets a FIN or a
    RST. Connections made afterwards are relayed again."""

    def __init__(self, target: int) -> None:
        self.target = target
        self.port = 0
        self.accepted = 0
        self._server: asyncio.Server | None = None
        self._live: list[list[bool]] = []  # per connection: [cut]
        self._tasks: set[asyncio.Task[None]] = set()
        self._writers: list[asyncio.StreamWriter] = []

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._accept, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]

    def cut(self) -> None:
        for state in self._live:
            state[0] = True

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.accepted += 1
        up_reader, up_writer = await asyncio.open_connection("127.0.0.1", self.target)
        self._writers += [writer, up_writer]
        state = [False]
        self._live.append(state)
        for src, dst in ((reader, up_writer), (up_reader, writer)):
            task = asyncio.create_task(self._relay(src, dst, state))
            self._tasks.add(task)

    @staticmethod
    async def _relay(
        src: asyncio.StreamReader, dst: asyncio.StreamWriter, state: list[bool]
    ) -> None:
        while data := await src.read(65536):
            if not state[0]:
                dst.write(data)
        if not state[0]:
            dst.close()

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
        for task in self._tasks:
            task.cancel()
        for w in self._writers:
            w.close()


async def test_the_agent_leaves_a_silently_dead_stream_and_resyncs(cp: ControlPlane) -> None:
    """The path to the control plane goes dark without a FIN or a RST (a partition, a
    control-plane node that lost power): the agent's keepalive notices, it reconnects, and a
    change made meanwhile reaches the kernel map. Without keepalive the agent waited on the
    dead stream for good, and the node kept its old map until the agent restarted."""
    lab = cp.lab
    relay = Partition(cp.port)
    await relay.start()
    assert lab.dataplane is not None
    agent = Agent(
        NODE,
        f"127.0.0.1:{relay.port}",
        lab.dataplane,
        lab.envoy_cgroup,
        keepalive=(1.0, 1.0),
    )
    task = asyncio.create_task(agent.run())
    try:
        first = cp.publish(cp.map_for("b"))
        await until(lambda: cp.acked(first), "the first ACK")
        relay.cut()
        cp.publish(cp.map_for("c"))

        await until(
            lambda: backends(lab, VIP, 80) == [lab.pods["c"].ip],
            "the change made during the partition",
            timeout=20,
        )
        assert relay.accepted == 2, "one reconnect"
        result = await asyncio.to_thread(
            lab.pods["a"].tool, "conns", "--to", f"{VIP}:80", "--count", "3"
        )
        assert result == {"backends": {"c": 3}, "errors": {}}
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
        await relay.close()


async def test_the_agent_takes_a_response_larger_than_grpcs_default_limit(
    cp: ControlPlane,
) -> None:
    """120 Services of 2,000 endpoints each: one MeshService response of about 5 MB, more than
    gRPC's default limit for a received message (4 MiB). The server sends up to 256 MiB; the
    agent refused the response (RESOURCE_EXHAUSTED), reconnected, got it again, and the node
    never got its map. A mesh reaches 4 MiB with 2,000 Services of 100 endpoints, or about
    20,000 small ones."""
    base = cp.map_for("b")
    big = tuple(
        Service(
            f"bulk/s{i}:{1000 + i}",
            "10.244.255.99",
            1000 + i,
            False,
            tuple(Backend(f"10.251.{j >> 8}.{j & 0xFF}", 8080) for j in range(2000)),
        )
        for i in range(120)
    )
    model = NodeMap(NODE, (*base.services, *big), base.envoy, base.local_addresses)
    size = sum(len(service_to_proto(s).SerializeToString()) for s in split(model)[1])
    assert size > 4 << 20, size
    version = cp.publish(model)
    agent = cp.start_agent()
    await until(lambda: cp.acked(version), f"the ACK of {size} bytes", timeout=60)

    assert agent.popen.poll() is None
    with NodeMaps(cp.lab.pin_root) as maps:
        services = maps.services()
    assert len(services) == 121
    assert services[("10.244.255.99", 1000)].n_backends == m.MAX_BACKENDS
    result = await asyncio.to_thread(
        cp.lab.pods["a"].tool, "conns", "--to", f"{VIP}:80", "--count", "3"
    )
    assert result == {"backends": {"b": 3}, "errors": {}}


async def test_a_control_plane_restart_after_a_long_outage_is_followed_at_once(
    cp: ControlPlane, caplog: pytest.LogCaptureFixture
) -> None:
    """The agent starts while the control plane is down, so its reconnect backoff climbs to
    the maximum. Once a stream worked, the next outage starts from the shortest wait again: a
    control-plane restart is followed within a second. Before, the backoff never went back
    after a stream that ended in an error, so every later restart waited the maximum (5 s by
    default) before the first try."""
    lab = cp.lab
    assert lab.dataplane is not None
    await cp.server.stop(0)
    agent = Agent(NODE, f"127.0.0.1:{cp.port}", lab.dataplane, lab.envoy_cgroup, max_backoff=3.2)
    task = asyncio.create_task(agent.run())

    def failures() -> int:
        return sum("ADS stream to" in r.getMessage() for r in caplog.records)

    async def restart() -> None:
        cp.cache = SnapshotCache()
        cp.server = AdsServer(cp.cache)
        await cp.server.start(f"127.0.0.1:{cp.port}")

    try:
        with caplog.at_level("WARNING", logger="nodemesh.ebpf.agent"):
            # 0.1 + 0.2 + 0.4 + 0.8 + 1.6 s: the next wait is the maximum, 3.2 s
            await until(lambda: failures() >= 5, "five failed connects")
            await restart()
            first = cp.publish(cp.map_for("b"))
            await until(lambda: cp.acked(first), "the first ACK", timeout=10)

            await cp.server.stop(0)
            await restart()
            cp.publish(cp.map_for("c"))
            start = time.monotonic()
            await until(
                lambda: backends(lab, VIP, 80) == [lab.pods["c"].ip], "the restart", timeout=10
            )
            took = time.monotonic() - start
        # the broken agent waits the maximum, 3.2 s, at least; a loaded CI machine gets slack
        assert took < 2.5, f"{took:.1f} s to follow a control-plane restart"
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task


async def test_an_ipv6_cluster_ip_with_a_zone_is_refused_not_fatal(cp: ControlPlane) -> None:
    """A MeshService whose IPv6 ClusterIP carries a zone ("fd00:96::11%eth0": Python's
    ipaddress takes it, and so did the control plane in files mode) is NACKed naming it, and
    the rest of the response applies. The agent died on it before (inet_pton raised OSError
    out of the stream), and again after every restart, so no change reached the node."""
    first = cp.publish(cp.map_for("b"))
    agent = cp.start_agent()
    await until(lambda: cp.acked(first), "the first ACK")

    zoned = pb.MeshService(
        name="shop/zoned",
        services_ipv6=[
            pb.ServiceIPv6(name="shop/zoned:80", address="fd00:96::11%eth0", port=80, target=VIP)
        ],
    )
    cp.publish(cp.map_for("c"), zoned)
    await until(lambda: cp.type_status().get("last_nack") is not None, "the NACK")

    nack = cp.type_status()["last_nack"]
    assert isinstance(nack, dict) and "shop/zoned" in nack["message"], nack
    assert "fd00:96::11%eth0" in nack["message"], nack
    assert agent.popen.poll() is None, agent.stderr()
    assert backends(cp.lab, VIP, 80) == [cp.lab.pods["c"].ip], "the good change must apply"
    with NodeMaps(cp.lab.pin_root) as maps:
        assert maps.services_ipv6() == {}


def test_a_missing_envoy_cgroup_is_one_line_and_exit_2(tmp_path: Path) -> None:
    """It was a Python traceback from os.stat, after the argument parsing said nothing."""
    done = subprocess.run(
        [sys.executable, "-m", "nodemesh", "agent", "--node", NODE, "--controlplane",
         "127.0.0.1:1", "--cgroup", str(tmp_path), "--envoy-cgroup", str(tmp_path / "nope")],
        capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip
    assert done.returncode == 2, done.stderr
    assert "Traceback" not in done.stderr
    assert f"--envoy-cgroup {tmp_path / 'nope'}: no such cgroup directory" in done.stderr


def test_a_pin_root_off_bpffs_is_one_line_and_exit_1(tmp_path: Path) -> None:
    """A --pin-root on another filesystem (a hostPath that is not /sys/fs/bpf): libbpf
    refused the first pin with EINVAL, and the agent's one line blamed "a pinned map with an
    older layout" and asked for `disable()`."""
    done = subprocess.run(
        [sys.executable, "-m", "nodemesh", "agent", "--node", NODE, "--controlplane",
         "127.0.0.1:1", "--cgroup", str(tmp_path), "--pin-root", str(tmp_path / "pins"),
         "--socket-redirect", "off"],
        capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip
    assert done.returncode == 1, done.stderr
    assert "Traceback" not in done.stderr
    assert f"pin root {tmp_path / 'pins'}: not on a bpf filesystem" in done.stderr
    assert not (tmp_path / "pins").exists()


def test_a_cgroup_that_is_not_cgroup_v2_is_one_line_and_pins_nothing(
    lab: NodeLab, tmp_path: Path
) -> None:
    """A --cgroup that is a plain directory (or a cgroup v1 one, on a hybrid host) failed at
    the first link with "create link nm_sock4_connect ...: EBADF", which said nothing about
    the path, and left every map pinned under the pin root."""
    plain = tmp_path / "not-a-cgroup"
    plain.mkdir()
    pin_root = lab.pin_root.with_name(lab.pin_root.name + "-v1")
    try:
        done = subprocess.run(
            [sys.executable, "-m", "nodemesh", "agent", "--node", NODE, "--controlplane",
             "127.0.0.1:1", "--cgroup", str(plain), "--pin-root", str(pin_root),
             "--socket-redirect", "off"],
            capture_output=True, text=True, timeout=60, check=False,
        )  # fmt: skip
        assert done.returncode == 1, done.stderr
        assert "Traceback" not in done.stderr
        assert f"cgroup {plain}: not a cgroup v2 directory (it is on filesystem type " in (
            done.stderr
        ), done.stderr
        pinned = [p for p in pin_root.rglob("*") if p.is_file()] if pin_root.exists() else []
        assert pinned == [], pinned
    finally:
        if pin_root.exists():
            Dataplane(lab.cgroup, pin_root).disable()  # (removes the pin root too)


def test_an_agent_that_mounts_its_own_bpffs_says_its_pins_go_with_it(lab: NodeLab) -> None:
    """An agent in a container without the host's /sys/fs/bpf (a forgotten hostPath) mounts
    a bpffs of its own, whose pins go with the container's mount namespace: the programs are
    detached when the agent stops, where the docs promise a data plane that outlives it. The
    only word was an INFO "mounted bpffs"; it is now a WARNING that says what follows."""
    pin_root = lab.pin_root  # below /sys/fs/bpf, inside the private mount only
    agent = [sys.executable, "-m", "nodemesh", "agent", "--node", NODE, "--controlplane",
             "127.0.0.1:1", "--cgroup", str(lab.cgroup), "--pin-root", str(pin_root),
             "--socket-redirect", "off"]  # fmt: skip
    script = 'umount -l /sys/fs/bpf && exec "$@"'
    proc = lab.spawn(
        ["unshare", "-m", "--propagation", "private", "sh", "-c", script, "sh", *agent],
        "agent in its own mount namespace",
    )
    log = Log(proc)
    deadline = time.monotonic() + 60
    while not log.find("ADS stream to"):  # enabled, and trying its control plane
        assert proc.popen.poll() is None, log.lines
        assert time.monotonic() < deadline, log.lines
        time.sleep(0.05)
    proc.stop()

    line = log.find("mounted bpffs at /sys/fs/bpf")
    assert "WARNING" in line and "mount the host's /sys/fs/bpf" in line, log.lines
    assert not pin_root.exists(), "pinned in the host's bpffs"
    progs = subprocess.run(
        ["bpftool", "-j", "cgroup", "show", str(lab.cgroup)], capture_output=True, text=True
    ).stdout
    assert json.loads(progs.strip() or "[]") == [], "the pins went with the mount"


async def test_the_agent_starts_over_a_service_map_of_another_layout(cp: ControlPlane) -> None:
    """A rollback from a version whose Services held more backends (a larger nm_services
    value), or an upgrade to one: libbpf refused the pinned map, and the agent exited 1 on
    every restart ("... needs `disable()` first"), leaving the other version's programs and
    a map nobody kept. The agent replaces the map, says so, and converges it from the control
    plane."""
    lab = cp.lab
    pin_other_version(lab, "nm_services", ctypes.sizeof(m.Service) + 256, 65536)
    version = cp.publish(cp.map_for("b"))
    agent = cp.start_agent()
    log = Log(agent)
    await until(lambda: cp.acked(version) or agent.popen.poll() is not None, "the ACK")

    assert agent.popen.poll() is None, log.lines
    assert log.find("replacing pinned map nm_services"), log.lines
    assert log.find("nm_services: entries not copied"), log.lines
    a = lab.pods["a"]
    result = await asyncio.to_thread(a.tool, "conns", "--to", f"{VIP}:80", "--count", "3")
    assert result == {"backends": {"b": 3}, "errors": {}}


def _l7_at(lab: NodeLab, pod: str) -> NodeMap:
    """One L7 Service whose address is `pod`'s own (it stands for a ClusterIP: no kube-proxy
    here), so a connection the programs leave alone reaches the pod."""
    ip = lab.pods[pod].ip
    return NodeMap(
        NODE,
        (Service("shop/web:7000", ip, 7000, True),),
        envoy=(lab.gateway, 15001),
        local_addresses=tuple(p.ip for p in lab.pods.values()),
    )


async def test_the_agent_follows_a_replaced_envoy_cgroup(cp: ControlPlane) -> None:
    """The directory --envoy-cgroup names is removed and made again, as systemd does when it
    restarts a service: a new cgroup with a new id. The running agent writes the new id, and
    the node Envoy's connections from the new cgroup go where it said. The agent read the id
    once at start, so until it restarted they were sent to the node Envoy, itself (here
    nothing listens there: refused)."""
    lab = cp.lab
    b = lab.pods["b"]
    version = cp.publish(_l7_at(lab, "b"))
    agent = cp.start_agent()
    await until(lambda: cp.acked(version), "the ACK")
    hello_b = {"ok": True, "hello": "HELLO b", "peer": [b.ip, 7000]}
    assert await asyncio.to_thread(lab.host.tool, "connect", "--to", f"{b.ip}:7000") == hello_b

    lab.replace_envoy_cgroup()
    new_id = os.stat(lab.envoy_cgroup).st_ino

    def written() -> bool:
        with NodeMaps(lab.pin_root) as maps:
            return bool(maps.config().envoy_cgroup_id == new_id)

    await until(written, "the agent to write the new cgroup's id", timeout=10)
    assert await asyncio.to_thread(lab.host.tool, "connect", "--to", f"{b.ip}:7000") == hello_b
    assert agent.popen.poll() is None, "the same agent"


async def test_the_agent_writes_the_envoy_cgroup_before_its_first_map(cp: ControlPlane) -> None:
    """With the control plane down, a restarted agent leaves the maps as the last run wrote
    them, but not the node Envoy's cgroup id: that is the agent's own setting, and the last
    run's may name a cgroup Envoy left (a restart of both while the control plane is down)."""
    lab = cp.lab
    assert lab.dataplane is not None
    await cp.server.stop(0)
    with NodeMaps(lab.pin_root) as maps:
        maps.apply(_l7_at(lab, "b"), envoy_cgroup_id=1 << 40)  # a cgroup that is gone
    agent = Agent(NODE, f"127.0.0.1:{cp.port}", lab.dataplane, lab.envoy_cgroup)
    task = asyncio.create_task(agent.run())
    try:

        def written() -> bool:
            with NodeMaps(lab.pin_root) as maps:
                return bool(maps.config().envoy_cgroup_id == os.stat(lab.envoy_cgroup).st_ino)

        await until(written, "the agent to write its envoy cgroup's id", timeout=10)
        b = lab.pods["b"]
        hello = await asyncio.to_thread(lab.host.tool, "connect", "--to", f"{b.ip}:7000")
        assert hello == {"ok": True, "hello": "HELLO b", "peer": [b.ip, 7000]}
        assert agent.responses == 0, "no map came"
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task


@pytest.mark.parametrize("envoy", ["the node cgroup", "its parent"])
def test_an_envoy_cgroup_that_holds_the_pods_is_refused(tmp_path: Path, envoy: str) -> None:
    """Every cgroup below --envoy-cgroup is the node Envoy's, whose connections are never
    rewritten: one that is --cgroup or holds it would take every pod out of the mesh. (The
    pin root is no bpffs, so an agent that started anyway could pin nothing.)"""
    pods = tmp_path / "pods"
    pods.mkdir()
    named = pods if envoy == "the node cgroup" else tmp_path
    done = subprocess.run(
        [sys.executable, "-m", "nodemesh", "agent", "--node", NODE, "--controlplane",
         "127.0.0.1:1", "--cgroup", str(pods), "--envoy-cgroup", str(named),
         "--pin-root", str(tmp_path / "pins")],
        capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip
    assert done.returncode == 2, done.stderr
    assert "Traceback" not in done.stderr
    assert (
        f"--envoy-cgroup {named} is --cgroup {pods} or holds it: every connection from below "
        "it is left alone, so no pod would be in the mesh" in done.stderr
    ), done.stderr


def test_an_envoy_cgroup_deeper_than_the_programs_look_is_refused(tmp_path: Path) -> None:
    """connect4/6 look for the node Envoy's cgroup among a caller's ancestors down to level
    64: the Envoy in a deeper one would have its connections rewritten like a pod's."""
    (tmp_path / "pods").mkdir()
    deep = tmp_path.joinpath(*(f"l{i}" for i in range(64)))
    deep.mkdir(parents=True)
    done = subprocess.run(
        [sys.executable, "-m", "nodemesh", "agent", "--node", NODE, "--controlplane",
         "127.0.0.1:1", "--cgroup", str(tmp_path / "pods"), "--envoy-cgroup", str(deep),
         "--pin-root", str(tmp_path / "pins")],
        capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip
    assert done.returncode == 2, done.stderr
    assert f"--envoy-cgroup {deep} is at level " in done.stderr, done.stderr
    assert "look for the node Envoy's cgroup down to level 64" in done.stderr, done.stderr
