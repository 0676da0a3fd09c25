"""The node agents' service maps: golden files for `servicemap-*` cases, and the translator's
contract (memoized per node, always a map the agent accepts).

Golden output: tests/golden/<case>/out/servicemap/<node>.yaml (the `NodeServiceMap` as YAML),
next to the Envoy resources `test_golden.py` writes. `--update-golden` regenerates both.
"""

from __future__ import annotations

import json

import pytest
import yaml
from google.protobuf import json_format
from hypothesis import given, settings
from hypothesis import strategies as st

from nodemesh.api import TYPE_URL, from_proto, to_proto
from nodemesh.api import servicemap_pb2 as pb
from nodemesh.controlplane.builder import BuildMemo, build
from nodemesh.controlplane.store import ObjectKey, Store
from nodemesh.xds.translate import Translator, ir
from nodemesh.xds.translate.servicemap import (
    ServiceMaps,
    node_map,
    service_entries,
    service_entries_ipv6,
)
from tests.controlplane.test_golden import GOLDEN, load_case

CASES = sorted(p.name for p in GOLDEN.iterdir() if p.name.startswith("servicemap"))


def render(case: str) -> dict[str, str]:
    translation = Translator().translate(build(load_case(case).view()).mesh)
    out = {}
    for node, extra in sorted(translation.per_node.items()):
        (resource,) = extra[TYPE_URL]
        msg = pb.NodeServiceMap.FromString(resource.payload)
        from_proto(msg)  # the agent would accept it
        doc = json.loads(json_format.MessageToJson(msg, preserving_proto_field_name=True))
        out[f"{node}.yaml"] = yaml.safe_dump(doc, sort_keys=True)
    return out


@pytest.mark.parametrize("case", CASES)
def test_golden_servicemap(case: str, update_golden: bool) -> None:
    rendered = render(case)
    out_dir = GOLDEN / case / "out" / "servicemap"
    if update_golden:
        out_dir.mkdir(parents=True, exist_ok=True)
        for stale in out_dir.glob("*.yaml"):
            if stale.name not in rendered:
                stale.unlink()
        for name, text in rendered.items():
            (out_dir / name).write_text(text)
        return
    assert out_dir.is_dir(), f"no golden output for {case}: run pytest --update-golden"
    assert {p.name for p in out_dir.glob("*.yaml")} == set(rendered), f"stale files in {out_dir}"
    for name, text in rendered.items():
        assert (out_dir / name).read_text() == text, f"{case}/{name} differs (--update-golden)"


def _objects(pod_ip: str = "10.244.1.5", route: bool = False) -> list[dict[str, object]]:
    objs: list[dict[str, object]] = [
        {
            "apiVersion": "v1",
            "kind": "Node",
            "metadata": {"name": n},
            "status": {"addresses": [{"type": "InternalIP", "address": f"192.168.0.{i}"}]},
        }
        for i, n in enumerate(("node-a", "node-b"), start=1)
    ]
    objs += [
        {
            "apiVersion": "v1",
            "kind": "Service",
            "metadata": {"name": "db", "namespace": "shop"},
            "spec": {"clusterIP": "10.96.0.20", "ports": [{"port": 5432}]},
        },
        {
            "apiVersion": "v1",
            "kind": "Pod",
            "metadata": {"name": "client", "namespace": "shop"},
            "spec": {"nodeName": "node-a"},
            "status": {"phase": "Running", "podIP": pod_ip},
        },
    ]
    if route:
        objs.append(
            {
                "apiVersion": "gateway.networking.k8s.io/v1",
                "kind": "HTTPRoute",
                "metadata": {"name": "db", "namespace": "shop"},
                "spec": {
                    "parentRefs": [{"kind": "Service", "name": "db"}],
                    "rules": [{"backendRefs": [{"name": "db", "port": 5432}]}],
                },
            }
        )
    return objs


