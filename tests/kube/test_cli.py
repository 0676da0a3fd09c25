"""`nodemesh controlplane --source kubernetes` as a user runs it: a separate process that reads
a kubeconfig (pointing at the emulator), watches only `--namespace`, serves a real node Envoy,
writes status, and hands the Lease back on SIGTERM."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import urllib.error
import urllib.request
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from nodemesh.controlplane import cli
from nodemesh.controlplane import kube as kube_source
from nodemesh.envoy import EnvoyProcess
from nodemesh.xds.bootstrap import bootstrap
from tests.e2e.mesh import HttpBackend, endpoint_slice, service
from tests.e2e.objects import http_route, to
from tests.kube.conftest import ApiFront, Kube, eventually
from tests.kube.mesh import NodeEnvoy
from tests.kube.test_e2e import ready_node, status_shows
from tests.support import free_port

REPO = Path(__file__).resolve().parents[2]


class Process:
    def __init__(self, proc: subprocess.Popen[bytes], log: Path, xds: int, outbound: int) -> None:
        self.proc, self.log, self.xds, self.outbound = proc, log, xds, outbound
        self.http = 0

    async def terminate(self, timeout: float = 15.0) -> int | None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                await asyncio.to_thread(self.proc.wait, timeout)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                await asyncio.to_thread(self.proc.wait)
        return self.proc.returncode


def start(
    kube: Kube, tmp_path: Path, server: str = "", identity: str = "cli-replica", *extra: str
) -> Process:
    kubeconfig = tmp_path / "kubeconfig"
    kubeconfig.write_text(yaml.safe_dump({
        "apiVersion": "v1", "kind": "Config", "current-context": "kmock",
        "clusters": [{"name": "kmock", "cluster": {"server": server or kube.server}}],
        "users": [{"name": "cli", "user": {"token": "cli"}}],
        "contexts": [{"name": "kmock",
                      "context": {"cluster": "kmock", "user": "cli", "namespace": "nodemesh"}}],
    }))  # fmt: skip
    xds, http, outbound = free_port(), free_port(), free_port()
    log = tmp_path / f"{identity}.log"
    with log.open("wb") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "nodemesh", "controlplane", "--source", "kubernetes",
             "--xds-listen", f"127.0.0.1:{xds}", "--http-listen", f"127.0.0.1:{http}",
             "--outbound-listen", f"127.0.0.1:{outbound}",
             "--namespace", "shop", "--identity", identity, *extra],
            stdout=out, stderr=subprocess.STDOUT, cwd=REPO, start_new_session=True,
            env={**os.environ, "KUBECONFIG": str(kubeconfig)},
        )  # fmt: skip
    p = Process(proc, log, xds, outbound)
    p.http = http
    return p


@pytest.fixture
async def controlplane(kube: Kube, tmp_path: Path) -> AsyncIterator[Process]:
    p = start(kube, tmp_path)
    try:
        yield p
    finally:
        await p.terminate()
        print(p.log.read_text()[-3000:])


def http_get(port: int, path: str) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=5) as resp:
            return resp.status, resp.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode()
    except urllib.error.URLError:  # not listening (yet)
        return 0, ""


async def test_live_at_once_ready_once_the_cluster_is_listed(kube: Kube, tmp_path: Path) -> None:
    """A first listing can take minutes (a large cluster, an API server under load): /livez
    answers from the start, so a liveness probe does not restart the process meanwhile; the
    HTTP listener opened only once the listing was complete. /readyz says 503 until then,
    and xDS is not served."""
    await kube.create(service("web"))
    slices = "/apis/discovery.k8s.io/v1/namespaces/shop/endpointslices"
    kube.emulator.refused.add(slices)
    p = start(kube, tmp_path)
    try:
        await eventually(lambda: http_get(p.http, "/livez") == (200, "ok\n"), "live")
        assert http_get(p.http, "/readyz") == (503, "not built yet\n")
        assert http_get(p.http, "/status")[0] == 200
        with pytest.raises(OSError):
            socket.create_connection(("127.0.0.1", p.xds), timeout=2).close()
        kube.emulator.refused.discard(slices)
        await eventually(lambda: http_get(p.http, "/readyz") == (200, "ok\n"), "ready", 90)
    finally:
        await p.terminate()
        print(p.log.read_text()[-3000:])


async def test_an_api_server_outage_shows_in_status_and_keeps_the_process_live_and_ready(
    kube: Kube, api_front: ApiFront, tmp_path: Path
) -> None:
    """The API server's port closed (its pod restarting): the control plane keeps serving the
    config it has, so it stays live and ready (not ready would take it out of its Service,
    and Envoys that reconnect would find no control plane), and /status says since when it
    does not follow the cluster, until the API server answers again."""
    await kube.create(service("web"))
    p = start(kube, tmp_path, server=api_front.server)
    try:
        await eventually(lambda: http_get(p.http, "/readyz") == (200, "ok\n"), "ready", 60)

        def source_errors() -> list[dict[str, str]]:
            code, body = http_get(p.http, "/status")
            assert code == 200, body
            errors: list[dict[str, str]] = json.loads(body)["source_errors"]
            return errors

        assert source_errors() == []
        await api_front.refuse()
        errors = await eventually(source_errors, "the outage in /status", 30)
        assert [(e["source"], e["where"]) for e in errors] == [("kubernetes", "api-server")]
        assert errors[0]["message"].startswith("not following the cluster since "), errors
        assert http_get(p.http, "/livez") == (200, "ok\n")
        assert http_get(p.http, "/readyz") == (200, "ok\n")
        await api_front.restore()
        await eventually(lambda: source_errors() == [], "the outage off /status", 60)
        assert p.proc.poll() is None
    finally:
        await p.terminate()
        print(p.log.read_text()[-3000:])
    log = p.log.read_text()
    assert log.count("not following the cluster since ") == 1, log[-3000:]
    assert log.count("following the cluster again after ") == 1, log[-3000:]


async def test_credentials_refused_at_start_are_one_line_and_exit_1(
    kube: Kube, api_front: ApiFront, tmp_path: Path
) -> None:
    """A wrong token: waiting does not heal it, so the process says so and exits 1 (before
    2026-11-22, after 15 s of restarts, with kopf's "Ran out of valid credentials. Consider
    installing an API client library or adding a login handler")."""
    await api_front.answer(401)
    p = start(kube, tmp_path, server=api_front.server)
    try:
        assert await asyncio.to_thread(p.proc.wait, 60) == 1
    finally:
        await p.terminate()
    log = p.log.read_text()
    assert log.rstrip().splitlines()[-1] == (
        "nodemesh controlplane: kubernetes source: the API server refuses the credentials "
        "(HTTP 401): check the token or kubeconfig, and the RBAC "
        "(charts/nodemesh/templates/rbac.yaml)"
    ), log[-3000:]


async def test_cli_serves_envoy_writes_status_and_releases_the_lease(
    kube: Kube, controlplane: Process, envoy_binary: str
) -> None:
    backend = await HttpBackend("cli").start()
    envoy = NodeEnvoy(envoy_binary, controlplane.outbound)
    try:
        for obj in (
            service("cli"), endpoint_slice("cli", backend.port),
            http_route("cli", "cli", [{"backendRefs": [to("cli")]}]),
            service("cli", ns="other"), endpoint_slice("cli", backend.port, ns="other"),
        ):  # fmt: skip
            await kube.create(obj)
        envoy.envoy = EnvoyProcess(
            bootstrap("node-1", f"127.0.0.1:{controlplane.xds}"), binary=envoy_binary
        )
        await asyncio.to_thread(envoy.envoy.start)
        await envoy.start_client()

        async def serves() -> bool:
            try:
                return (await envoy.get("cli.shop", timeout=2)).body == "cli"
            except Exception:
                return False

        await eventually(serves, "Envoy serves the route from the CLI's control plane", 30)
        await status_shows(kube, "HTTPRoute", "cli", {"Programmed": "True"})
        # --namespace shop: the Service in "other" is not in the mesh.
        assert (await envoy.get("cli.other", timeout=2)).status == 404

        async def holder() -> Any:
            lease = await kube.get("Lease", "nodemesh", "nodemesh-controlplane")
            return (lease or {}).get("spec", {}).get("holderIdentity")

        assert await holder() == "cli-replica"
        assert await controlplane.terminate() == 0
        assert await holder() is None, "the Lease was not released on SIGTERM"
    finally:
        await envoy.stop()
        await backend.stop()


def peer_slice(identity: str, http_port: int) -> dict[str, Any]:
    """The control plane Service's EndpointSlice for one process (both listen on 127.0.0.1,
    so each has a slice for its own port)."""
    return {
        "apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
        "metadata": {"name": f"nodemesh-{identity}", "namespace": "nodemesh",
                     "labels": {"kubernetes.io/service-name": "nodemesh"}},
        "addressType": "IPv4",
        "ports": [{"name": "http", "port": http_port, "protocol": "TCP"}],
        "endpoints": [{"addresses": ["127.0.0.1"], "conditions": {"ready": True},
                       "targetRef": {"kind": "Pod", "namespace": "nodemesh", "name": identity}}],
    }  # fmt: skip


def peers_of(p: Process) -> dict[str, Any]:
    code, body = http_get(p.http, "/status")
    return dict(json.loads(body)["peers"]) if code == 200 else {}


def route_programmed(p: Process) -> tuple[str, str]:
    """(status, message) of the `peers` route's Programmed condition in `p`'s /status."""
    code, body = http_get(p.http, "/status")
    assert code == 200, body
    (route,) = (o for o in json.loads(body)["objects"] if o["name"] == "peers")
    (c,) = (c for c in route["conditions"] if c["type"] == "Programmed")
    return c["status"], c["message"]


@contextlib.asynccontextmanager
async def peer_processes(
    kube: Kube, tmp_path: Path, envoy_binary: str, *b_options: str
) -> AsyncIterator[tuple[Process, Process, NodeEnvoy]]:
    """Two `nodemesh controlplane --peers-service` processes, as a platform team runs them:
    cli-a leads, each has an EndpointSlice of the Service and counts the other, and the only
    node Envoy (node-1) is connected to cli-b; a route is written Programmed=True. Yields
    both processes and that Envoy."""
    peers = ("--namespace", "nodemesh", "--peers-service", "nodemesh")
    a = start(kube, tmp_path, "", "cli-a", *peers)
    b: Process | None = None
    backend = await HttpBackend("peers").start()
    envoy = NodeEnvoy(envoy_binary, a.outbound)
    try:
        await eventually(lambda: http_get(a.http, "/readyz") == (200, "ok\n"), "a ready", 90)

        async def holder() -> Any:
            lease = await kube.get("Lease", "nodemesh", "nodemesh-controlplane")
            return (lease or {}).get("spec", {}).get("holderIdentity")

        assert await eventually(holder, "a Lease holder", 30) == "cli-a"
        b = start(kube, tmp_path, "", "cli-b", *peers, *b_options)
        await eventually(lambda: http_get(b.http, "/readyz") == (200, "ok\n"), "b ready", 90)
        for p, name in ((a, "cli-a"), (b, "cli-b")):
            await kube.create(peer_slice(name, p.http))
        for p, other in ((a, "cli-b"), (b, "cli-a")):
            await eventually(
                lambda p=p, other=other: peers_of(p).get(other, {}).get("counted"),
                f"{other} counted by the other process",
                30,
            )
        envoy.envoy = EnvoyProcess(bootstrap("node-1", f"127.0.0.1:{b.xds}"), binary=envoy_binary)
        await asyncio.to_thread(envoy.envoy.start)
        for obj in (
            service("peers"), endpoint_slice("peers", backend.port),
            http_route("peers", "peers", [{"backendRefs": [to("peers")]}]),
        ):  # fmt: skip
            await kube.create(obj)
        got = await status_shows(kube, "HTTPRoute", "peers", {"Programmed": "True"})
        assert got == {"Accepted": "True", "ResolvedRefs": "True", "Programmed": "True"}, got
        yield a, b, envoy
    finally:
        await envoy.stop()
        await backend.stop()
        for p in (a, b):
            if p is not None:
                await p.terminate()
                print(p.log.read_text()[-3000:])


async def test_a_replica_that_drains_still_tells_its_peers_about_its_node_envoys(
    kube: Kube, tmp_path: Path, envoy_binary: str
) -> None:
    """Two `nodemesh controlplane --peers-service` processes: each lists the other, counted,
    under `peers` in /status, and the leader wrote Programmed for the node Envoy connected to
    the other one only (`peer_processes`). SIGTERM to cli-b, the replica node-1's Envoy is
    connected to: it serves that stream for its --drain-seconds, and answers /programmed
    until then, so the leader's route stays Programmed for the whole drain. Before, its HTTP
    listener closed before the drain: 5 s later the leader left it out, and node-1, still
    connected to it, counted as connected nowhere (NoNodes here; Pending for a Ready Node)
    until the drain ended."""
    drain = ("--drain-seconds", "10")
    async with peer_processes(kube, tmp_path, envoy_binary, *drain) as (a, b, _):
        assert list(peers_of(a)) == ["cli-b"] and list(peers_of(b)) == ["cli-a"]
        assert peers_of(a)["cli-b"]["nodes"] == ["node-1"]
        os.killpg(b.proc.pid, signal.SIGTERM)
        seen: list[tuple[str, str]] = []
        loop = asyncio.get_running_loop()
        deadline = loop.time() + 40
        while b.proc.poll() is None and loop.time() < deadline:
            seen.append(route_programmed(a))
            await asyncio.sleep(0.1)  # a sample of a's view, ten a second
        assert b.proc.poll() == 0, "cli-b did not exit within 40 s"
        assert len(seen) > 50, f"the drain lasted {len(seen)} samples only"
        assert set(seen) == {("True", "ACKed by 1 node(s)")}, sorted(set(seen))


async def test_a_node_whose_replica_was_stopped_counts_with_its_verdicts_while_it_moves(
    kube: Kube, tmp_path: Path, envoy_binary: str
) -> None:
    """A rolling update replaces cli-b, which node-1's Envoy (a Ready Node's) is connected
    to: cli-b drains, says so in its /programmed, and exits. node-1's Envoy keeps its config
    and is on its way to another replica (here it never gets there: its bootstrap names
    cli-b only), so the leader counts node-1 with cli-b's last verdicts for the peers'
    move_grace (10 s): the route stays Programmed, then waits for node-1. Before, it went
    Pending once cli-b's last answer was stale (5 s), on every replica a rolling update
    replaced, until the node Envoys reconnected."""
    await kube.create(ready_node("node-1"))
    drain = ("--drain-seconds", "1")
    async with peer_processes(kube, tmp_path, envoy_binary, *drain) as (a, b, _):
        await eventually(lambda: route_programmed(a)[0] == "True", "Programmed", 30)
        os.killpg(b.proc.pid, signal.SIGTERM)
        loop = asyncio.get_running_loop()
        seen: set[tuple[str, str]] = set()
        exited, deadline = None, loop.time() + 40
        # From the signal to 6 s after cli-b exited: past the 5 s after which its last
        # answer is stale, well within the 10 s of grace from when node-1 left it
        while exited is None or loop.time() < exited + 6:
            seen.add(route_programmed(a))
            if exited is None and b.proc.poll() is not None:
                exited = loop.time()
            assert loop.time() < deadline, "cli-b did not exit within 40 s"
            await asyncio.sleep(0.2)  # a sample of a's view, five a second
        assert b.proc.poll() == 0
        assert seen == {("True", "ACKed by 1 node(s)")}, sorted(seen)
        await eventually(
            lambda: peers_of(a)["cli-b"]["moving"] == ["node-1"], "/status shows it moving", 5
        )
        await eventually(
            lambda: route_programmed(a)[1].startswith("waiting for ACK from node-1"),
            "node-1, connected nowhere, no longer counted after the grace",
            20,
        )


@pytest.mark.parametrize("node_1", ["no Node", "a Ready Node"])
async def test_a_node_envoy_that_leaves_a_draining_replica_stops_counting_at_once(
    kube: Kube, tmp_path: Path, envoy_binary: str, node_1: str
) -> None:
    """node-1's and node-2's Envoys are connected to cli-b; node-1's goes away while cli-b
    drains: cli-b's /programmed stops listing it, and the leader counts node-2 only, while
    cli-b still drains (for node-2). Before, cli-b's pipeline stopped before the drain, its
    answer stayed what it was, and the leader counted node-1 until cli-b exited. Of a Ready
    Node, that Envoy is not moving to another replica (cli-b says it left on its own, before
    the drain's cut): the route waits for it, where it would otherwise count as moving,
    holding no config, for 10 s."""
    if node_1 == "a Ready Node":
        await kube.create(ready_node("node-1"))
    drain = ("--drain-seconds", "15")
    async with peer_processes(kube, tmp_path, envoy_binary, *drain) as (a, b, envoy):
        node_2 = NodeEnvoy(envoy_binary, a.outbound)
        try:
            node_2.envoy = EnvoyProcess(
                bootstrap("node-2", f"127.0.0.1:{b.xds}"), binary=envoy_binary
            )
            await asyncio.to_thread(node_2.envoy.start)

            await eventually(
                lambda: route_programmed(a) == ("True", "ACKed by 2 node(s)"), "both counted"
            )
            os.killpg(b.proc.pid, signal.SIGTERM)
            await eventually(
                lambda: "operator cli-b stopped" in b.log.read_text(), "cli-b drains", 20
            )
            await envoy.stop()
            if node_1 == "no Node":
                await eventually(
                    lambda: route_programmed(a) == ("True", "ACKed by 1 node(s)"),
                    "the leader no longer counts node-1",
                    10,
                )
            else:

                def left() -> list[str]:
                    code, body = http_get(b.http, "/programmed")
                    assert code == 200, body
                    return list(json.loads(body)["left"])

                await eventually(lambda: left() == ["node-1"], "cli-b: node-1 left on its own", 4)
                # well within the 10 s it would count as moving
                await eventually(
                    lambda: route_programmed(a)[1].startswith("waiting for ACK from node-1"),
                    "the leader waits for node-1",
                    4,
                )
                assert peers_of(a)["cli-b"]["moving"] == [], peers_of(a)
            assert b.proc.poll() is None, "cli-b no longer drains: the check came too late"
        finally:
            await node_2.stop()


@pytest.mark.parametrize("kubeconfig", ["not there", "empty"])
def test_a_kubeconfig_that_cannot_be_read_is_one_line(tmp_path: Path, kubeconfig: str) -> None:
    """A mistyped $KUBECONFIG was a FileNotFoundError traceback from kopf's reader, an empty
    one (caught while kubectl writes it) a LoginError traceback."""
    path = tmp_path / "nope" / "kubeconfig"
    said = f"[Errno 2] No such file or directory: '{path}'"
    if kubeconfig == "empty":
        path = tmp_path / "kubeconfig"
        path.write_text("")
        said = "Current context is not set in kubeconfigs."
    done = subprocess.run(
        [sys.executable, "-m", "nodemesh", "controlplane", "--source", "kubernetes",
         "--xds-listen", "127.0.0.1:0", "--http-listen", "127.0.0.1:0"],
        capture_output=True, text=True, timeout=60, check=False, cwd=REPO,
        env={**os.environ, "KUBECONFIG": str(path), "HOME": str(tmp_path)},
    )  # fmt: skip
    assert done.returncode == 1, done.stderr
    assert "Traceback" not in done.stderr, done.stderr
    assert done.stderr.strip().endswith(
        f"kubernetes source: cannot read Kubernetes credentials: {said}"
    ), done.stderr


@pytest.mark.parametrize("error", [None, "the API server is gone"])
async def test_a_kubernetes_source_that_stops_on_its_own_ends_the_process_with_1(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture, error: str | None
) -> None:
    """The operator ending by itself (kopf gives up on a LIST after its retries) left a
    control plane that served a config no longer following the cluster, with exit code 0
    when the operator ended with an error (logged twice, once with a traceback), and no exit
    at all when it ended without one. (The operator here is a stand-in that is ready at once
    and then ends.)"""

    async def stops_on_its_own(*_: Any, ready: asyncio.Event, **__: Any) -> None:
        ready.set()
        await asyncio.sleep(0.2)
        if error is not None:
            raise kube_source.KubeSourceError(error)

    monkeypatch.setattr(kube_source, "run_operator", stops_on_its_own)
    parser = argparse.ArgumentParser()
    cli.configure(parser)
    args = parser.parse_args(
        ["--source", "kubernetes", "--xds-listen", "127.0.0.1:0", "--http-listen", "127.0.0.1:0",
         "--drain-seconds", "0"]
    )  # fmt: skip
    with caplog.at_level("ERROR", logger="nodemesh"):
        assert await asyncio.wait_for(cli.serve(args), 30) == 1
    errors = [r.getMessage() for r in caplog.records if r.levelname == "ERROR"]
    assert errors == [f"the kubernetes source stopped: {error or 'it ended without an error'}"]
