"""`NodeLab`: a throwaway node for tests and benchmarks (like `kopf.testing`).

It builds a bridge, "pods" as network namespaces with veth pairs on a random /24 inside
10.244.0.0/16 (plus an `unreachable 10.244.0.0/16` host route so nothing can leak), one cgroup v2
per pod under a node cgroup, and optionally the data plane on that cgroup, with its own pin
root. `close()` removes everything it made, in reverse order, even after a failure.
"""

from __future__ import annotations

import json
import logging
import os
import random
import secrets
import select
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from nodemesh.ebpf.loader import BPFFS, Dataplane

__all__ = ["CGROUP2", "NodeLab", "Pod", "prerequisites"]

log = logging.getLogger(__name__)

CGROUP2 = Path(os.environ.get("NODEMESH_CGROUP2", "/sys/fs/cgroup/unified"))
PODTOOL = Path(__file__).resolve().parents[2] / "tests" / "ebpf" / "podtool.py"


def prerequisites() -> list[str]:
    """What this machine lacks to run a NodeLab with the data plane (empty when ready)."""
    missing = []
    if os.geteuid() != 0:
        missing.append("root (netns, cgroups and BPF need it)")
    if not (CGROUP2 / "cgroup.procs").exists():
        missing.append(f"cgroup v2 at {CGROUP2} (set NODEMESH_CGROUP2)")
    for tool in ("ip", "clang"):
        if subprocess.run(["which", tool], capture_output=True).returncode != 0:
            missing.append(f"{tool} (make setup)")
    if not Path("/sys/kernel/btf/vmlinux").exists():
        missing.append("kernel BTF (/sys/kernel/btf/vmlinux)")
    try:
        from nodemesh.ebpf._libbpf import libbpf

        libbpf()
    except Exception as exc:  # reported, not raised
        missing.append(f"libbpf.so.1: {exc}")
    return missing


