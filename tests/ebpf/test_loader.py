"""The loader converges: enable twice changes nothing, and the map writer writes only changes."""

from __future__ import annotations

import ctypes
import os
import time

from nodemesh.api import Backend, MapView, MeshService, NodeMap, Service, ServiceIPv6
from nodemesh.ebpf import NodeMaps
from nodemesh.ebpf import _libbpf as bpf
from nodemesh.ebpf import _maps as m
from nodemesh.ebpf.testing import NodeLab, Pod, Proc
from tests.ebpf.conftest import (
    VIP,
    l4,
    pin_other_version,
    program,
    settled_sock_state,
    stats,
    tuple_key,
)


def held_connection(node: NodeLab) -> tuple[Pod, Pod, Proc]:
    """Pods a and b (b serving on 7000), nothing programmed, and a connection from a to b
    that is open and answered."""
    assert node.dataplane is not None
    a, b = node.pods["a"], node.pods["b"]
    program(node, ())
    b.serve(7000)
    held = a.hold(f"{b.ip}:7000")
    assert held.json() == {"hello": "HELLO b"}
    return a, b, held


def test_enable_twice_keeps_every_link_and_program(node: NodeLab) -> None:
    assert node.dataplane is not None
    first = node.dataplane.links()
    assert node.dataplane.enable() == dict.fromkeys(first, "kept")
    assert node.dataplane.links() == first


def test_enable_reattaches_a_removed_link(node: NodeLab) -> None:
    assert node.dataplane is not None
    node.dataplane.link_pin("nm_sockops").unlink()  # detaches: we held the only reference
    result = node.dataplane.enable()
    assert result["nm_sockops"] == "created"
    assert sum(v == "kept" for v in result.values()) == len(result) - 1


def test_apply_writes_only_what_changed(node: NodeLab) -> None:
    svc = Service("a", "10.244.255.1", 80, False, (Backend("10.244.1.2", 8080),))
    other = Service("b", "10.244.255.2", 80, True)
    model = NodeMap("n", (svc, other), ("10.244.1.1", 15001), ("10.244.1.2",))
    with NodeMaps(node.pin_root) as maps:
        first = maps.apply(model)
        assert (first.written, first.deleted) == (5, 0)  # config, 2 local addresses, 2 services
        assert maps.apply(model).written == 0
        changed = NodeMap("n", (other,), model.envoy, model.local_addresses)
        result = maps.apply(changed)
        assert (result.written, result.deleted) == (0, 1)  # only the dropped service
        assert set(maps.services()) == {("10.244.255.2", 80)}


def test_patch_writes_one_services_entries_and_ends_where_a_full_apply_would(
    node: NodeLab,
) -> None:
    """The agent converges once, then patches per response: the kernel maps must end equal
    to a full apply of the same view, having written only the touched entries."""
    many = [
        MeshService(f"shop/s{i}", (Service(f"shop/s{i}:80", f"10.244.254.{i}", 80, True),))
        for i in range(1, 41)
    ]
    web = MeshService(
        "shop/web",
        (Service("shop/web:80", "10.244.255.1", 80, False, (Backend("10.244.1.2", 8080),)),),
        (ServiceIPv6("shop/web:80", "fd00::1", 80, "10.244.255.1"),),
    )
    # a second Service on web's ClusterIP:port: "shop/zzz" sorts after "shop/web" and waits
    shadow = MeshService("shop/zzz", (Service("shop/zzz:80", "10.244.255.1", 80, True),))
    view = MapView("n")
    view.update([*many, web, shadow])
    with NodeMaps(node.pin_root) as maps:
        maps.apply(view.model())
        moved = MeshService(
            "shop/web",
            (Service("shop/web:80", "10.244.255.1", 80, False, (Backend("10.244.1.3", 8080),)),),
            web.services_ipv6,
        )
        result = maps.patch(view, *view.update([moved]))
        assert (result.written, result.deleted, result.unchanged) == (1, 0, 1)
        assert maps.services()[("10.244.255.1", 80)].n_backends == 1

        result = maps.patch(view, *view.update(removed=["shop/web", "shop/s1"]))
        # shop/zzz takes web's ClusterIP:port over (L7), web's IPv6 entry and s1 go
        assert (result.written, result.deleted) == (1, 2)
        assert maps.services()[("10.244.255.1", 80)].flags & m.NM_SVC_L7
        assert len(maps.services()) == 40 and maps.services_ipv6() == {}

        full = maps.apply(view.model())
        assert (full.written, full.deleted) == (0, 0), "a full apply finds nothing left to do"


