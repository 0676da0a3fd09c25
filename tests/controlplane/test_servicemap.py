"""The node agents' feed: golden files for `servicemap-*` cases, the translator's contract
(one `MeshService` per Service shared by every node, one `NodeServiceMap` per node, each made
only when it changes), and the agent's join of them (`MapView`).

Golden output: tests/golden/<case>/out/servicemap/<node>.yaml (each node's `NodeServiceMap`)
and MeshService.yaml (every `MeshService`), next to the Envoy resources `test_golden.py`
writes. `--update-golden` regenerates both.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import pytest
import yaml
from google.protobuf import json_format
from google.protobuf.message import Message
from hypothesis import given, settings
from hypothesis import strategies as st

from nodemesh.api import (
    NODE_TYPE_URL,
    SERVICE_TYPE_URL,
    MapView,
    MeshService,
    NodeMap,
    Service,
    node_from_proto,
    node_to_proto,
    service_from_proto,
    service_to_proto,
    window,
)
from nodemesh.api import servicemap_pb2 as pb
from nodemesh.api.servicemap import MAX_BACKENDS, Backend, NodePart
from nodemesh.controlplane.builder import BuildMemo, build
from nodemesh.controlplane.files import FilesSource
from nodemesh.controlplane.pipeline import Pipeline
from nodemesh.controlplane.status_cli import render as render_status
from nodemesh.controlplane.store import ObjectKey, Store
from nodemesh.xds.cache import Resource, SnapshotCache
from nodemesh.xds.server import StatusTracker
from nodemesh.xds.translate import Translator, ir
from nodemesh.xds.translate.servicemap import (
    ServiceMaps,
    mesh_service,
    mesh_service_bytes,
    node_part,
)
from tests.controlplane.test_golden import GOLDEN, load_case
from tests.e2e.mesh import service

CASES = sorted(p.name for p in GOLDEN.iterdir() if p.name.startswith("servicemap"))


def _yaml(msg: Message) -> object:
    return json.loads(json_format.MessageToJson(msg, preserving_proto_field_name=True))


def render(case: str) -> dict[str, str]:
    translation = Translator().translate(build(load_case(case).view()).mesh)
    out = {}
    for node, extra in sorted(translation.per_node.items()):
        (resource,) = extra[NODE_TYPE_URL]
        msg = pb.NodeServiceMap.FromString(resource.payload)
        node_from_proto(msg)  # the agent would accept it
        out[f"{node}.yaml"] = yaml.safe_dump(_yaml(msg), sort_keys=True)
    services = []
    for resource in translation.shared.get(SERVICE_TYPE_URL, ()):
        svc = pb.MeshService.FromString(resource.payload)
        service_from_proto(svc)
        services.append(_yaml(svc))
    if services:
        out["MeshService.yaml"] = yaml.safe_dump(services, sort_keys=True)
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


def _services(translation: object) -> dict[str, MeshService]:
    resources: Iterable[Resource] = translation.shared[SERVICE_TYPE_URL]  # type: ignore[attr-defined]
    return {r.name: service_from_proto(pb.MeshService.FromString(r.payload)) for r in resources}


def test_a_moved_pod_changes_only_its_node_map() -> None:
    store, memo, translator = Store(), BuildMemo(), Translator()
    for obj in _objects():
        store.apply(obj)
    first = translator.translate(build(store.view(), memo=memo).mesh)
    store.apply(_objects(pod_ip="10.244.1.6")[3])  # only node-a's pod moves
    second = translator.translate(build(store.view(), memo=memo).mesh)

    before, after = first.per_node, second.per_node
    assert after["node-b"][NODE_TYPE_URL][0] is before["node-b"][NODE_TYPE_URL][0]
    assert after["node-a"][NODE_TYPE_URL][0].version != before["node-a"][NODE_TYPE_URL][0].version
    msg = pb.NodeServiceMap.FromString(after["node-a"][NODE_TYPE_URL][0].payload)
    assert list(msg.local_addresses) == ["10.244.1.6"]
    assert second.shared[SERVICE_TYPE_URL] is first.shared[SERVICE_TYPE_URL]


def test_a_pods_socket_redirect_choice_changes_only_its_node_map() -> None:
    """The annotation nodemesh.io/socket-redirect lists the Pod's IP for its node's agent:
    "on", then "off", then gone; node-b's map is never made again."""
    store, memo, translator = Store(), BuildMemo(), Translator()
    objs = _objects()
    for obj in objs:
        store.apply(obj)
    first = translator.translate(build(store.view(), memo=memo).mesh)
    made = translator.service_maps_made
    pod = objs[3]
    seen = []
    for value in ("on", "off", None):
        metadata = dict(pod["metadata"])  # type: ignore[call-overload]
        if value is not None:
            metadata["annotations"] = {"nodemesh.io/socket-redirect": value}
        store.apply({**pod, "metadata": metadata})
        t = translator.translate(build(store.view(), memo=memo).mesh)
        assert t.per_node["node-b"][NODE_TYPE_URL][0] is first.per_node["node-b"][NODE_TYPE_URL][0]
        assert translator.service_maps_made == made + 1, "only node-a's map is made again"
        made = translator.service_maps_made
        msg = pb.NodeServiceMap.FromString(t.per_node["node-a"][NODE_TYPE_URL][0].payload)
        seen.append((list(msg.socket_redirect_on), list(msg.socket_redirect_off)))
        assert list(msg.local_addresses) == ["10.244.1.5"]
    assert seen == [(["10.244.1.5"], []), ([], ["10.244.1.5"]), ([], [])]


