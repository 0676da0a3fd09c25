"""`nodemesh status`'s tables (the command against a live control plane and Envoy:
tests/e2e/test_status.py)."""

from __future__ import annotations

import asyncio
import socket
import threading
from pathlib import Path

import pytest

from nodemesh.cli import main
from nodemesh.controlplane.files import FilesSource
from nodemesh.controlplane.http import StatusServer
from nodemesh.controlplane.pipeline import Pipeline
from nodemesh.controlplane.status_cli import render
from nodemesh.controlplane.store import Store
from nodemesh.xds.cache import SnapshotCache

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"


def test_a_multi_line_nack_stays_on_its_row() -> None:
    """Envoy puts one line per refused listener in a NACK; each row of the table is still
    one line, and a long message is cut with an ellipsis."""
    nack = "Error adding/updating listener(s) outbound: bad\nconsumer-ns-a: also bad\n"
    status = {
        "store_revision": 3,
        "built_revision": 3,
        "objects": [
            {
                "kind": "HTTPRoute",
                "namespace": "shop",
                "name": "reviews",
                "conditions": [
                    {
                        "type": "Programmed",
                        "status": "False",
                        "reason": "Rejected",
                        "message": f"node node-a rejected lds 'outbound': {nack}" + "x" * 200,
                        "parent": "Service/shop/reviews",
                    }
                ],
            },
            {  # a name or parentRef with a newline (another source's): still one row
                "kind": "HTTPRoute",
                "namespace": "shop",
                "name": "two\nlines",
                "conditions": [
                    {
                        "type": "Accepted",
                        "status": "True",
                        "reason": "Accepted",
                        "message": "",
                        "parent": "Service/shop/a\nb",
                    }
                ],
            },
        ],
        "nodes": {
            "node-a": {
                "connected": True,
                "types": {
                    "lds": {
                        "version_sent": "2",
                        "version_acked": "1",
                        "last_nack": {"message": nack},
                    }
                },
            }
        },  # fmt: skip
        "source_errors": [{"source": "files", "where": "a.yaml", "message": "line 1\nline 2"}],
    }
    lines = render(status).splitlines()
    (route,) = [line for line in lines if line.startswith("HTTPRoute/shop/reviews")]
    assert "outbound: bad consumer-ns-" in route and route.endswith("...")
    (node,) = [line for line in lines if line.startswith("node-a")]
    assert node.split()[:3] == ["node-a", "yes", "lds"]
    assert "outbound: bad consumer-ns-a" in node
    assert "  line 1 line 2" in lines
    (two,) = [line for line in lines if line.startswith("HTTPRoute/shop/two")]
    assert two.split()[:4] == ["HTTPRoute/shop/two", "lines", "Service/shop/a", "b"]
    assert not [line for line in lines if line.startswith(("lines", "b "))]
    # --wide: the message whole, still on its one row
    wide = render(status, wide=True).splitlines()
    (route,) = [line for line in wide if line.startswith("HTTPRoute/shop/reviews")]
    assert route.endswith("also bad " + "x" * 200)


def test_the_peer_replicas_are_a_table_of_their_own() -> None:
    """With --peers-service, /status lists the other replicas: whether their node Envoys are
    counted in Programmed, which, why one is not, and the nodes on their way from one to
    another replica (counted with its last verdicts meanwhile)."""
    status = {
        "store_revision": 1,
        "built_revision": 1,
        "peers": {
            "nodemesh-1": {
                "url": "http://10.244.0.7:18080",
                "nodes": ["node-b", "node-c"],
                "answered_seconds_ago": 0.4,
                "counted": True,
                "error": "",
                "moving": ["node-d"],
            },
            "nodemesh-2": {
                "url": "http://10.244.0.8:18080",
                "nodes": [],
                "answered_seconds_ago": None,
                "counted": False,
                "error": "ClientConnectorError: Cannot connect to host 10.244.0.8:18080",
                "moving": [],
            },
        },
    }
    lines = render(status).splitlines()
    header = next(line for line in lines if line.startswith("PEER"))
    assert header.split() == ["PEER", "COUNTED", "NODES", "MOVING", "ANSWERED", "URL", "ERROR"]
    (one,) = [line for line in lines if line.startswith("nodemesh-1")]
    assert one.split() == [
        "nodemesh-1",
        "yes",
        "node-b,node-c",
        "node-d",
        "0.4s",
        "ago",
        "http://10.244.0.7:18080",
    ]
    (two,) = [line for line in lines if line.startswith("nodemesh-2")]
    assert two.split()[:6] == ["nodemesh-2", "no", "-", "-", "-", "http://10.244.0.8:18080"]
    assert two.endswith("Cannot connect to host 10.244.0.8:18080")


async def test_the_control_plane_is_reached_by_its_http_listen_address(
    capsys: pytest.CaptureFixture[str],
) -> None:
    """`--controlplane 127.0.0.1:18080`, the form `--http-listen` takes, as well as the URL;
    it answered "unknown url type: 127.0.0.1" and exit 1. Also `:18080` (that flag's every
    address) and the /status URL the control plane logs (which asked for /status/status)."""
    store = Store()
    FilesSource(EXAMPLES, store).scan()
    pipeline = Pipeline(store, SnapshotCache())
    await pipeline.rebuild()
    server = StatusServer(pipeline)
    port = await server.start("127.0.0.1", 0)
    try:
        for address in (
            f"127.0.0.1:{port}",
            f"http://127.0.0.1:{port}/",
            f":{port}",
            str(port),  # it was a host name: http://51712/status, off this host
            f"http://127.0.0.1:{port}/status",
        ):
            code = await asyncio.to_thread(main, ["status", "--controlplane", address])
            out = capsys.readouterr()
            assert (code, out.err) == (0, ""), address
            assert "HTTPRoute/shop/reviews" in out.out
    finally:
        await server.stop()


def test_a_port_that_does_not_speak_http_is_one_line_not_a_traceback(
    capsys: pytest.CaptureFixture[str],
) -> None:
    """Pointed at the xDS port by mistake, the CLI printed http.client's traceback."""
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen()
        port = listener.getsockname()[1]

        def answer_junk() -> None:
            conn, _ = listener.accept()
            with conn:
                conn.recv(4096)
                conn.sendall(b"\x00\x00\x12\x04not http\r\n\r\n")

        junk = threading.Thread(target=answer_junk)
        junk.start()
        code = main(["status", "--controlplane", f"127.0.0.1:{port}"])
        junk.join(timeout=5)
    err = capsys.readouterr().err
    assert code == 1
    assert err.startswith(f"nodemesh status: cannot read http://127.0.0.1:{port}/status: ")
    assert "Traceback" not in err and len(err.splitlines()) == 1, err
    assert err.rstrip().endswith("the xDS port? /status is on the control plane's --http-listen "
                                 "address, 127.0.0.1:18080 by default)"), err  # fmt: skip
