"""`nodemesh controlplane --source kubernetes` as a user runs it: a separate process that reads
a kubeconfig (pointing at the emulator), watches only `--namespace`, serves a real node Envoy,
writes status, and hands the Lease back on SIGTERM."""

from __future__ import annotations

import argparse
import asyncio
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
from tests.kube.test_e2e import status_shows
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


def start(kube: Kube, tmp_path: Path, server: str = "") -> Process:
    kubeconfig = tmp_path / "kubeconfig"
    kubeconfig.write_text(yaml.safe_dump({
        "apiVersion": "v1", "kind": "Config", "current-context": "kmock",
        "clusters": [{"name": "kmock", "cluster": {"server": server or kube.server}}],
        "users": [{"name": "cli", "user": {"token": "cli"}}],
        "contexts": [{"name": "kmock",
                      "context": {"cluster": "kmock", "user": "cli", "namespace": "nodemesh"}}],
    }))  # fmt: skip
    xds, http, outbound = free_port(), free_port(), free_port()
    log = tmp_path / "controlplane.log"
    with log.open("wb") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "nodemesh", "controlplane", "--source", "kubernetes",
             "--xds-listen", f"127.0.0.1:{xds}", "--http-listen", f"127.0.0.1:{http}",
             "--outbound-listen", f"127.0.0.1:{outbound}",
             "--namespace", "shop", "--identity", "cli-replica"],
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


def test_a_kubeconfig_that_is_not_there_is_one_line(tmp_path: Path) -> None:
    """A mistyped $KUBECONFIG was a FileNotFoundError traceback from kopf's reader."""
    missing = tmp_path / "nope" / "kubeconfig"
    done = subprocess.run(
        [sys.executable, "-m", "nodemesh", "controlplane", "--source", "kubernetes",
         "--xds-listen", "127.0.0.1:0", "--http-listen", "127.0.0.1:0"],
        capture_output=True, text=True, timeout=60, check=False, cwd=REPO,
        env={**os.environ, "KUBECONFIG": str(missing), "HOME": str(tmp_path)},
    )  # fmt: skip
    assert done.returncode == 1, done.stderr
    assert "Traceback" not in done.stderr, done.stderr
    assert done.stderr.strip().endswith(
        f"kubernetes source: cannot read Kubernetes credentials: [Errno 2] No such file or"
        f" directory: '{missing}'"
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
