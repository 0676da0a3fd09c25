"""A tiny workload run inside test pods: echo/HTTP servers and clients that print JSON.

Not imported by the tests; they run it as a process inside a pod's netns and cgroup, because
the kernel attributes a socket to the cgroup of the process that created it.
"""

from __future__ import annotations

import argparse
import errno
import hashlib
import http.client
import http.server
import json
import os
import socket
import socketserver
import struct
import sys
import threading
import time

PATTERN = os.urandom(1 << 22)  # 4 MiB of noise, sliced at moving offsets


def _addr(text: str) -> tuple[str, int]:
    host, port = text.rsplit(":", 1)
    return host.strip("[]"), int(port)


def _out(obj: object) -> None:
    sys.stdout.write(json.dumps(obj) + "\n")
    sys.stdout.flush()


def _connect(to: str, family: int = socket.AF_INET) -> socket.socket:
    s = socket.socket(family, socket.SOCK_STREAM)
    s.settimeout(20)
    s.connect(_addr(to))
    return s


def _until_queued(s: socket.socket, size: int) -> None:
    """Wait until `size` bytes are queued to read, without reading them (MSG_PEEK, which the
    read counter ignores). push --greeting needs the sink's greeting redirected and counted
    before it writes: a socket with nothing unread leaves nm_socks when its writes go to TCP,
    and a greeting still on its way then went over TCP and took the sink out with it."""
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        try:
            if len(s.recv(size, socket.MSG_PEEK)) >= size:
                return
        except BlockingIOError:  # the 6.18 sockmap read bug: a blocking recv says EAGAIN
            pass
        time.sleep(0.001)
    raise SystemExit(f"the {size}-byte greeting did not arrive in 20 s")


def _read_line(s: socket.socket) -> str:
    buf = b""
    while not buf.endswith(b"\n"):
        chunk = s.recv(1)
        if not chunk:
            break
        buf += chunk
    return buf.decode().strip()


