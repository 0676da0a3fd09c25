"""The loader converges: enable twice changes nothing, and the map writer writes only changes."""

from __future__ import annotations

from nodemesh.api import Backend, NodeMap, Service
from nodemesh.ebpf import NodeMaps
from nodemesh.ebpf.testing import NodeLab


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
