"""Node fixtures: a real bridge, netns pods, cgroups and the data plane on this kernel.

ClusterIPs come from 10.244.255.0/24: inside the range the host routes as unreachable, so a
connection the programs fail to rewrite can never leave the machine.
"""

from __future__ import annotations

import ctypes
import os
import socket
import time
from collections.abc import Iterator

import pytest

from nodemesh.api import Backend, NodeMap, Service, ServiceIPv6
from nodemesh.ebpf import NodeMaps
from nodemesh.ebpf import _libbpf as bpf
from nodemesh.ebpf._maps import Tuple
from nodemesh.ebpf.maps import SocketRedirect
from nodemesh.ebpf.testing import NodeLab, prerequisites
from tests.support import need

# A response header Envoy adds to every response it proxied: a connection went through the
# node Envoy (its Server header is the backend's: the node Envoy passes it through).
VIA_ENVOY = "x-envoy-upstream-service-time"
VIP = "10.244.255.10"
VIP_L7 = "10.244.255.20"
# An IPv6 ClusterIP (dual-stack tests); the pods have no IPv6 route, so nothing can leave.
VIP6 = "fd00:96::10"


@pytest.fixture
def lab() -> Iterator[NodeLab]:
    missing = prerequisites()
    need(not missing, "eBPF node tests need: " + "; ".join(missing))
    with NodeLab() as lab:
        yield lab


@pytest.fixture
def node(lab: NodeLab) -> NodeLab:
    """Three pods (a, b, c) and the data plane attached to the node cgroup."""
    for name in ("a", "b", "c"):
        lab.add_pod(name)
    lab.enable()
    return lab


def program(
    lab: NodeLab,
    services: tuple[Service, ...],
    envoy: bool = True,
    services_ipv6: tuple[ServiceIPv6, ...] = (),
    socket_redirect: bool | SocketRedirect = True,
    redirect_on: tuple[str, ...] = (),
    redirect_off: tuple[str, ...] = (),
) -> None:
    """Write a service map for `lab` straight into its maps (the agent does this in production).
    `socket_redirect`: True for every pod, False for none; `redirect_on`/`redirect_off`: pod
    IPs whose Pod says nodemesh.io/socket-redirect on/off."""
    if isinstance(socket_redirect, bool):
        socket_redirect = SocketRedirect.ALL if socket_redirect else SocketRedirect.NONE
    model = NodeMap(
        node="test",
        services=services,
        envoy=(lab.gateway, 15001) if envoy else None,
        local_addresses=tuple(p.ip for p in lab.pods.values()),
        services_ipv6=services_ipv6,
        redirect_on=redirect_on,
        redirect_off=redirect_off,
    )
    with NodeMaps(lab.pin_root) as maps:
        maps.apply(model, os.stat(lab.envoy_cgroup).st_ino, socket_redirect)


def l4(name: str, vip: str, port: int, *backends: tuple[str, int, int]) -> Service:
    return Service(name, vip, port, False, tuple(Backend(a, p, w) for a, p, w in backends))


def stats(lab: NodeLab) -> dict[str, int]:
    with NodeMaps(lab.pin_root) as maps:
        return maps.stats()


def tuple_key(saddr: str, sport: int, daddr: str, dport: int) -> Tuple:
    """The key of a socket's entries (nm_socks, nm_backlog, ...) from its side's 4-tuple."""

    def addr(text: str) -> int:
        return int.from_bytes(socket.inet_aton(text), "little")

    def port(number: int) -> int:
        return int.from_bytes(number.to_bytes(2, "big"), "little")

    return Tuple(addr(saddr), addr(daddr), port(sport), port(dport))


SOCK_STATE_MAPS = ("nm_socks", "nm_backlog", "nm_fallback", "nm_rcv_seq")


def sock_state(lab: NodeLab) -> dict[str, int]:
    """Entries in nm_socks and in the per-socket maps nm_backlog, nm_fallback, nm_rcv_seq."""
    with NodeMaps(lab.pin_root) as maps:
        return {name: maps.count(name) for name in SOCK_STATE_MAPS}


def settled_sock_state(lab: NodeLab, want: dict[str, int], timeout: float = 10) -> dict[str, int]:
    """`sock_state` once it equals `want` (sockets reach TCP_CLOSE a little after the
    processes are done: FIN handshake, TIME_WAIT), or the last reading after `timeout`."""
    deadline = time.monotonic() + timeout
    while True:
        got = sock_state(lab)
        if got == want or time.monotonic() > deadline:
            return got
        time.sleep(0.05)


def pin_other_version(node: NodeLab, name: str, value_size: int, max_entries: int) -> None:
    """Pin, in place of `name`, a map as another version of the agent made it: the same type
    and key, `value_size` and `max_entries`, no flags, holding a copy of the entries the
    current map holds where the value size is the same (not for a sockhash, whose entries
    are sockets). The running programs keep theirs."""
    pin = node.pin_root / name
    fd = bpf.obj_get(str(pin))
    try:
        have = bpf.map_info(fd, name)
        other = bpf.map_create(have.type, name, have.key_size, value_size, max_entries, name)
        try:
            if value_size == have.value_size and name != "nm_socks":
                value = (ctypes.c_char * value_size)()
                for key in bpf.map_keys(fd, ctypes.c_char * have.key_size, name):
                    if bpf.map_lookup(fd, key, value, name):
                        bpf.map_update(other, key, value, name)
            pin.unlink()
            bpf.obj_pin(other, str(pin), f"other version's {name}")
        finally:
            os.close(other)
    finally:
        os.close(fd)