# -- servers ---------------------------------------------------------------------------------
def serve(args: argparse.Namespace) -> None:
    name = args.name

    class Echo(socketserver.BaseRequestHandler):
        def handle(self) -> None:
            s: socket.socket = self.request
            s.sendall(f"HELLO {name}\n".encode())
            h = hashlib.sha256()
            count = 0
            pipe = os.pipe() if args.splice else None
            while True:
                if pipe is not None:  # splice(2) from the socket, as proxies read
                    n = os.splice(s.fileno(), pipe[1], 1 << 16)
                    data = os.read(pipe[0], n) if n else b""
                else:
                    data = s.recv(1 << 20)
                if not data:
                    break
                h.update(data)
                count += len(data)
                s.sendall(data)
            s.sendall(f"DONE {count} {h.hexdigest()}\n".encode())
            s.shutdown(socket.SHUT_WR)

    class Http(http.server.BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def do_GET(self) -> None:
            if self.path.startswith("/fail") and name in self.path:
                self.send_response(503)
                self.send_header("content-length", "0")
                self.end_headers()
                return
            body = json.dumps({"pod": name, "path": self.path, "host": self.headers["host"]})
            self.send_response(200)
            self.send_header("content-type", "application/json")
            self.send_header("content-length", str(len(body)))
            self.end_headers()
            self.wfile.write(body.encode())

        def log_message(self, *_: object) -> None:
            pass

    class Server(socketserver.ThreadingTCPServer):
        allow_reuse_address = True
        daemon_threads = True

    class Sink(socketserver.BaseRequestHandler):
        """Read everything in `--chunk`-byte recv calls (a reader slower than a bulk writer)."""

        def handle(self) -> None:
            s: socket.socket = self.request
            # with the greeting, if any, in one write: more for the client to read only at the
            # end (push --greeting), there before the client has its hello
            s.sendall(f"HELLO {name}\n".encode() + b"g" * args.greet)
            h = hashlib.sha256()
            count = 0
            while count < args.read_first:  # keep up at first, then stall
                data = s.recv(min(args.chunk, args.read_first - count))
                if not data:
                    break
                h.update(data)
                count += len(data)
            # Busy elsewhere, so the writer gets ahead: until --hold-until exists (the test
            # creates it once the writer is done or failed), for at most --pause seconds.
            deadline = time.monotonic() + args.pause
            while time.monotonic() < deadline:
                if args.hold_until and os.path.exists(args.hold_until):
                    break
                if not args.hold_until:
                    time.sleep(max(0.0, deadline - time.monotonic()))
                    break
                time.sleep(0.05)
            while True:
                data = s.recv(args.chunk)
                if not data:
                    break
                h.update(data)
                count += len(data)
            if args.read_done:
                open(args.read_done, "w").close()
            s.sendall(f"DONE {count} {h.hexdigest()}\n".encode())
            s.shutdown(socket.SHUT_WR)

    handler = Http if args.http else Sink if args.sink else Echo
    with Server(("0.0.0.0", args.port), handler) as srv:  # type: ignore[arg-type]
        _out({"ready": True})
        srv.serve_forever()


# -- clients ---------------------------------------------------------------------------------
def xfer(args: argparse.Namespace) -> None:
    """Send `bytes` in messages of `sizes` (cycled), read the echo concurrently, half-close."""
    sizes = [int(x) for x in args.sizes.split(",")]
    s = _connect(args.to)
    s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1 if args.nodelay else 0)
    hello = _read_line(s)
    total = args.bytes
    sent_hash = hashlib.sha256()
    echo_hash = hashlib.sha256()
    result: dict[str, object] = {}
    # --window: never more than this many bytes sent and not yet echoed back (a writer that
    # waits for its peer, like request/response protocols); 0: write as fast as possible.
    echoed = [0]
    moved = threading.Condition()

    def receive() -> None:
        got = 0
        tail = b""
        while True:
            data = s.recv(1 << 20)
            if not data:
                break
            if got < total:
                take = data[: total - got]
                echo_hash.update(take)
                got += len(take)
                tail += data[len(take) :]
                with moved:
                    echoed[0] = got
                    moved.notify()
            else:
                tail += data
        result["echo_bytes"] = got
        result["trailer"] = tail.decode(errors="replace").strip()

    t = threading.Thread(target=receive)
    t.start()
    start = time.monotonic()
    sent = 0
    i = 0
    offset = 0
    while sent < total:
        n = min(sizes[i % len(sizes)], total - sent)
        if offset + n > len(PATTERN):
            offset = (offset * 7 + 13) % 4096
        chunk = PATTERN[offset : offset + n]
        offset += n
        if args.window:
            need = sent + n - args.window  # echoed bytes required before this write
            with moved:
                if not moved.wait_for(lambda: echoed[0] >= need, 20):  # noqa: B023 (waits here)
                    raise SystemExit(f"no echo for 20 s at {sent} bytes sent")
        s.sendall(chunk)
        sent_hash.update(chunk)
        sent += n
        i += 1
    s.shutdown(socket.SHUT_WR)
    t.join(120)
    elapsed = time.monotonic() - start
    s.close()
    _out(
        {
            "hello": hello,
            "sent": sent,
            "sent_sha": sent_hash.hexdigest(),
            "echo_sha": echo_hash.hexdigest(),
            "seconds": elapsed,
            **result,
        }
    )