def _ip(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run(["ip", *args], capture_output=True, text=True)
    if check and proc.returncode != 0:
        raise RuntimeError(f"ip {' '.join(args)}: {proc.stderr.strip()}")
    return proc


@dataclass
class Proc:
    popen: subprocess.Popen[str]
    name: str

    def readline(self, timeout: float = 20) -> str:
        """One line of stdout, or RuntimeError after `timeout` seconds."""
        assert self.popen.stdout is not None
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            ready, _, _ = select.select([self.popen.stdout], [], [], 0.2)
            if ready:
                line = self.popen.stdout.readline()
                if not line:
                    raise RuntimeError(f"{self.name} exited: {self.stderr()}")
                return line
            if self.popen.poll() is not None:
                raise RuntimeError(f"{self.name} exited: {self.stderr()}")
        raise RuntimeError(f"{self.name}: no output within {timeout}s")

    def json(self, timeout: float = 20) -> Any:
        return json.loads(self.readline(timeout))

    def send(self, line: str) -> None:
        assert self.popen.stdin is not None
        self.popen.stdin.write(line + "\n")
        self.popen.stdin.flush()

    def stderr(self) -> str:
        if self.popen.poll() is None or self.popen.stderr is None:
            return ""
        return self.popen.stderr.read()[-2000:]

    def stop(self) -> None:
        if self.popen.poll() is None:
            self.popen.send_signal(signal.SIGTERM)
            try:
                self.popen.wait(5)
            except subprocess.TimeoutExpired:
                self.popen.kill()
                self.popen.wait(5)
        for f in (self.popen.stdin, self.popen.stdout, self.popen.stderr):
            if f is not None:
                f.close()


@dataclass
class Pod:
    lab: NodeLab
    name: str
    netns: str | None  # None: the host netns (the node Envoy)
    ip: str
    cgroup: Path

    def _argv(self, argv: Sequence[str]) -> list[str]:
        # Join the cgroup before exec: sockets belong to the cgroup of the process creating them.
        wrap = 'echo $$ > "$0" && exec "$@"'
        inner = ["ip", "netns", "exec", self.netns, *argv] if self.netns else list(argv)
        return ["sh", "-c", wrap, str(self.cgroup / "cgroup.procs"), *inner]

    def spawn(self, argv: Sequence[str], name: str = "") -> Proc:
        popen = subprocess.Popen(
            self._argv(argv),
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        proc = Proc(popen, name or f"{self.name}:{argv[0]}")
        self.lab._procs.append(proc)
        return proc

    def tool(self, *args: str, timeout: float = 120) -> Any:
        """Run podtool in this pod and return its JSON answer."""
        proc = subprocess.run(
            self._argv([sys.executable, str(PODTOOL), *args]),
            capture_output=True,
            text=True,
            timeout=timeout,
        )
        if proc.returncode != 0:
            raise RuntimeError(f"podtool {args} in {self.name}: {proc.stderr[-2000:]}")
        return json.loads(proc.stdout.strip().splitlines()[-1])

    def serve(
        self,
        port: int,
        http: bool = False,
        sink_chunk: int = 0,
        sink_pause: float = 0.0,
        sink_hold_until: str = "",
        sink_read_first: int = 0,
        splice: bool = False,
        sink_greet: int = 0,
        sink_read_done: str = "",
    ) -> Proc:
        """A server: byte echo (reading with splice(2) if `splice`), HTTP (`http`), or a sink
        that sends its hello and `sink_greet` more bytes, reads `sink_read_first` bytes, waits
        (until the file `sink_hold_until` exists, at most `sink_pause` seconds), then reads
        the rest `sink_chunk` bytes a call, and creates the file `sink_read_done` once it has
        read everything."""
        argv = [sys.executable, str(PODTOOL), "serve", "--port", str(port), "--name", self.name]
        if http:
            argv.append("--http")
        if splice:
            argv.append("--splice")
        if sink_chunk:
            argv += ["--sink", "--chunk", str(sink_chunk), "--pause", str(sink_pause)]
            if sink_hold_until:
                argv += ["--hold-until", sink_hold_until]
            if sink_read_first:
                argv += ["--read-first", str(sink_read_first)]
            if sink_greet:
                argv += ["--greet", str(sink_greet)]
            if sink_read_done:
                argv += ["--read-done", sink_read_done]
        proc = self.spawn(argv, f"{self.name}:serve")
        proc.json()  # {"ready": true}
        return proc

    def hold(self, to: str) -> Proc:
        proc = self.spawn([sys.executable, str(PODTOOL), "hold", "--to", to], f"{self.name}:hold")
        return proc


@dataclass
class NodeLab:
    """One node. Use as a context manager, or call `close()`."""

    suffix: str = field(default_factory=lambda: secrets.token_hex(3))
    _undo: list[tuple[str, Callable[[], object]]] = field(default_factory=list)
    _procs: list[Proc] = field(default_factory=list)
    pods: dict[str, Pod] = field(default_factory=dict)
    dataplane: Dataplane | None = None
    _netns_hosts: int = 0  # pods and outside hosts made

    def __post_init__(self) -> None:
        try:
            self._build()
        except BaseException:
            self.close()
            raise

    def _build(self) -> None:
        used = _ip("-j", "route", "show").stdout
        for _ in range(50):
            octet = random.randint(1, 254)
            if f'"10.244.{octet}.0/24"' not in used:
                break
        self.prefix = f"10.244.{octet}"
        self.gateway = f"{self.prefix}.1"
        for _ in range(20):
            metric = random.randint(1000, 60000)
            if (
                _ip(
                    "route",
                    "add",
                    "unreachable",
                    "10.244.0.0/16",
                    "metric",
                    str(metric),
                    check=False,
                ).returncode
                == 0
            ):
                break
        else:
            raise RuntimeError("could not add an unreachable route for 10.244.0.0/16")
        self._undo.append(
            (
                "route",
                lambda: _ip(
                    "route",
                    "del",
                    "unreachable",
                    "10.244.0.0/16",
                    "metric",
                    str(metric),
                    check=False,
                ),
            )
        )
        self.bridge = f"nmbr{self.suffix}"
        _ip("link", "add", self.bridge, "type", "bridge")
        self._undo.append(("bridge", lambda: _ip("link", "del", self.bridge, check=False)))
        _ip("addr", "add", f"{self.gateway}/24", "dev", self.bridge)
        _ip("link", "set", self.bridge, "up")
        self.cgroup = CGROUP2 / f"nodemesh-test-{self.suffix}"
        self._mkcg(self.cgroup)
        self.pin_root = BPFFS / f"nodemesh-test-{self.suffix}"
        self.envoy_cgroup = self.cgroup / "envoy"
        self._mkcg(self.envoy_cgroup)
        self.host = Pod(self, "node", None, self.gateway, self.envoy_cgroup)

    def _mkcg(self, path: Path) -> None:
        path.mkdir()
        self._undo.append((f"cgroup {path}", lambda: _rmdir_cgroup(path)))

    def add_pod(self, name: str) -> Pod:
        pod = self._netns_host(name, self.cgroup / f"pod-{name}")
        self.pods[name] = pod
        return pod

    def outside_host(self, name: str) -> Pod:
        """Another machine on the node's network: a network namespace on the bridge, like a
        pod's, whose processes run in a cgroup outside the node's (the data plane does not
        see its sockets). Not in `pods`."""
        return self._netns_host(name, CGROUP2 / f"nodemesh-test-{self.suffix}-{name}")

    def _netns_host(self, name: str, cg: Path) -> Pod:
        index = self._netns_hosts + 10  # pods a, b, c made first: .10, .11, .12
        self._netns_hosts += 1
        ns = f"nm-{self.suffix}-{name}"
        _ip("netns", "add", ns)
        self._undo.append((f"netns {ns}", lambda: _ip("netns", "del", ns, check=False)))
        host_if = f"nmv{self.suffix}{index}"
        _ip("link", "add", host_if, "type", "veth", "peer", "name", "eth0", "netns", ns)
        self._undo.append((f"veth {host_if}", lambda: _ip("link", "del", host_if, check=False)))
        _ip("link", "set", host_if, "master", self.bridge, "up")
        ip = f"{self.prefix}.{index}"
        for args in (
            ("addr", "add", f"{ip}/24", "dev", "eth0"),
            ("link", "set", "eth0", "up"),
            ("link", "set", "lo", "up"),
            ("route", "add", "default", "via", self.gateway),
        ):
            _ip("-n", ns, *args)
        self._mkcg(cg)
        return Pod(self, name, ns, ip, cg)

    def host_network_pod(self, name: str) -> Pod:
        """A pod with `hostNetwork: true`: the host netns, so the node's address (`gateway`,
        the node Envoy's too), in a cgroup of its own below the node cgroup."""
        cg = self.cgroup / f"hostnet-{name}"
        self._mkcg(cg)
        return Pod(self, name, None, self.gateway, cg)

    @contextmanager
    def accepting(self, port: int) -> Iterator[None]:
        """A stand-in for the node Envoy: a listener on the node's address and `port` that
        accepts and closes every connection (only their setup matters), while in the block."""
        listener = socket.create_server((self.gateway, port), backlog=4096)
        listener.settimeout(0.2)
        stop = threading.Event()

        def accept() -> None:
            while not stop.is_set():
                try:
                    listener.accept()[0].close()
                except TimeoutError:
                    continue

        acceptor = threading.Thread(target=accept)
        acceptor.start()
        try:
            yield
        finally:
            stop.set()
            acceptor.join()
            listener.close()

    def envoy_container(self, name: str) -> Pod:
        """The node Envoy in a new cgroup below `envoy_cgroup` (host netns, its address), as a
        restarted container gets a new cgroup below its pod's. Removed on close()."""
        cg = self.envoy_cgroup / name
        self._mkcg(cg)
        return Pod(self, f"envoy-{name}", None, self.gateway, cg)

    def replace_envoy_cgroup(self) -> None:
        """Remove `envoy_cgroup` and make it again: the same path, a new cgroup with a new id,
        as systemd does when it restarts a service. It must hold no process and no cgroup."""
        _rmdir_cgroup(self.envoy_cgroup)
        self.envoy_cgroup.mkdir()

    def spawn(self, argv: Sequence[str], name: str) -> Proc:
        """A process in the host netns and this process's cgroup (outside the mesh)."""
        popen = subprocess.Popen(
            list(argv),
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        proc = Proc(popen, name)
        self._procs.append(proc)
        return proc

    def enable(self, **options: Any) -> Dataplane:
        """Attach the data plane (`options` go to `Dataplane`, e.g. `backlog_limit`)."""
        dp = Dataplane(self.cgroup, self.pin_root, **options)
        if self.dataplane is None:
            self._undo.append(("dataplane", dp.disable))
        self.dataplane = dp
        dp.enable()
        return dp

    def close(self) -> None:
        errors = []
        for proc in reversed(self._procs):
            try:
                proc.stop()
            except Exception as exc:  # keep cleaning up
                errors.append(f"stop {proc.name}: {exc}")
        self._procs.clear()
        for what, undo in reversed(self._undo):
            try:
                undo()
            except Exception as exc:  # keep cleaning up
                errors.append(f"remove {what}: {exc}")
        self._undo.clear()
        if errors:
            raise RuntimeError("; ".join(errors))

    def __enter__(self) -> NodeLab:
        return self

    def __exit__(self, *_: object) -> None:
        self.close()


def _rmdir_cgroup(path: Path) -> None:
    """rmdir fails while the last exiting process is still being reaped: retry briefly."""
    deadline = time.monotonic() + 10
    while path.exists():
        try:
            path.rmdir()
        except OSError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.05)