def test_unchanged_node_map_keeps_its_resource() -> None:
    store, memo, translator = Store(), BuildMemo(), Translator()
    for obj in _objects():
        store.apply(obj)
    first = translator.translate(build(store.view(), memo=memo).mesh).per_node
    store.apply(_objects(pod_ip="10.244.1.6")[3])  # only node-a's pod moves
    second = translator.translate(build(store.view(), memo=memo).mesh).per_node

    assert second["node-b"][TYPE_URL][0] is first["node-b"][TYPE_URL][0]
    assert second["node-a"][TYPE_URL][0].version != first["node-a"][TYPE_URL][0].version
    msg = pb.NodeServiceMap.FromString(second["node-a"][TYPE_URL][0].payload)
    assert list(msg.local_addresses) == ["10.244.1.6"]


def test_adding_a_route_flips_the_service_to_l7_on_every_node() -> None:
    store, memo, translator = Store(), BuildMemo(), Translator()
    for obj in _objects():
        store.apply(obj)
    before = translator.translate(build(store.view(), memo=memo).mesh).per_node
    for obj in _objects(route=True):
        store.apply(obj)
    after = translator.translate(build(store.view(), memo=memo).mesh).per_node

    for node in ("node-a", "node-b"):
        old = from_proto(pb.NodeServiceMap.FromString(before[node][TYPE_URL][0].payload))
        new = from_proto(pb.NodeServiceMap.FromString(after[node][TYPE_URL][0].payload))
        assert [s.l7 for s in old.services] == [False]
        assert [s.l7 for s in new.services] == [True]
        assert new.envoy is not None and new.envoy[1] == 15001


def test_a_deleted_pod_leaves_the_node_map() -> None:
    store, memo = Store(), BuildMemo()
    for obj in _objects():
        store.apply(obj)
    build(store.view(), memo=memo)
    store.delete(ObjectKey("Pod", "shop", "client"))
    mesh = build(store.view(), memo=memo).mesh
    assert [n.pod_ips for n in mesh.node_infos] == [(), ()]


def test_more_backends_than_the_kernel_holds_are_windowed_per_node() -> None:
    eps = tuple(ir.Endpoint(f"10.244.0.{i}", 80) for i in range(1, 41))
    info = ir.ServiceInfo("shop/big", ("10.96.0.1",), (80,), False, (eps,))
    entries = service_entries([info])
    windows = [
        {b.address for b in node_map(ir.NodeInfo(f"node-{n}"), entries, 15001).services[0].backends}
        for n in range(8)
    ]
    assert all(len(w) == 32 for w in windows)
    assert set().union(*windows) == {e.address for e in eps}


def test_duplicate_cluster_ip_keeps_the_first_service_by_name() -> None:
    a = ir.ServiceInfo("shop/a", ("10.96.0.1",), (80,), True)
    b = ir.ServiceInfo("shop/b", ("10.96.0.1",), (80,), False)
    assert [s.name for s in service_entries([b, a])] == ["shop/a:80"]


def test_ipv6_cluster_ips_stand_for_the_ipv4_one_or_are_refused_when_l7() -> None:
    dual = ir.ServiceInfo("shop/dual", ("10.96.0.1", "fd00::1"), (80, 81), False)
    l7_v6 = ir.ServiceInfo("shop/l7v6", ("fd00::2",), (80,), True)
    l4_v6 = ir.ServiceInfo("shop/l4v6", ("fd00::3",), (80,), False)
    entries = service_entries_ipv6([l4_v6, l7_v6, dual])
    assert [(e.name, e.address, e.target, e.l7) for e in entries] == [
        ("shop/dual:80", "fd00::1", "10.96.0.1", False),
        ("shop/dual:81", "fd00::1", "10.96.0.1", False),
        ("shop/l7v6:80", "fd00::2", "", True),
    ]
    model = node_map(ir.NodeInfo("n"), service_entries([dual]), 15001, entries)
    assert from_proto(to_proto(model)) == model  # the agent accepts what is produced