def push(args: argparse.Namespace) -> None:
    """Send `bytes` in `chunk`-byte writes, half-close, read the sink's trailer.

    With --send-timeout, a write that makes no progress for that long means the writer is
    blocked: without --release, report it and stop; with --release FILE, record how much was
    sent when it first blocked (`blocked_at`), create FILE (the sink's --hold-until) and keep
    writing until everything is sent."""
    s = _connect(args.to)
    hello = _read_line(s)
    if args.greeting:
        _until_queued(s, args.greeting)
    if args.start_after:  # connected; the test prepares the maps, then creates the file
        _out({"connected": True})
        deadline = time.monotonic() + 60
        while not os.path.exists(args.start_after) and time.monotonic() < deadline:
            time.sleep(0.01)
    sent_hash = hashlib.sha256()
    sent = 0
    offset = 0
    blocked_at = None
    start = time.monotonic()
    if args.send_timeout:
        s.settimeout(args.send_timeout)
    try:
        while sent < args.bytes:
            n = min(args.chunk, args.bytes - sent)
            if offset + n > len(PATTERN):
                offset = (offset * 7 + 13) % 4096
            chunk = memoryview(PATTERN[offset : offset + n])
            offset += n
            while chunk:
                try:
                    k = s.send(chunk)  # not sendall: a timeout must not lose the count
                except TimeoutError:
                    if not args.release:
                        raise
                    if blocked_at is None:
                        blocked_at = sent
                        open(args.release, "w").close()
                        s.settimeout(60)
                    continue
                sent_hash.update(chunk[:k])
                sent += k
                chunk = chunk[k:]
        if args.release and not os.path.exists(args.release):
            open(args.release, "w").close()  # never blocked: the sink may read on now
            s.settimeout(60)
        s.shutdown(socket.SHUT_WR)
        greeting = b""
        if args.greeting_after:  # until the sink has read everything (its --read-done)
            deadline = time.monotonic() + 60
            while not os.path.exists(args.greeting_after) and time.monotonic() < deadline:
                time.sleep(0.01)
        while len(greeting) < args.greeting:  # the sink's --greet, left unread until now
            chunk = s.recv(args.greeting - len(greeting))
            if not chunk:
                break
            greeting += chunk
        trailer = _read_line(s)
    except TimeoutError:
        _out({"ok": False, "blocked": True, "sent": sent})
        return
    except OSError as exc:
        _out({"ok": False, "errno": errno.errorcode.get(exc.errno or 0, str(exc)), "sent": sent})
        return
    finally:
        s.close()
        if args.release and not os.path.exists(args.release):
            open(args.release, "w").close()
    _out(
        {
            "ok": True,
            "hello": hello,
            "sent": sent,
            "sent_sha": sent_hash.hexdigest(),
            "blocked_at": blocked_at,
            "greeting": len(greeting),
            "trailer": trailer,
            "seconds": time.monotonic() - start,
        }
    )


def _read_trailer(s: socket.socket, out: dict[str, object]) -> None:
    """A blocking read of one line into out["trailer"], or the errno into out["errno"]."""
    try:
        out["trailer"] = _read_line(s)
    except OSError as exc:
        out["errno"] = errno.errorcode.get(exc.errno or 0, str(exc))


def duplex(args: argparse.Namespace) -> None:
    """Like push, but as a blocking program with a reader thread: the socket has no timeout,
    one thread blocks in recv() for the sink's trailer from the start while another writes
    `bytes` and half-closes. When the writer has made no progress for --stall seconds (it is
    blocked: the sink reads nothing), create --release (the sink's --hold-until)."""
    s = _connect(args.to)
    hello = _read_line(s)
    s.settimeout(None)  # blocking, as C programs and Python without a timeout use sockets
    sent_hash = hashlib.sha256()
    progress = {"sent": 0}
    reader: dict[str, object] = {}

    def release_when_stalled() -> None:
        last, since = -1, time.monotonic()
        while not os.path.exists(args.release):
            now, sent = time.monotonic(), progress["sent"]
            if sent != last:
                last, since = sent, now
            elif now - since >= args.stall:
                progress["blocked_at"] = sent
                open(args.release, "w").close()
            time.sleep(0.05)

    threads = [
        threading.Thread(target=_read_trailer, args=(s, reader), daemon=True),
        threading.Thread(target=release_when_stalled, daemon=True),
    ]
    for t in threads:
        t.start()
    offset, error = 0, None
    try:
        while progress["sent"] < args.bytes:
            n = min(args.chunk, args.bytes - progress["sent"])
            if offset + n > len(PATTERN):
                offset = (offset * 7 + 13) % 4096
            chunk = PATTERN[offset : offset + n]
            offset += n
            s.sendall(chunk)
            sent_hash.update(chunk)
            progress["sent"] += n
        s.shutdown(socket.SHUT_WR)
    except OSError as exc:
        error = errno.errorcode.get(exc.errno or 0, str(exc))
    if not os.path.exists(args.release):
        open(args.release, "w").close()
    threads[0].join(60)
    s.close()
    _out(
        {
            "hello": hello,
            "sent": progress["sent"],
            "sent_sha": sent_hash.hexdigest(),
            "blocked_at": progress.get("blocked_at"),
            "write_error": error,
            "reader": reader,
        }
    )


