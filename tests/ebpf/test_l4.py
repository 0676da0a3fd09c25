"""Same-node L4: socket-level load balancing at connect() and payloads carried socket to socket."""

from __future__ import annotations

from pathlib import Path

import pytest

from nodemesh.ebpf.testing import NodeLab
from tests.ebpf.conftest import VIP, l4, program, stats

MB = 1 << 20
SIZES = "1,2,3,100,1448,4096,65536,1048576,7,999999,16384"


def _check_xfer(result: dict[str, object], nbytes: int) -> None:
    assert result["sent"] == nbytes
    assert result["echo_bytes"] == nbytes, "the echo lost or added bytes"
    assert result["echo_sha"] == result["sent_sha"], "the echo came back different"
    assert result["trailer"] == f"DONE {nbytes} {result['sent_sha']}", "the server saw other bytes"


def test_l4_payload_crosses_intact_and_skips_the_stack(node: NodeLab) -> None:
    a, b = node.pods["a"], node.pods["b"]
    program(node, (l4("echo", VIP, 80, (b.ip, 7000, 1)),))
    b.serve(7000)
    before = stats(node)

    result = a.tool("xfer", "--to", f"{VIP}:80", "--bytes", str(100 * MB), "--sizes", SIZES)

    assert result["hello"] == "HELLO b"
    _check_xfer(result, 100 * MB)
    after = stats(node)
    assert after["l4_picks"] - before["l4_picks"] == 1
    assert after["sockhash_inserts"] - before["sockhash_inserts"] == 2  # both ends
    # both directions went socket to socket: 100 MB out, 100 MB echoed (+ hello and trailer)
    assert after["bytes_redirected"] - before["bytes_redirected"] >= 200 * MB
    assert after["msg_passed"] == before["msg_passed"]


@pytest.mark.parametrize("nodelay", [0, 1], ids=["nagle", "nodelay"])
def test_l4_small_and_large_messages_with_and_without_nagle(node: NodeLab, nodelay: int) -> None:
    a, b = node.pods["a"], node.pods["b"]
    program(node, ())
    b.serve(7000)
    before = stats(node)
    # straight to the pod IP: pod-to-pod flows are short-circuited without any service
    result = a.tool(
        "xfer",
        "--to",
        f"{b.ip}:7000",
        "--bytes",
        str(3 * MB),
        "--sizes",
        "1,1,1,2,1024,1048576",
        "--nodelay",
        str(nodelay),
    )
    _check_xfer(result, 3 * MB)
    assert stats(node)["bytes_redirected"] - before["bytes_redirected"] >= 6 * MB


def test_l4_spreads_by_weight_and_a_removed_backend_gets_no_new_connections(
    node: NodeLab,
) -> None:
    a, b, c = node.pods["a"], node.pods["b"], node.pods["c"]
    b.serve(7000)
    c.serve(7001)
    program(node, (l4("web", VIP, 80, (b.ip, 7000, 1), (c.ip, 7001, 3)),))

    spread = a.tool("conns", "--to", f"{VIP}:80", "--count", "400")

    assert spread["errors"] == {}
    counts = spread["backends"]
    assert counts.keys() == {"b", "c"}
    # weight 1:3 -> b expects 100 of 400; binomial sd ~8.7, so 55..145 is > 5 sd wide
    assert 55 <= counts["b"] <= 145, counts

    program(node, (l4("web", VIP, 80, (c.ip, 7001, 1)),))
    after = a.tool("conns", "--to", f"{VIP}:80", "--count", "100")
    assert after == {"backends": {"c": 100}, "errors": {}}


def test_l4_service_without_backends_refuses(node: NodeLab) -> None:
    program(node, (l4("empty", VIP, 80),))
    assert node.pods["a"].tool("connect", "--to", f"{VIP}:80") == {
        "ok": False,
        "errno": "ECONNREFUSED",
    }


def test_ipv6_socket_reaches_an_ipv4_service_through_a_mapped_address(node: NodeLab) -> None:
    b = node.pods["b"]
    b.serve(7000)
    program(node, (l4("echo", VIP, 80, (b.ip, 7000, 1)),))
    result = node.pods["a"].tool("connect", "--v6", "--to", f"[::ffff:{VIP}]:80")
    assert result["ok"] and result["hello"] == "HELLO b"


def test_a_policy_change_applies_to_new_connections_only(node: NodeLab) -> None:
    a, b, c = node.pods["a"], node.pods["b"], node.pods["c"]
    b.serve(7000)
    c.serve(7000)
    program(node, (l4("web", VIP, 80, (b.ip, 7000, 1)),))
    held = a.hold(f"{VIP}:80")
    assert held.json() == {"hello": "HELLO b"}

    program(node, (l4("web", VIP, 80, (c.ip, 7000, 1)),))

    assert a.tool("conns", "--to", f"{VIP}:80", "--count", "20")["backends"] == {"c": 20}
    held.send("ping")
    assert held.json() == {"ok": True}, "the established connection broke"


@pytest.mark.xfail(
    strict=True,
    raises=AssertionError,
    reason=(
        "kernel tcp_bpf: an sk_msg ingress redirect (bpf_tcp_ingress) queues on the peer "
        "without checking its sk_rcvbuf and never makes the writer wait, so a stalled reader "
        "accumulates without bound; under global TCP memory pressure (past tcp_mem[1]) the "
        "writer then gets ENOMEM. sk_msg cannot see the peer's queue (a sockhash lookup needs "
        "bpf_sk_release, which sk_msg programs may not call), so no sound fallback yet"
    ),
)
def test_a_stalled_reader_blocks_the_writer(node: NodeLab, tmp_path: Path) -> None:
    """Backpressure: a writer whose reader reads nothing is blocked once the socket buffers
    are full (a few MiB on plain TCP), instead of queueing without bound."""
    a, b = node.pods["a"], node.pods["b"]
    program(node, (l4("sink", VIP, 80, (b.ip, 7000, 1)),))
    # The reader reads nothing until the writer reports (at most 30 s), then 16 KiB a call.
    writer_done = tmp_path / "writer-done"
    b.serve(7000, sink_chunk=16384, sink_pause=30, sink_hold_until=str(writer_done))
    before = stats(node)
    try:
        result = a.tool(
            "push", "--to", f"{VIP}:80", "--bytes", str(512 * MB), "--chunk", "65536",
            "--send-timeout", "2",
        )  # fmt: skip
    finally:
        writer_done.touch()
    assert stats(node)["bytes_redirected"] - before["bytes_redirected"] > 0
    assert result["sent"] < 64 * MB, (
        f"the writer was never blocked: {result['sent'] >> 20} MiB queued on a reader that "
        f"read nothing ({result})"
    )
    assert result.get("blocked"), result
