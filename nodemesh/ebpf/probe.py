"""Do readers of a socket in a sockmap get what they expect from this kernel?

Two ways they do not on 6.18 (docs/ebpf.md, Known limitations):

- `tcp_bpf_recvmsg()` (the receive path of every TCP socket in a sockmap or sockhash) waits
  once and returns -EAGAIN to a blocking reader woken by anything but data: a signal, a state
  change, freed send buffer. A program that blocks in recv() sees EAGAIN where it expects to
  go on waiting.
- splice(2) from such a socket reads only its TCP receive queue, never the bytes an sk_msg
  program redirected into it: a reader that splices (Go's io.Copy between two TCP
  connections, proxies) waits for them forever, or, at the peer's FIN, gets EOF without them.

So the agent short-circuits payloads (`socket_redirect`) only on kernels that pass this probe,
unless told otherwise. Three cases, each on a loopback connection whose client socket sits in
a fresh sockmap, must pass:

- "signal" and "half-close": no programs on the sockmap; a thread blocked in recv() on the
  client gets a signal whose handler returns, or the wakeup of the ACK of the socket's own
  FIN after shutdown(SHUT_WR) (a state change). A correct kernel keeps the call waiting (or,
  for the signal, interrupts it: Python retries after EINTR, PEP 475) until a byte comes; the
  buggy one returns EAGAIN.
- "splice": the probe's own sk_msg program (bpf/probe.bpf.c) redirects what the client sends
  into the server socket's receive queue, as the data plane does between two local pods; a
  splice(2) from the server socket must return that byte.

It runs in a child process (`python -m nodemesh.ebpf.probe`), so its signal handler, threads
and program never touch the agent, and it needs what the agent needs (CAP_BPF, clang).
"""

from __future__ import annotations

import ctypes
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from contextlib import ExitStack
from dataclasses import dataclass

from nodemesh.ebpf import _libbpf as bpf
from nodemesh.ebpf._build import PROBE_OBJECT, build_objects

__all__ = ["ProbeResult", "sockmap_reads_are_safe"]

BPF_MAP_TYPE_SOCKMAP = 15
_DEADLINE_S = 5.0
_SPLICE_WAIT_S = 1.0
_PIN_ROOT = "/sys/fs/bpf"  # unused: the probe's map is not pinned


@dataclass(frozen=True)
class ProbeResult:
    ok: bool  # False: the kernel has the bug, or the probe could not run
    detail: str


def sockmap_reads_are_safe(timeout: float = 60, sockmap: bool = True) -> ProbeResult:
    """Run the probe in a child process and return its verdict (`sockmap=False`: the control,
    the same steps on sockets outside any sockmap, which every kernel passes)."""
    try:
        proc = subprocess.run(
            [sys.executable, "-m", "nodemesh.ebpf.probe", *([] if sockmap else ["--control"])],
            capture_output=True,
            text=True,
            timeout=timeout,
        )
    except subprocess.TimeoutExpired:
        return ProbeResult(False, f"the probe did not finish in {timeout} s")
    try:
        answer = json.loads(proc.stdout.strip().splitlines()[-1])
        return ProbeResult(bool(answer["ok"]), str(answer["detail"]))
    except (IndexError, ValueError, KeyError):
        return ProbeResult(False, f"the probe failed: {proc.stderr.strip()[-500:]}")


def _sleeping(thread: threading.Thread) -> bool:
    """Is `thread` asleep in the kernel, and not on a futex (waiting for the GIL, before or
    after its recv())? Where wchan is hidden ("0"), the sleep alone has to do."""
    task = f"/proc/self/task/{thread.native_id}"
    with open(f"{task}/stat") as f:
        if f.read().rsplit(")", 1)[1].split()[0] != "S":
            return False
    with open(f"{task}/wchan") as f:
        return "futex" not in f.read()


def _pending(thread: threading.Thread, signum: int) -> bool:
    """Is `signum` still pending for `thread` (sent, not delivered yet)? A thread that has
    ended (its recv() failed) has nothing pending."""
    try:
        with open(f"/proc/self/task/{thread.native_id}/status") as f:
            for line in f:
                if line.startswith("SigPnd:"):
                    return bool(int(line.split()[1], 16) & (1 << (signum - 1)))
    except FileNotFoundError:
        pass
    return False


def _until(condition: Callable[[], bool], what: str) -> None:
    deadline = time.monotonic() + _DEADLINE_S
    while not condition():
        if time.monotonic() > deadline:
            raise TimeoutError(what)
        time.sleep(0.005)


def _switches(thread: threading.Thread) -> int:
    """How many times `thread` went to sleep (voluntary context switches); -1 once it ended."""
    try:
        with open(f"/proc/self/task/{thread.native_id}/status") as f:
            for line in f:
                if line.startswith("voluntary_ctxt_switches:"):
                    return int(line.split()[1])
    except FileNotFoundError:
        pass
    return -1


def _fin_wait2(sock: socket.socket) -> bool:
    """Has the peer acknowledged this socket's FIN (TCP_INFO tcpi_state is TCP_FIN_WAIT2)?"""
    return sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, 1)[0] == 5


def _case(sockmap_on: bool, wake: str) -> ProbeResult:
    """One wakeup without data (`wake`: "signal" or "half-close") to a reader blocked in
    recv() on a socket in a fresh sockmap; it must go on waiting and get the byte sent
    after."""
    with ExitStack() as stack:
        return _signal_or_half_close(stack, sockmap_on, wake)