def _wait_blocked(thread: threading.Thread, timeout: float = 10) -> bool:
    """Poll until `thread` sleeps in the kernel (state S in /proc), or `timeout` passes."""
    stat = f"/proc/self/task/{thread.native_id}/stat"
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with open(stat) as f:
            if f.read().rsplit(")", 1)[1].split()[0] == "S":
                return True
        time.sleep(0.01)
    return False


def halfclose(args: argparse.Namespace) -> None:
    """A blocking program: one thread blocks in recv() for the sink's trailer; once it sleeps,
    the main thread half-closes (shutdown SHUT_WR, nothing sent). The sink sees EOF and answers
    DONE 0; the reader must get that line."""
    s = _connect(args.to)
    hello = _read_line(s)
    s.settimeout(None)
    reader: dict[str, object] = {}

    if args.same_thread:  # shut down, then block in recv() (the usual single-threaded client)
        s.shutdown(socket.SHUT_WR)
        _read_trailer(s, reader)
        s.close()
        _out({"hello": hello, "reader": reader})
        return
    t = threading.Thread(target=_read_trailer, args=(s, reader), daemon=True)
    t.start()
    blocked = _wait_blocked(t)
    s.shutdown(socket.SHUT_WR)
    t.join(20)
    s.close()
    _out({"hello": hello, "reader_blocked": blocked, "reader": reader})


def signalled(args: argparse.Namespace) -> None:
    """A blocking recv() that nothing answers, interrupted by a signal whose handler returns
    (it must go on waiting: Python retries after EINTR, PEP 475), then ended by a second
    signal whose handler raises. Reports which of the two ended it."""
    import signal

    s = _connect(args.to)
    hello = _read_line(s)
    s.settimeout(None)
    fired = []

    class Stop(Exception):
        pass

    def on_alarm(signum: int, _frame: object) -> None:
        fired.append(time.monotonic())
        if len(fired) == 2:
            raise Stop

    signal.signal(signal.SIGALRM, on_alarm)
    signal.setitimer(signal.ITIMER_REAL, 0.2, 0.4)  # at 0.2 s, then 0.6 s
    try:
        s.recv(1)
        ended = "data"
    except Stop:
        ended = "second signal"
    except OSError as exc:
        ended = errno.errorcode.get(exc.errno or 0, str(exc))
    signal.setitimer(signal.ITIMER_REAL, 0)
    s.close()
    _out({"hello": hello, "ended": ended, "signals": len(fired)})