def test_the_agent_refuses_a_malformed_ipv6_entry_with_every_problem() -> None:
    msg = pb.NodeServiceMap(node="n")
    msg.services_ipv6.add(name="a", address="::ffff:10.0.0.1", port=80, target="10.0.0.1")
    msg.services_ipv6.add(name="b", address="fd00::1", port=0, target="not-ip")
    msg.services_ipv6.add(name="c", address="fd00::2", port=80)
    with pytest.raises(ValueError) as err:
        from_proto(msg)
    text = str(err.value)
    assert "is v4-mapped" in text and "port 0" in text and "'not-ip' is not an IPv4" in text
    assert "no target and not L7" in text


_IPV4 = st.builds(lambda a, b: f"10.{a}.0.{b}", st.integers(0, 3), st.integers(1, 4))
_IPV6 = st.builds(lambda a: f"fd00::{a:x}", st.integers(1, 4))
_POD = st.builds(lambda a: f"10.244.0.{a}", st.integers(1, 60))
_INFO = st.builds(
    lambda name, ips, ports, l7, eps: ir.ServiceInfo(
        f"ns/{name}",
        tuple(ips),
        tuple(ports),
        l7,
        tuple(tuple(ir.Endpoint(a, 8080, i % 7 == 6) for i, a in enumerate(eps)) for _ in ports),
    ),
    # names that are prefixes of each other ("web2:80" sorts before "web:80")
    st.sampled_from(["web", "web2", "a", "b"]),
    st.lists(st.one_of(_IPV4, _IPV6), min_size=1, max_size=3, unique=True),
    st.lists(st.integers(1, 3), min_size=1, max_size=3),  # a port may repeat
    st.booleans(),
    # up to 45 endpoints (every seventh draining): often more than MAX_BACKENDS (32) ready,
    # so nodes take windows of the backends
    st.one_of(
        st.lists(_POD, max_size=4, unique=True),
        st.lists(_POD, min_size=38, max_size=45, unique=True),
    ),
)
_MESHES = st.lists(
    st.lists(_INFO, max_size=5).map(lambda infos: tuple({i.name: i for i in infos}.values())),
    min_size=1,
    max_size=4,
)
_NODES = (
    ir.NodeInfo("node-a", "10.250.0.1", ("10.1.0.1", "10.1.0.2")),
    ir.NodeInfo("node-b"),
)


@settings(max_examples=100, deadline=None)
@given(_MESHES)
def test_shared_bytes_equal_the_map_encoded_whole(meshes: list[tuple[ir.ServiceInfo, ...]]) -> None:
    """ServiceMaps encodes the Services once and adds each node's fields around them: across
    a sequence of meshes (Services added, changed, removed), every node's bytes must be what
    to_proto gives for that node's whole map, including two Services on one ClusterIP:port
    (the first by Service name keeps it), a Service listing a port twice, and windows of more
    than MAX_BACKENDS backends."""
    maps = ServiceMaps()
    seen: dict[tuple[str, str], bytes] = {}  # (node, version) -> payload
    for services in meshes:
        mesh = ir.Mesh(services=services, node_infos=_NODES)
        got = maps.resources(mesh)
        fresh = ServiceMaps().resources(mesh)  # the same mesh without the history
        entries, entries6 = service_entries(services), service_entries_ipv6(services)
        for node in _NODES:
            whole = to_proto(node_map(node, entries, mesh.outbound_port, entries6))
            assert got[node.name].payload == whole.SerializeToString(deterministic=True)
            # versions hash the parts, not the payload: equal content, equal version, and
            # one version never stands for two contents
            assert got[node.name].version == fresh[node.name].version
            key = (node.name, got[node.name].version)
            assert seen.setdefault(key, got[node.name].payload) == got[node.name].payload