def _signal_or_half_close(stack: ExitStack, sockmap_on: bool, wake: str) -> ProbeResult:
    listener = stack.enter_context(socket.create_server(("127.0.0.1", 0)))
    client = stack.enter_context(socket.create_connection(listener.getsockname()))
    server = stack.enter_context(listener.accept()[0])
    sockmap = bpf.map_create(BPF_MAP_TYPE_SOCKMAP, "nm_probe", 4, 4, 1, "nm_probe")
    stack.callback(os.close, sockmap)
    client.settimeout(None)
    if sockmap_on:  # off: the control, the same steps on a plain socket
        fd = ctypes.c_uint32(client.fileno())
        bpf.map_update(sockmap, ctypes.c_uint32(0), fd, "nm_probe")
    got: dict[str, object] = {}

    def read() -> None:
        try:
            got["data"] = client.recv(1)
        except OSError as exc:
            got["errno"] = exc.errno

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    _until(lambda: _sleeping(reader), "the reader to block in recv()")
    if wake == "signal":
        signal.pthread_kill(reader.ident or 0, signal.SIGUSR1)
        # Delivered means the interrupted recv() has returned: EAGAIN on the buggy
        # kernel, EINTR or a restart on a correct one (then Python calls recv() again).
        _until(lambda: not _pending(reader, signal.SIGUSR1), "the signal's delivery")
    else:
        slept = _switches(reader)
        client.shutdown(socket.SHUT_WR)  # the ACK of this FIN wakes the reader (FIN_WAIT2)
        _until(lambda: _fin_wait2(client), "the ACK of the FIN")
        # The reader has seen that wakeup once it ended (EAGAIN) or slept again.
        _until(
            lambda: _switches(reader) == -1 or (_switches(reader) > slept and _sleeping(reader)),
            "the reader after the FIN's ACK",
        )
    # Only now send the byte that ends a correct wait.
    server.sendall(b"x")
    reader.join(_DEADLINE_S)
    if "errno" in got:
        return ProbeResult(False, f"recv() got errno {got['errno']} after a {wake}")
    if got.get("data") != b"x":
        return ProbeResult(False, f"recv() ended with {got} instead of the byte sent")
    return ProbeResult(True, f"a blocking recv() kept waiting across a {wake}")


def _splice_case(sockmap_on: bool) -> ProbeResult:
    """A byte the client sends, redirected into the server socket by the probe's program (off:
    the control, sent over TCP), must come out of a splice(2) from the server socket."""
    with ExitStack() as stack:
        return _splice(stack, sockmap_on)


def _splice(stack: ExitStack, sockmap_on: bool) -> ProbeResult:
    path = build_objects(names=(PROBE_OBJECT,))[PROBE_OBJECT]
    obj = stack.enter_context(bpf.BpfObject(str(path), _PIN_ROOT))
    listener = stack.enter_context(socket.create_server(("127.0.0.1", 0)))
    client = stack.enter_context(socket.create_connection(listener.getsockname()))
    server = stack.enter_context(listener.accept()[0])
    read_end, write_end = os.pipe()
    stack.callback(os.close, read_end)
    stack.callback(os.close, write_end)
    obj.load()
    socks = obj.map_fd("nm_probe_socks")
    if sockmap_on:
        prog = obj.program_fd("nm_probe_redirect")
        link = bpf.link_create(prog, socks, bpf.BPF_SK_MSG_VERDICT, "the probe's sk_msg")
        stack.callback(os.close, link)
        for key, sock in ((0, server), (1, client)):
            value = ctypes.c_uint32(sock.fileno())
            bpf.map_update(socks, ctypes.c_uint32(key), value, "nm_probe_socks")
    got: dict[str, object] = {}

    def read() -> None:
        try:
            got["n"] = os.splice(server.fileno(), write_end, 1)
        except OSError as exc:
            got["errno"] = exc.errno

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    # blocked in splice() first, as the recv() cases: a byte that comes later must wake it
    _until(lambda: _sleeping(reader), "the reader to block in splice()")
    client.sendall(b"x")
    # a redirected byte is in the queue when sendall() returns: a kernel that splices it
    # does so at once; a wait this long says no (and errs on the safe side)
    reader.join(_SPLICE_WAIT_S)
    if reader.is_alive():
        # unblock it: the FIN travels over TCP, so splice() sees the end of the stream
        client.shutdown(socket.SHUT_WR)
        reader.join(_DEADLINE_S)
        return ProbeResult(
            False,
            f"splice() did not return a byte redirected to the socket in {_SPLICE_WAIT_S} s",
        )
    if got.get("n") != 1 or os.read(read_end, 1) != b"x":
        return ProbeResult(False, f"splice() ended with {got} instead of the byte sent")
    how = "redirected to the socket" if sockmap_on else "sent over TCP"
    return ProbeResult(True, f"splice() read a byte {how}")


def _probe(sockmap_on: bool = True) -> ProbeResult:
    signal.signal(signal.SIGUSR1, lambda *_: None)  # a handler that returns
    results = [_case(sockmap_on, wake) for wake in ("signal", "half-close")]
    results.append(_splice_case(sockmap_on))
    failed = [r for r in results if not r.ok]
    if failed:
        return ProbeResult(False, "; ".join(r.detail for r in failed))
    return ProbeResult(True, "; ".join(r.detail for r in results))


def main() -> None:
    try:
        result = _probe(sockmap_on="--control" not in sys.argv[1:])
    except Exception as exc:  # report, never crash the agent's decision
        result = ProbeResult(False, f"the probe could not run: {exc!r}")
    print(json.dumps({"ok": result.ok, "detail": result.detail}), flush=True)


if __name__ == "__main__":
    main()