def test_enable_replaces_an_older_fallback_map_and_old_connections_keep_their_marks(
    node: NodeLab,
) -> None:
    """Upgrade from the version with LRU maps: libbpf refuses a pinned map whose type or size
    differ, so enable() moves the pin aside, lets libbpf create the new map and swaps every
    program in (same code, new map). A connection from before keeps the sk_msg program it was
    inserted with, and so the map that holds its fallback mark: it stays on TCP. New
    connections get their entries in the new map, and lose them at close."""
    a, b, held = held_connection(node)
    pin = node.pin_root / "nm_fallback"
    with NodeMaps(node.pin_root) as maps:
        live = maps.sock_state("nm_fallback")
    (client,) = [k for k in live if k[0] == a.ip]
    # The held client falls back (marked in the map its sk_msg program uses) ...
    fd = bpf.obj_get(str(pin))
    try:
        bpf.map_update(fd, tuple_key(*client), ctypes.c_uint32(1), "nm_fallback")  # BACKLOG
    finally:
        os.close(fd)
    # ... and the pin is what the previous version made: LRU, 65536 entries, no flags.
    old_fd = bpf.map_create(bpf.BPF_MAP_TYPE_LRU_HASH, "nm_fallback", 12, 4, 65536, "old")
    try:
        bpf.map_update(old_fd, tuple_key(*client), ctypes.c_uint32(1), "old")
        pin.unlink()  # the running programs keep the map they were loaded with
        bpf.obj_pin(old_fd, str(pin), "old nm_fallback")
    finally:
        os.close(old_fd)

    result = node.dataplane.enable()

    assert set(result.values()) == {"updated"}, result
    assert not (node.pin_root / "nm_fallback_old").exists()
    fd = bpf.obj_get(str(pin))
    try:
        info = bpf.map_info(fd, "nm_fallback")
    finally:
        os.close(fd)
    assert (info.type, info.max_entries, info.flags) == (bpf.BPF_MAP_TYPE_HASH, 131072, 1)
    with NodeMaps(node.pin_root) as maps:
        assert maps.count("nm_fallback") == 0, "nothing copied from the old map"
    before = stats(node)
    held.send("ping")
    assert held.json() == {"ok": True}
    after = stats(node)
    # the client's ping went over TCP (its old program, its old mark); the echo redirected
    assert after["msg_passed"] - before["msg_passed"] == 1
    assert after["msg_redirected"] - before["msg_redirected"] >= 1
    assert after["fallback_backlog"] == before["fallback_backlog"], "sticky, not a new fallback"

    fresh = a.hold(f"{b.ip}:7000")
    assert fresh.json() == {"hello": "HELLO b"}
    with NodeMaps(node.pin_root) as maps:
        assert set(maps.sock_state("nm_fallback").values()) == {0}
        assert maps.count("nm_fallback") == 2, "the new connection's two sockets"
    for proc in (held, fresh):
        proc.send("bye")
        assert proc.popen.wait(10) == 0
    empty = {"nm_socks": 0, "nm_backlog": 0, "nm_fallback": 0, "nm_rcv_seq": 0}
    assert settled_sock_state(node, empty) == empty
    assert node.dataplane.enable() == dict.fromkeys(result, "kept")


def _retired_link(node: NodeLab) -> tuple[str, int]:
    """A second sockops link on the node cgroup, pinned under a name this version does not
    attach: what an agent version with another program leaves behind. Returns its pin name
    and link id."""
    assert node.dataplane is not None
    prog_id = node.dataplane.links()["nm_sockops"].prog_id
    prog_fd = bpf.prog_get_fd_by_id(prog_id)
    cg_fd = os.open(node.cgroup, os.O_RDONLY | os.O_DIRECTORY)
    try:
        link_fd = bpf.link_create(prog_fd, cg_fd, bpf.BPF_CGROUP_SOCK_OPS, "nm_retired")
        try:
            bpf.obj_pin(link_fd, str(node.dataplane.link_pin("nm_retired")), "nm_retired")
            link_id = bpf.link_info(link_fd, "nm_retired").id
        finally:
            bpf.close_fd(link_fd)
    finally:
        os.close(cg_fd)
        bpf.close_fd(prog_fd)
    assert bpf.link_exists(link_id)
    return "nm_retired", link_id