def rr(args: argparse.Namespace) -> None:
    """Request/response round trips of `size` bytes on one connection; latency percentiles."""
    s = _connect(args.to)
    s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    _read_line(s)
    payload = PATTERN[: args.size]
    lat: list[float] = []
    for i in range(args.warmup + args.count):
        t0 = time.perf_counter()
        s.sendall(payload)
        got = 0
        while got < args.size:
            data = s.recv(args.size - got)
            if not data:
                raise SystemExit("echo closed")
            got += len(data)
        if i >= args.warmup:
            lat.append(time.perf_counter() - t0)
    s.close()
    lat.sort()
    _out(
        {
            "count": len(lat),
            "p50_us": lat[len(lat) // 2] * 1e6,
            "p99_us": lat[int(len(lat) * 0.99)] * 1e6,
            "mean_us": sum(lat) / len(lat) * 1e6,
        }
    )


def stream(args: argparse.Namespace) -> None:
    """Throughput of 64 KiB writes for `seconds`; the echo is drained concurrently."""
    s = _connect(args.to)
    _read_line(s)
    chunk = PATTERN[: 1 << 16]
    done = threading.Event()
    received = [0]

    def drain() -> None:
        while True:
            data = s.recv(1 << 20)
            if not data:
                break
            received[0] += len(data)
        done.set()

    t = threading.Thread(target=drain)
    t.start()
    sent = 0
    t0 = time.perf_counter()
    while time.perf_counter() - t0 < args.seconds:
        s.sendall(chunk)
        sent += len(chunk)
    s.shutdown(socket.SHUT_WR)
    t.join(60)
    elapsed = time.perf_counter() - t0
    _out({"bytes": sent, "seconds": elapsed, "mb_per_s": sent / elapsed / 1e6})


def conns(args: argparse.Namespace) -> None:
    """Open `count` connections one after another; count the backends that answered."""
    seen: dict[str, int] = {}
    errors: dict[str, int] = {}
    for _ in range(args.count):
        try:
            with _connect(args.to) as s:
                name = _read_line(s).removeprefix("HELLO ")
                seen[name] = seen.get(name, 0) + 1
        except OSError as exc:
            key = errno.errorcode.get(exc.errno or 0, str(exc))
            errors[key] = errors.get(key, 0) + 1
    _out({"backends": seen, "errors": errors})


def connect(args: argparse.Namespace) -> None:
    family = socket.AF_INET6 if args.v6 else socket.AF_INET
    try:
        with _connect(args.to, family) as s:
            hello = _read_line(s)
            _out({"ok": True, "hello": hello, "peer": list(s.getpeername()[:2])})
    except OSError as exc:
        _out({"ok": False, "errno": errno.errorcode.get(exc.errno or 0, str(exc))})


def hold(args: argparse.Namespace) -> None:
    """Keep one connection; each stdin line `ping` makes a 1000-byte round trip."""
    s = _connect(args.to)
    _out({"hello": _read_line(s)})
    for line in sys.stdin:
        if line.strip() != "ping":
            break
        try:
            payload = os.urandom(1000)
            s.sendall(payload)
            got = b""
            while len(got) < len(payload):
                data = s.recv(len(payload) - len(got))
                if not data:
                    break
                got += data
            _out({"ok": got == payload})
        except OSError as exc:
            _out({"ok": False, "errno": errno.errorcode.get(exc.errno or 0, str(exc))})
    s.close()


def get(args: argparse.Namespace) -> None:
    host, port = _addr(args.to)
    if args.http10:  # HTTP/1.0 without a Host header, as some health checkers send it
        try:
            with _connect(args.to) as s:
                s.sendall(f"GET {args.path} HTTP/1.0\r\n\r\n".encode())
                data = b""
                while chunk := s.recv(65536):
                    data += chunk
            head, _, body = data.partition(b"\r\n\r\n")
            status = int(head.split(b"\r\n", 1)[0].split()[1])
            _out({"status": status, "body": body.decode(errors="replace")})
        except OSError as exc:
            _out({"status": 0, "errno": errno.errorcode.get(exc.errno or 0, str(exc))})
        return
    source = ("", args.source_port) if args.source_port else None
    conn = http.client.HTTPConnection(host, port, timeout=20, source_address=source)
    try:
        conn.request("GET", args.path, headers={"host": args.host or host})
        resp = conn.getresponse()
        body = resp.read().decode(errors="replace")
        _out({"status": resp.status, "body": body, "headers": dict(resp.getheaders())})
    except OSError as exc:
        _out({"status": 0, "errno": errno.errorcode.get(exc.errno or 0, str(exc))})
    finally:
        if args.reset and conn.sock is not None:  # an RST: the 4-tuple is free at once
            conn.sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        conn.close()


def keepalive(args: argparse.Namespace) -> None:
    """GET `--path` on one HTTP/1.1 connection, again for each line on stdin: one JSON line per
    answer, with the local port, which tells whether it was the same connection."""
    host, port = _addr(args.to)
    conn = http.client.HTTPConnection(host, port, timeout=20)
    while True:
        conn.request("GET", args.path, headers={"host": host})
        resp = conn.getresponse()
        body = resp.read().decode(errors="replace")
        assert conn.sock is not None
        local_port = conn.sock.getsockname()[1]
        print(
            json.dumps(
                {
                    "status": resp.status,
                    "body": body,
                    "headers": dict(resp.getheaders()),
                    "local_port": local_port,
                }
            ),
            flush=True,
        )
        if not sys.stdin.readline():
            return


def main() -> None:
    p = argparse.ArgumentParser()
    sub = p.add_subparsers(dest="cmd", required=True)
    s = sub.add_parser("serve")
    s.add_argument("--port", type=int, required=True)
    s.add_argument("--name", required=True)
    s.add_argument("--http", action="store_true")
    s.add_argument("--sink", action="store_true")
    s.add_argument("--chunk", type=int, default=16384)
    s.add_argument("--pause", type=float, default=0.0)
    s.add_argument("--hold-until", default="")
    s.add_argument("--read-first", type=int, default=0)
    s.add_argument("--greet", type=int, default=0)
    s.add_argument("--read-done", default="")
    s.add_argument("--splice", action="store_true")
    x = sub.add_parser("xfer")
    x.add_argument("--to", required=True)
    x.add_argument("--bytes", type=int, required=True)
    x.add_argument("--sizes", default="65536")
    x.add_argument("--nodelay", type=int, default=0)
    x.add_argument("--window", type=int, default=0)
    pu = sub.add_parser("push")
    pu.add_argument("--send-timeout", type=float, default=0.0)
    pu.add_argument("--to", required=True)
    pu.add_argument("--bytes", type=int, required=True)
    pu.add_argument("--chunk", type=int, default=65536)
    pu.add_argument("--release", default="")
    pu.add_argument("--greeting", type=int, default=0)
    pu.add_argument("--greeting-after", default="")
    pu.add_argument("--start-after", default="")
    du = sub.add_parser("duplex")
    du.add_argument("--to", required=True)
    du.add_argument("--bytes", type=int, required=True)
    du.add_argument("--chunk", type=int, default=65536)
    du.add_argument("--stall", type=float, default=0.5)
    du.add_argument("--release", required=True)
    hc = sub.add_parser("halfclose")
    hc.add_argument("--to", required=True)
    hc.add_argument("--same-thread", action="store_true")
    sg = sub.add_parser("signalled")
    sg.add_argument("--to", required=True)
    r = sub.add_parser("rr")
    r.add_argument("--to", required=True)
    r.add_argument("--size", type=int, default=1)
    r.add_argument("--count", type=int, default=5000)
    r.add_argument("--warmup", type=int, default=200)
    st = sub.add_parser("stream")
    st.add_argument("--to", required=True)
    st.add_argument("--seconds", type=float, default=2.0)
    c = sub.add_parser("conns")
    c.add_argument("--to", required=True)
    c.add_argument("--count", type=int, default=100)
    o = sub.add_parser("connect")
    o.add_argument("--to", required=True)
    o.add_argument("--v6", action="store_true")
    h = sub.add_parser("hold")
    h.add_argument("--to", required=True)
    g = sub.add_parser("get")
    g.add_argument("--to", required=True)
    g.add_argument("--path", default="/")
    g.add_argument("--host", default="")
    g.add_argument("--http10", action="store_true", help="HTTP/1.0, no Host header")
    g.add_argument("--source-port", type=int, default=0)
    g.add_argument("--reset", action="store_true", help="close with an RST (no TIME_WAIT)")
    k = sub.add_parser("keepalive")
    k.add_argument("--to", required=True)
    k.add_argument("--path", default="/")
    args = p.parse_args()
    {
        "serve": serve,
        "xfer": xfer,
        "push": push,
        "duplex": duplex,
        "halfclose": halfclose,
        "signalled": signalled,
        "rr": rr,
        "stream": stream,
        "conns": conns,
        "connect": connect,
        "hold": hold,
        "get": get,
        "keepalive": keepalive,
    }[args.cmd](args)


if __name__ == "__main__":
    main()