async def test_a_pod_whose_annotation_says_neither_on_nor_off_is_told_so(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Files mode: `on` unquoted (YAML reads it as true) and "yes" count as no choice, and
    `/status`, `nodemesh status` and the log (once) say why; quoting the value fixes it."""
    pod = _objects()[3]

    def write(values: dict[str, str]) -> None:
        docs = []
        for i, (name, value) in enumerate(values.items()):
            metadata = {  # the value written as it is, quoted or not
                **pod["metadata"],  # type: ignore[dict-item]
                "name": name,
                "annotations": {"nodemesh.io/socket-redirect": "VALUE"},
            }
            status = {"phase": "Running", "podIP": f"10.244.1.{5 + i}"}
            doc = yaml.safe_dump({**pod, "status": status, "metadata": metadata})
            docs.append(doc.replace("VALUE", value))
        (tmp_path / "pods.yaml").write_text("---\n".join(docs))

    write({"client": "on", "typo": '"yes"', "fine": '"off"'})
    (tmp_path / "mesh.yaml").write_text(yaml.safe_dump_all(_objects()[:3]))  # Nodes, a Service
    store = Store()
    source = FilesSource(tmp_path, store)
    source.scan()
    p = Pipeline(store, SnapshotCache(), StatusTracker())
    with caplog.at_level(logging.WARNING, logger="nodemesh.controlplane.pipeline"):
        await p.rebuild()
        await p.rebuild()  # nothing changed: not logged again
    pods = {o["name"]: o["conditions"] for o in p.status_json()["objects"] if o["kind"] == "Pod"}
    assert sorted(pods) == ["client", "typo"]
    assert [(c["type"], c["status"], c["reason"]) for c in pods["client"]] == [
        ("SocketRedirect", "False", "UnknownValue")
    ]
    assert "True is neither" in pods["client"][0]["message"]
    assert "quote the value" in pods["client"][0]["message"]
    assert "'yes' is neither" in pods["typo"][0]["message"]
    assert "quote" not in pods["typo"][0]["message"]
    warnings = [r.getMessage() for r in caplog.records]
    assert len(warnings) == 2 and all("is neither" in w for w in warnings), warnings
    table = render_status(p.status_json())  # what `nodemesh status` prints
    assert "Pod/shop/typo" in table and "UnknownValue" in table
    assert p.kubernetes_status(ObjectKey("Pod", "shop", "fine")) is None
    # shown, never written back: the operator gets no status body for a Pod
    assert p.kubernetes_status(ObjectKey("Pod", "shop", "typo")) is None

    write({"client": '"on"', "typo": '"yes"', "fine": '"off"'})
    source.scan()
    await p.rebuild()
    pods = {o["name"] for o in p.status_json()["objects"] if o["kind"] == "Pod"}
    assert pods == {"typo"}
    assert p.translation is not None
    node_map = p.translation.per_node["node-a"][NODE_TYPE_URL][0]
    msg = pb.NodeServiceMap.FromString(node_map.payload)
    assert (list(msg.socket_redirect_on), list(msg.socket_redirect_off)) == (
        ["10.244.1.5"],
        ["10.244.1.7"],
    )


def _choosing(pod: dict[str, Any], name: str, choice: str | None) -> dict[str, Any]:
    """`pod` renamed, with the annotation nodemesh.io/socket-redirect (None: without)."""
    metadata: dict[str, Any] = {"name": name, "namespace": pod["metadata"]["namespace"]}
    if choice is not None:
        metadata["annotations"] = {"nodemesh.io/socket-redirect": choice}
    return {**pod, "metadata": metadata}


def test_an_ip_is_on_only_if_every_pod_that_claims_it_said_on() -> None:
    """IP reuse: a Pod that said "on" lingers while a new Pod that said nothing has its IP.
    The IP is not "on" (the new pod never opted in); if the new Pod says "off" it is "off";
    once the new Pod is gone, the old one's choice counts again."""
    store, memo, translator = Store(), BuildMemo(), Translator()
    objs = _objects()
    for obj in objs:
        store.apply(obj)
    pod = objs[3]

    def choices() -> tuple[list[str], list[str]]:
        t = translator.translate(build(store.view(), memo=memo).mesh)
        msg = pb.NodeServiceMap.FromString(t.per_node["node-a"][NODE_TYPE_URL][0].payload)
        return list(msg.socket_redirect_on), list(msg.socket_redirect_off)

    store.apply(_choosing(pod, "client", "on"))
    assert choices() == (["10.244.1.5"], [])
    store.apply(_choosing(pod, "client-2", None))
    assert choices() == ([], [])
    store.apply(_choosing(pod, "client-2", "off"))
    assert choices() == ([], ["10.244.1.5"])
    store.delete(ObjectKey("Pod", "shop", "client-2"))
    assert choices() == (["10.244.1.5"], [])
    assert build(store.view()).mesh == build(store.view(), memo=memo).mesh


def test_one_changed_service_makes_one_resource_for_every_node() -> None:
    store, memo, translator = Store(), BuildMemo(), Translator()
    for obj in _objects():
        store.apply(obj)
    store.apply(
        {
            "apiVersion": "v1",
            "kind": "Service",
            "metadata": {"name": "web", "namespace": "shop"},
            "spec": {"clusterIP": "10.96.0.30", "ports": [{"port": 80}]},
        }
    )
    first = translator.translate(build(store.view(), memo=memo).mesh)
    made = translator.service_maps_made
    for obj in _objects(route=True):
        store.apply(obj)
    second = translator.translate(build(store.view(), memo=memo).mesh)

    assert translator.service_maps_made - made == 1, "only shop/db's resource is made again"
    old, new = first.shared[SERVICE_TYPE_URL], second.shared[SERVICE_TYPE_URL]
    assert [r.name for r in new] == ["shop/db", "shop/web"]
    assert new[1] is old[1]
    assert [s.l7 for s in _services(first)["shop/db"].services] == [False]
    assert [s.l7 for s in _services(second)["shop/db"].services] == [True]
    for node in ("node-a", "node-b"):  # every node reads the same resource
        assert second.snapshot(node).resources(SERVICE_TYPE_URL)["shop/db"] is new[0]
        part = node_from_proto(
            pb.NodeServiceMap.FromString(second.per_node[node][NODE_TYPE_URL][0].payload)
        )
        assert part.envoy is not None and part.envoy[1] == 15001


def test_a_mesh_without_nodes_serves_no_node_map_and_every_mesh_service() -> None:
    """No Node (the last one went, or a --node-selector matches none): every agent is told it
    has no map, and still gets every MeshService, as an agent on a Node the control plane does
    not know: L4 balanced, L7 refused (no node Envoy), never past the mesh's routes. Neither
    type was served, so agents kept what they had and heard nothing more (a new one was never
    answered, and let L7 connections past the node Envoy). The incremental snapshot's versions
    are a cold one's at each step."""
    store, memo, translator = Store(), BuildMemo(), Translator()
    for obj in _objects():
        store.apply(obj)
    nodes = list(store.keys("Node"))
    assert nodes

    def translate() -> dict[str, str | None]:
        t = translator.translate(build(store.view(), memo=memo).mesh)
        cold = Translator().translate(build(store.view()).mesh)
        snap, cold_snap = t.snapshot("node-a"), cold.snapshot("node-a")
        versions = {u: snap.version(u) for u in (NODE_TYPE_URL, SERVICE_TYPE_URL)}
        assert versions == {u: cold_snap.version(u) for u in versions}
        assert {u: snap.resources(u).keys() for u in versions} == {
            u: cold_snap.resources(u).keys() for u in versions
        }
        return versions

    first = translate()
    services = translator.translate(build(store.view(), memo=memo).mesh).shared[SERVICE_TYPE_URL]
    assert services
    objects = {k: store.get(k) for k in nodes}
    for k in nodes:
        store.delete(k)
    gone = translate()
    t = translator.translate(build(store.view(), memo=memo).mesh)
    snap = t.snapshot("node-a")
    assert snap.resources(NODE_TYPE_URL) == {}
    assert t.shared[SERVICE_TYPE_URL] == services, "the same MeshServices, nodes or not"
    assert gone[SERVICE_TYPE_URL] == first[SERVICE_TYPE_URL]
    assert gone[NODE_TYPE_URL] is not None and gone[NODE_TYPE_URL] != first[NODE_TYPE_URL]
    for obj in objects.values():
        assert obj is not None
        store.apply(obj)
    assert translate() == first


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
    svc = mesh_service(ir.ServiceInfo("shop/big", ("10.96.0.1",), (80,), (), (eps,)))
    assert svc is not None and len(svc.services[0].backends) == 40, "all of them on the wire"
    windows = []
    for n in range(8):
        view = MapView(f"node-{n}")
        view.update([svc])
        entry = view.service(("10.96.0.1", 80))
        assert entry is not None
        windows.append({b.address for b in entry.backends})
    assert all(len(w) == MAX_BACKENDS for w in windows)
    assert set().union(*windows) == {e.address for e in eps}


def test_with_client_ip_affinity_a_backend_added_changes_a_window_by_itself_alone() -> None:
    """A client keeps its backend while that backend stays: over 32 backends a node's window
    must not shift with every backend added (the offset window moved whole, and with it
    about a third of the clients from backends that stayed)."""

    def windows(count: int) -> list[set[str]]:
        eps = tuple(ir.Endpoint(f"10.244.0.{i}", 80) for i in range(1, count + 1))
        info = ir.ServiceInfo("shop/big", ("10.96.0.1",), (80,), (), (eps,), False, True)
        svc = mesh_service(info)
        assert svc is not None
        out = []
        for n in range(8):
            view = MapView(f"node-{n}")
            view.update([svc])
            entry = view.service(("10.96.0.1", 80))
            assert entry is not None and entry.client_ip_affinity
            out.append({b.address for b in entry.backends})
        return out

    before, after = windows(40), windows(41)
    assert all(len(w) == MAX_BACKENDS for w in before + after)
    assert set().union(*before) == {f"10.244.0.{i}" for i in range(1, 41)}
    for old, new in zip(before, after, strict=True):
        assert len(old - new) <= 1 and new - old <= {"10.244.0.41"}, (old - new, new - old)


def test_duplicate_cluster_ip_keeps_the_first_service_by_name_in_any_order() -> None:
    a = mesh_service(ir.ServiceInfo("shop/a", ("10.96.0.1",), (80,), (80,)))
    b = mesh_service(ir.ServiceInfo("shop/b", ("10.96.0.1",), (80,), ()))
    assert a is not None and b is not None
    for order in ([a, b], [b, a]):
        view = MapView("n")
        for svc in order:
            view.update([svc])
        assert [s.name for s in view.model().services] == ["shop/a:80"]
    assert view.update(removed=["shop/a"]) == ({("10.96.0.1", 80)}, set())
    assert [s.name for s in view.model().services] == ["shop/b:80"], "the next one takes over"


def test_ipv6_cluster_ips_stand_for_the_ipv4_one_or_are_refused_when_l7() -> None:
    dual = ir.ServiceInfo("shop/dual", ("10.96.0.1", "fd00::1"), (80, 81), ())
    l7_v6 = ir.ServiceInfo("shop/l7v6", ("fd00::2",), (80,), (80,))
    l4_v6 = ir.ServiceInfo("shop/l4v6", ("fd00::3",), (80,), ())
    assert mesh_service(l4_v6) is None, "nothing for the agent to do"
    view = MapView("n")
    for info in (dual, l7_v6):
        svc = mesh_service(info)
        assert svc is not None
        wire = service_to_proto(svc).SerializeToString(deterministic=True)
        assert service_from_proto(pb.MeshService.FromString(wire)) == svc
        view.update([svc])
    assert [(e.name, e.address, e.target, e.l7) for e in view.model().services_ipv6] == [
        ("shop/dual:80", "fd00::1", "10.96.0.1", False),
        ("shop/dual:81", "fd00::1", "10.96.0.1", False),
        ("shop/l7v6:80", "fd00::2", "", True),
    ]


def test_one_ipv6_cluster_ip_spelled_two_ways_is_one_address() -> None:
    """`FD00:96::10` and `fd00:96::10` are one address, one kernel key: the agent keyed its
    view by the text, so an L4 Service written one way overwrote an L7 one written the other
    way (its IPv6 clients skipped the node Envoy), and removing it removed the L7 entry.
    The control plane reads a ClusterIP in its canonical form, and so does the agent."""
    store = Store()
    store.apply(service("a", cluster_ip="fd00:96::10"))
    store.apply(service("b", cluster_ip="FD00:96:0::10"))
    infos = {i.name: i for i in build(store.view()).mesh.services}
    assert infos["shop/b"].cluster_ips == ("fd00:96::10",)

    view = MapView("n")
    msg = pb.MeshService(name="shop/b")
    msg.services_ipv6.add(name="shop/b:80", address="FD00:96::10", port=80, l7=True)
    view.update([service_from_proto(msg)])
    msg = pb.MeshService(name="shop/a")
    msg.services_ipv6.add(name="shop/a:80", address="fd00:96::10", port=80, l7=True)
    view.update([service_from_proto(msg)])
    assert [(e.name, e.address) for e in view.model().services_ipv6] == [
        ("shop/a:80", "fd00:96::10")
    ]
    assert view.update(removed=["shop/a"]) == (set(), {("fd00:96::10", 80)})
    assert [e.name for e in view.model().services_ipv6] == ["shop/b:80"]


def test_the_agent_refuses_a_malformed_ipv6_entry_with_every_problem() -> None:
    msg = pb.MeshService(name="shop/x")
    msg.services_ipv6.add(name="a", address="::ffff:10.0.0.1", port=80, target="10.0.0.1")
    msg.services_ipv6.add(name="b", address="fd00::1", port=0, target="not-ip")
    msg.services_ipv6.add(name="c", address="fd00::2", port=80)
    with pytest.raises(ValueError) as err:
        service_from_proto(msg)
    text = str(err.value)
    assert "is v4-mapped" in text and "port 0" in text and "'not-ip' is not an IPv4" in text
    assert "no target and not L7" in text


_IPV4 = st.builds(lambda a, b: f"10.{a}.0.{b}", st.integers(0, 3), st.integers(1, 4))
_IPV6 = st.builds(lambda a: f"fd00::{a:x}", st.integers(1, 4))
_POD = st.builds(lambda a: f"10.244.0.{a}", st.integers(1, 60))
_EP_NODES = ("node-a", "node-b", "")  # endpoint i is on _EP_NODES[i % 3] ("": no nodeName)
_ZONES = {"node-a": "zone-a"}  # node-b has no zone label


def _hints(i: int, mode: int) -> tuple[tuple[str, ...], ...]:
    """Endpoint i's topology hints: none, for zones (node-a's zone for some), for nodes, for
    zones on some endpoints only (which makes kube-proxy ignore them), or for nodes on some
    only."""
    if mode == 1:
        return ((("zone-a", "zone-b", "zone-c")[i % 3],), ())
    if mode == 2:
        return (("zone-b",), (("node-a", "node-b", "node-c")[i % 4 % 3],))
    if mode == 3 and i % 2:
        return (("zone-a",), ())
    if mode == 4:  # node hints on some: kube-proxy follows the zone hints
        return ((("zone-a", "zone-b")[i % 2],), ("node-a",) if i % 2 else ())
    return ()


_INFO = st.builds(
    lambda name, ips, ports, l7, eps, local, affinity, hinting: ir.ServiceInfo(
        f"ns/{name}",
        tuple(ips),
        tuple(ports),
        tuple(p for i, p in enumerate(ports) if l7 >> i & 1),  # some ports L7
        tuple(
            tuple(
                ir.Endpoint(a, 8080, i % 7 == 6, _EP_NODES[i % 3], "", _hints(i, hinting))
                for i, a in enumerate(eps)
            )
            for _ in ports
        ),
        local,
        affinity,
    ),
    # names that are prefixes of each other ("web2:80" sorts before "web:80")
    st.sampled_from(["web", "web2", "a", "b"]),
    st.lists(st.one_of(_IPV4, _IPV6), min_size=1, max_size=3, unique=True),
    st.lists(st.integers(1, 3), min_size=1, max_size=3),  # a port may repeat
    st.integers(0, 7),  # which ports are L7 (a bit per port)
    # up to 45 endpoints (every seventh draining): often more than MAX_BACKENDS (32) ready,
    # so nodes take windows of the backends
    st.one_of(
        st.lists(_POD, max_size=4, unique=True),
        st.lists(_POD, min_size=38, max_size=45, unique=True),
    ),
    st.booleans(),  # internalTrafficPolicy: Local
    st.booleans(),  # sessionAffinity: ClientIP
    st.integers(0, 5),  # topology hints (see _hints; 0 and 5: none)
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


def _reference(services: Iterable[ir.ServiceInfo], node: str) -> NodeMap:
    """What a node's kernel maps must hold, stated directly: every Service's entries in name
    order, the first Service (then the first entry) for an address and port keeps it, and
    backends beyond the kernel's limit are windowed for the node. A Local Service's L4 entry
    holds the endpoints on the node: the ready ones, or with none ready the draining ones;
    another's with topology hints, the ready ones hinted for the node if every ready one has
    node hints and one names it, else those for its zone if every ready one has zone hints
    and one names it, else every ready one; with none ready, the draining ones."""
    v4: dict[tuple[str, int], Service] = {}
    v6: dict[tuple[str, int], object] = {}
    for info in sorted(services, key=lambda i: i.name):
        svc = mesh_service(info)
        for e in svc.services if svc else ():
            if info.node_local and not e.l7:
                eps = info.backends[info.ports.index(e.port)]
                mine = [x for x in eps if x.node == node]
                usable = {(x.address, x.port) for x in mine if not x.draining} or {
                    (x.address, x.port) for x in mine
                }
                kept = tuple(Backend(*k) for k in sorted(usable))
                e = Service(e.name, e.address, e.port, False, kept, False, e.client_ip_affinity)
            elif not e.l7 and any(x.hints for x in info.backends[info.ports.index(e.port)]):
                first: dict[tuple[str, int], ir.Endpoint] = {}
                for x in sorted(info.backends[info.ports.index(e.port)]):
                    first.setdefault((x.address, x.port), x)
                ready = [x for x in first.values() if not x.draining]
                zone = _ZONES.get(node, "")
                if ready and all(x.hints and x.hints[1] for x in ready):
                    if any(node in x.hints[1] for x in ready):
                        ready = [x for x in ready if node in x.hints[1]]
                        zone = "(decided)"
                if zone != "(decided)" and ready and all(x.hints and x.hints[0] for x in ready):
                    if any(zone in x.hints[0] for x in ready):
                        ready = [x for x in ready if zone in x.hints[0]]
                chosen = ready or [x for x in first.values() if x.draining]
                kept = tuple(Backend(x.address, x.port) for x in sorted(chosen))
                e = Service(e.name, e.address, e.port, False, kept, False, e.client_ip_affinity)
            v4.setdefault((e.address, e.port), window(e, node))
        for e6 in svc.services_ipv6 if svc else ():
            v6.setdefault((e6.address, e6.port), e6)
    return NodeMap(
        node,
        tuple(v4[k] for k in sorted(v4)),
        None,
        (),
        tuple(v6[k] for k in sorted(v6)),  # type: ignore[misc]
    )


@settings(max_examples=100, deadline=None)
@given(_MESHES)
def test_the_agents_view_fed_by_deltas_is_the_mesh(
    meshes: list[tuple[ir.ServiceInfo, ...]],
) -> None:
    """Across a sequence of meshes (Services added, changed, removed), an agent that gets only
    the MeshService resources that changed (as delta ADS sends them) holds exactly the
    reference map for its node, including two Services on one ClusterIP:port, a Service
    listing a port twice, and more backends than the kernel holds; and the keys it is told
    to rewrite cover every entry that changed."""
    maps = ServiceMaps()
    views = {n: MapView(n) for n in ("node-a", "node-b")}
    for n, view in views.items():
        view.part = NodePart(n, zone=_ZONES.get(n, ""))
    held: dict[str, Resource] = {}
    before = {n: v.model() for n, v in views.items()}
    for services in meshes:
        current = {r.name: r for r in maps.service_resources(services)}
        fresh = {r.name: r for r in ServiceMaps().service_resources(services)}
        assert {n: r.version for n, r in current.items()} == {
            n: r.version for n, r in fresh.items()
        }, "a Service's version depends on its content only"
        upserts = [
            service_from_proto(pb.MeshService.FromString(r.payload))
            for name, r in sorted(current.items())
            if held.get(name) is None or held[name].version != r.version
        ]
        removed = sorted(held.keys() - current.keys())
        held = current
        for node, view in views.items():
            keys4, keys6 = view.update(upserts, removed)
            got = view.model()
            assert got == _reference(services, node)
            old = before[node]
            old4 = {(e.address, e.port): e for e in old.services}
            new4 = {(e.address, e.port): e for e in got.services}
            assert {k for k in old4.keys() | new4.keys() if old4.get(k) != new4.get(k)} <= keys4
            old6 = {(e.address, e.port): e for e in old.services_ipv6}
            new6 = {(e.address, e.port): e for e in got.services_ipv6}
            assert {k for k in old6.keys() | new6.keys() if old6.get(k) != new6.get(k)} <= keys6
            before[node] = got


@given(
    st.lists(_POD, unique=True),
    st.booleans(),
    st.lists(_POD, unique=True),
    st.lists(_POD, unique=True),
)
def test_a_node_map_is_what_node_to_proto_makes(
    pod_ips: list[str], envoy: bool, on: list[str], off: list[str]
) -> None:
    """The translator skips sorting the pod IPs and the Pods' choices (build keeps them
    sorted): same bytes. A choice for an IP that is not the node's pod IP is not listed."""
    node = ir.NodeInfo("n", "10.250.0.1" if envoy else "", tuple(sorted(pod_ips)))
    chose = ir.SocketRedirectPods("n", tuple(sorted(on)), tuple(sorted(off)))
    (resource,) = ServiceMaps().node_resources([node], 15001, [chose]).values()
    part = node_part(node, 15001, chose)
    want = node_to_proto(part).SerializeToString(deterministic=True)
    assert resource.payload == want
    assert set(part.redirect_on) == set(on) & set(pod_ips)
    assert set(part.redirect_off) == set(off) & set(pod_ips)


# Endpoints as the encoder may meet them outside a build: unsorted, repeated, target ports
# that differ (0 is left out on the wire), addresses that are no canonical IPv4 dotted quad.
_ANY_ENDPOINT = st.builds(
    ir.Endpoint,
    st.one_of(_POD, _IPV6, st.sampled_from(["010.0.0.1", "", "10.0.0.256", "1.2.3.4 "])),
    st.sampled_from([0, 80, 8080, 65535]),
    st.booleans(),
    st.sampled_from(["", "node-a", "nœud-\u00e9" * 30]),  # (a long one: a 2-byte length)
    st.just(""),
    st.sampled_from([(), (("zone-a",), ()), ((), ("node-a", "n\u00e9")), (("z",) * 70, ())]),
)
_ODD_INFO = st.builds(
    lambda name, ips, ports, l7, eps, local, affinity: ir.ServiceInfo(
        f"ns/{name}",
        tuple(ips),
        tuple(ports),
        tuple(p for i, p in enumerate(ports) if l7 >> i & 1),
        tuple(tuple(eps) for _ in ports),
        local,
        affinity,
    ),
    st.sampled_from(["web", "a"]),
    st.lists(st.one_of(_IPV4, _IPV6, st.just("None")), max_size=3),
    st.lists(st.integers(0, 3), min_size=1, max_size=3),
    st.integers(0, 7),
    st.lists(_ANY_ENDPOINT, max_size=12),
    st.booleans(),
    st.booleans(),
)


@settings(max_examples=300, deadline=None)
@given(_INFO | _ODD_INFO)
def test_the_hand_encoded_mesh_service_is_what_protobuf_makes(info: ir.ServiceInfo) -> None:
    svc = mesh_service(info)
    want = service_to_proto(svc).SerializeToString(deterministic=True) if svc else None
    assert mesh_service_bytes(info) == want


async def test_a_deleted_node_is_told_its_map_is_gone_and_still_follows_the_services() -> None:
    """Its snapshot falls back to the shared one: no NodeServiceMap (so delta ADS sends the
    removal to its agent), the same MeshService set as every node, and later changes."""
    from nodemesh.controlplane.pipeline import Pipeline
    from nodemesh.xds.cache import SnapshotCache

    store, cache = Store(), SnapshotCache()
    for obj in _objects():
        store.apply(obj)
    p = Pipeline(store, cache)
    await p.rebuild()
    before = cache.get_snapshot("node-b")
    assert before is not None and list(before.resources(NODE_TYPE_URL)) == ["node-b"]

    store.delete(ObjectKey("Node", "", "node-b"))
    await p.rebuild()
    gone = cache.get_snapshot("node-b")
    assert gone is not None and gone.resources(NODE_TYPE_URL) == {}
    assert gone.version(NODE_TYPE_URL) is not None, "an empty set, not a missing type"
    for obj in _objects(route=True):
        store.apply(obj)
    await p.rebuild()
    later = cache.get_snapshot("node-b")
    assert later is not None and p.snapshot is not None
    assert later.version(SERVICE_TYPE_URL) == p.snapshot.version(SERVICE_TYPE_URL)
    assert later.version(SERVICE_TYPE_URL) != gone.version(SERVICE_TYPE_URL)


def test_an_agent_that_knows_no_local_reads_a_local_service_as_before() -> None:
    """Agents older than `node_local` read `backends` only: for a Local Service it holds what it
    held before (the ready endpoints of every node), not every endpoint with terminating
    ones among them, which such an agent would have balanced over while ready ones exist."""
    eps = (
        ir.Endpoint("10.244.1.5", 8080, True, "node-a"),
        ir.Endpoint("10.244.2.5", 8080, False, "node-b"),
    )
    local = ir.ServiceInfo("shop/web", ("10.96.0.10",), (80,), (), (eps,), node_local=True)
    old = pb.MeshService.FromString(mesh_service_bytes(local) or b"")
    old.services[0].ClearField("node_local")  # what an older agent's protobuf keeps
    old.services[0].ClearField("per_node_backends")
    (entry,) = service_from_proto(old).services
    assert [b.address for b in entry.backends] == ["10.244.2.5"]
    (entry,) = service_from_proto(
        pb.MeshService.FromString(mesh_service_bytes(local) or b"")
    ).services
    assert [b.address for b in entry.for_node("node-a").backends] == ["10.244.1.5"]
    assert [b.address for b in entry.for_node("node-b").backends] == ["10.244.2.5"]


def test_a_windowed_l7_entry_stays_l7() -> None:
    """A node's window of more than MAX_BACKENDS backends keeps the entry's L7 flag: an L7
    entry rebuilt as L4 would send its connections around the node Envoy."""
    many = tuple(Backend(f"10.244.1.{i}", 8080) for i in range(MAX_BACKENDS + 5))
    for l7 in (True, False):
        entry = window(Service("shop/web", "10.96.0.10", 80, l7, many), "node-1")
        assert len(entry.backends) == MAX_BACKENDS and entry.l7 is l7


# Service shop/web: an HTTP port and a Postgres one
WEB_WITH_DB = {
    "apiVersion": "v1",
    "kind": "Service",
    "metadata": {"name": "web", "namespace": "shop"},
    "spec": {
        "clusterIP": "10.96.0.10",
        "ports": [
            {"name": "http", "port": 80},
            {"name": "db", "port": 5432, "appProtocol": "postgresql"},
        ],
    },
}


def test_a_policy_on_ports_that_are_not_http_says_it_applies_nowhere() -> None:
    """A TrafficPolicy whose target has no HTTP port (a `sectionName` naming the Postgres
    port, or a Service of TCP ports only) applies nowhere: those connections stay L4,
    kernel-direct. Its status says so (ResolvedRefs=False naming the ports), as a route's
    parentRef there is NoMatchingParent, instead of all targets resolved; the ports stay L4."""
    store = Store()
    store.apply(WEB_WITH_DB)
    store.apply(
        {
            "apiVersion": "nodemesh.io/v1alpha1",
            "kind": "TrafficPolicy",
            "metadata": {"name": "db", "namespace": "shop"},
            "spec": {
                "targetRefs": [
                    {"group": "", "kind": "Service", "name": "web", "sectionName": "db"}
                ],
                "circuitBreaker": {"maxConnections": 10},
            },
        }
    )
    result = build(store.view())
    resolved = next(
        c
        for c in result.conditions[ObjectKey("TrafficPolicy", "shop", "db")]
        if c.type == "ResolvedRefs"
    )
    assert (resolved.status, resolved.reason, resolved.message) == (
        "False",
        "TargetNotFound",
        "Service shop/web has no HTTP port to apply to (5432: appProtocol 'postgresql')",
    )
    (info,) = result.mesh.services
    assert info.l7_ports == ()
    (cluster,) = (c for c in result.mesh.clusters if c.port == 5432)
    assert cluster.circuit_breaker is None


def _policy(name: str, created: str, section: str = "", **spec: Any) -> dict[str, Any]:
    target: dict[str, Any] = {"group": "", "kind": "Service", "name": "web"}
    if section:
        target["sectionName"] = section
    return {
        "apiVersion": "nodemesh.io/v1alpha1",
        "kind": "TrafficPolicy",
        "metadata": {"name": name, "namespace": "shop", "creationTimestamp": created},
        "spec": {"targetRefs": [target], **spec},
    }


def _conditions(result: Any, name: str) -> dict[str, Any]:
    return {c.type: c for c in result.conditions[ObjectKey("TrafficPolicy", "shop", name)]}


def test_a_policy_on_the_whole_service_leaves_its_port_that_is_not_http_alone() -> None:
    """Without `sectionName`, a policy applies to the Service's HTTP ports only, as the
    reference says. Its settings also went to the Postgres port's cluster, which no request
    uses: a policy overridden on the HTTP port was said to be Programmed, and the loser's
    message named the Postgres port as overridden."""
    store = Store()
    store.apply(WEB_WITH_DB)
    store.apply(_policy("port", "2026-01-01T00:00:00Z", "http", circuitBreaker={"maxRequests": 9}))
    store.apply(_policy("whole", "2026-01-02T00:00:00Z", circuitBreaker={"maxRequests": 1}))
    result = build(store.view())
    breakers = {c.name: c.circuit_breaker for c in result.mesh.clusters}
    assert breakers["shop/web:5432"] is None
    assert breakers["shop/web:80"] is not None and breakers["shop/web:80"].max_requests == 9
    accepted = _conditions(result, "whole")["Accepted"]
    assert accepted.message == (
        "Policy is accepted; overridden by older or more specific policies: circuitBreaker on "
        "shop/web:80 by TrafficPolicy/shop/port"
    )
    translation = Translator().translate(result.mesh)
    origins = {o for (t, _), held in translation.origins.items() for o in held}
    assert "TrafficPolicy/shop/whole" not in origins  # so Programmed says NothingToProgram


def test_a_policy_on_a_headless_service_says_what_of_it_applies() -> None:
    """Clients of a headless Service connect to its pods, so its route-level settings apply
    nowhere (a route there is NoMatchingParent); its cluster settings apply where it is a
    route's backend. The policy said nothing of it."""
    store = Store()
    headless = service("web")
    headless["spec"]["clusterIP"] = "None"
    store.apply(headless)
    store.apply(_policy("t", "2026-01-01T00:00:00Z", timeouts={"request": "1s"}))
    store.apply(_policy("cb", "2026-01-01T00:00:00Z", circuitBreaker={"maxRequests": 5}))
    result = build(store.view())
    assert _conditions(result, "t")["Accepted"].message == (
        "Policy is accepted; headless (clusterIP: None): shop/web: its clients connect to its "
        "pods directly, so retry, request and idle timeouts and fault injection do not apply "
        "to them; the cluster settings apply where it is a route's backend"
    )
    assert _conditions(result, "cb")["Accepted"].message == "Policy is accepted"


def test_an_address_in_two_slices_reaches_envoy_once() -> None:
    """While the EndpointSlice controller moves an endpoint between slices, the two copies may
    differ in their hints (or conditions): Envoy must get the address once (its ready copy),
    not twice at double weight."""
    store = Store()
    store.apply(service("web"))
    for name, hints in (("web-1", {"forZones": [{"name": "za"}]}), ("web-2", None)):
        endpoint: dict[str, Any] = {"addresses": ["10.244.1.1"], "conditions": {"ready": True}}
        if hints:
            endpoint["hints"] = hints
        store.apply(
            {
                "apiVersion": "discovery.k8s.io/v1",
                "kind": "EndpointSlice",
                "metadata": {
                    "name": name,
                    "namespace": "shop",
                    "labels": {"kubernetes.io/service-name": "web"},
                },
                "addressType": "IPv4",
                "ports": [{"name": "http", "port": 8080}],
                "endpoints": [endpoint],
            }
        )
    (cla,) = [c for c in build(store.view()).mesh.endpoints if c.cluster == "shop/web:80"]
    assert [(e.address, e.port) for e in cla.endpoints] == [("10.244.1.1", 8080)]