def _gone(link_id: int, timeout: float = 10) -> bool:
    deadline = time.monotonic() + timeout
    while bpf.link_exists(link_id):
        if time.monotonic() > deadline:
            return False
        time.sleep(0.05)  # polling the kernel for the link's release, with a deadline
    return True


def test_enable_detaches_a_link_this_version_does_not_attach(node: NodeLab) -> None:
    assert node.dataplane is not None
    name, link_id = _retired_link(node)
    result = node.dataplane.enable()
    assert result[name] == "removed"
    assert sum(v == "kept" for v in result.values()) == len(result) - 1
    assert not node.dataplane.link_pin(name).exists()
    assert _gone(link_id), "the other version's program stays attached"


def test_disable_removes_links_of_another_version_too(node: NodeLab) -> None:
    assert node.dataplane is not None
    _, link_id = _retired_link(node)
    node.dataplane.disable()
    assert not node.pin_root.exists()
    assert _gone(link_id)


def test_enable_replaces_another_versions_link_where_only_one_program_attaches(
    node: NodeLab,
) -> None:
    """The sockhash takes one sk_msg program: a link another version left there under
    another name (an upgrade that renamed the program) would make attaching ours fail
    (EBUSY), and the agent would not start. It is detached first, and ours attached, also
    while something else (bpftool, a monitoring agent) holds that link open: unpinning
    alone would not release it then."""
    assert node.dataplane is not None
    dp = node.dataplane
    old = dp.links()["nm_msg_redirect"]
    dp.link_pin("nm_msg_redirect").rename(dp.link_pin("nm_msg_verdict"))  # the old name
    held = bpf.obj_get(str(dp.link_pin("nm_msg_verdict")))
    try:
        result = dp.enable()
        assert bpf.link_info(held, "the old link").target_id == 0, "still attached"
    finally:
        bpf.close_fd(held)
    assert result["nm_msg_verdict"] == "removed"
    assert result["nm_msg_redirect"] == "created"
    assert not dp.link_pin("nm_msg_verdict").exists()
    assert _gone(old.id)
    now = dp.links()["nm_msg_redirect"]
    assert (now.target_id, now.attach_type) == (old.target_id, old.attach_type)
    assert dp.enable() == dict.fromkeys(dp.links(), "kept")


def test_enable_replaces_a_service_map_of_another_capacity_and_keeps_its_entries(
    node: NodeLab,
) -> None:
    """An upgrade (or a rollback) that changed nm_services' capacity: libbpf refused the
    pinned map, enable() failed ("load connect.bpf.o ... EINVAL") and the agent exited 1 on
    every restart, leaving the old programs unmanaged. The pin is replaced and its entries
    copied: connections to the Services keep their backends before any agent writes."""
    assert node.dataplane is not None
    b = node.pods["b"]
    b.serve(7000)
    program(node, (l4("echo", VIP, 80, (b.ip, 7000, 1)),))
    pin_other_version(node, "nm_services", ctypes.sizeof(m.Service), 1024)

    result = node.dataplane.enable()

    assert set(result.values()) == {"updated"}, result
    assert not (node.pin_root / "nm_services_old").exists()
    fd = bpf.obj_get(str(node.pin_root / "nm_services"))
    try:
        assert bpf.map_info(fd, "nm_services").max_entries == 65536
    finally:
        os.close(fd)
    result = node.pods["a"].tool("conns", "--to", f"{VIP}:80", "--count", "3")
    assert result == {"backends": {"b": 3}, "errors": {}}
    assert node.dataplane.enable() == dict.fromkeys(node.dataplane.links(), "kept")


def test_enable_replaces_a_sockhash_of_another_capacity_and_held_connections_go_on(
    node: NodeLab,
) -> None:
    """nm_socks of another capacity: a new sockhash, with the sk_msg program attached to it.
    A connection from before stays in the old one with its program and keeps working; a new
    one is short-circuited through the new map."""
    a, b, held = held_connection(node)
    pin_other_version(node, "nm_socks", 8, 131072)

    result = node.dataplane.enable()

    assert result["nm_msg_redirect"] == "created", result
    held.send("ping")
    assert held.json() == {"ok": True}
    before = stats(node)
    fresh = a.hold(f"{b.ip}:7000")
    assert fresh.json() == {"hello": "HELLO b"}
    with NodeMaps(node.pin_root) as maps:
        assert maps.count("nm_socks") == 2, "the new connection's two sockets, in the new map"
    assert stats(node)["msg_redirected"] > before["msg_redirected"]
    for proc in (held, fresh):
        proc.send("bye")
        assert proc.popen.wait(10) == 0
