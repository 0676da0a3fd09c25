"""Files mode's reader (`FilesSource`) against what users do to a config directory: typos in one
document, files caught while being written, bytes that are not text, a directory that goes
away, a ConfigMap mounted by the kubelet, `cp -p`. None of it may drop the last good config or
stop the reader. (The whole process with a real Envoy: tests/e2e/test_files_mode.py.)"""

from __future__ import annotations

import asyncio
import json
import logging
import os
from pathlib import Path
from typing import Any

import pytest
import yaml

from nodemesh.controlplane import files
from nodemesh.controlplane.files import FilesSource
from nodemesh.controlplane.store import ObjectKey, Store


def service(name: str, port: int = 80) -> dict[str, Any]:
    return {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": {"name": name, "namespace": "shop"},
        "spec": {"clusterIP": "10.96.0.10", "ports": [{"name": "http", "port": port}]},
    }


def web_route(*rules: dict[str, Any]) -> dict[str, Any]:
    """HTTPRoute shop/web, attached to Service web, with `rules`."""
    return {
        "apiVersion": "gateway.networking.k8s.io/v1",
        "kind": "HTTPRoute",
        "metadata": {"name": "web", "namespace": "shop"},
        "spec": {"parentRefs": [{"kind": "Service", "name": "web"}], "rules": list(rules)},
    }


def names(store: Store) -> list[str]:
    return sorted(k.name for k in store.keys("Service"))


def ports(store: Store, name: str) -> list[int]:
    obj = next(store.get(k) for k in store.keys("Service") if k.name == name)
    assert obj is not None
    return [p["port"] for p in obj["spec"]["ports"]]


def write(path: Path, *objs: dict[str, Any]) -> None:
    path.write_text(yaml.safe_dump_all(objs))


def test_a_typo_in_one_document_keeps_the_whole_files_last_good_version(tmp_path: Path) -> None:
    store = Store()
    source = FilesSource(tmp_path, store)
    write(tmp_path / "shop.yaml", service("web"), service("db"))
    source.scan()
    assert names(store) == ["db", "web"]

    broken = service("db", port=5432)
    broken["metdata"] = broken.pop("metadata")  # the typo
    write(tmp_path / "shop.yaml", service("web", port=8080), broken)
    source.scan()
    assert names(store) == ["db", "web"], "db must not be dropped"
    assert ports(store, "web") == [80], "the file counts whole, its last good version"
    assert "keeping the objects from its last good version" in source.errors["shop.yaml"]

    write(tmp_path / "shop.yaml", service("web", port=8080), service("db", port=5432))
    source.scan()
    assert (ports(store, "web"), ports(store, "db"), source.errors) == ([8080], [5432], {})


def test_files_that_are_not_text_or_not_objects_are_reported_and_the_rest_is_read(
    tmp_path: Path,
) -> None:
    """Once made start-up crash (UnicodeDecodeError) or the poller fail on every pass."""
    (tmp_path / "binary.yaml").write_bytes(b"\x89PNG\r\n\x1a\n")  # (\xff\xfe is a BOM)
    (tmp_path / "list.yaml").write_text("apiVersion: v1\nkind: List\nitems: 5\n")
    write(tmp_path / "good.yaml", service("web"))
    store = Store()
    source = FilesSource(tmp_path, store)
    source.scan()
    assert names(store) == ["web"]
    assert "not UTF-8" in source.errors["binary.yaml"]
    assert "items must be a list" in source.errors["list.yaml"]

    write(tmp_path / "more.yaml", service("db"))
    source.scan()
    assert names(store) == ["db", "web"]


def test_the_poller_reads_a_file_once_it_stopped_changing(tmp_path: Path) -> None:
    """`>` in a shell (or an editor writing in place) truncates first: the file is empty, then
    half written. The polling loop (`settled_only`) waits until a file is the same at two
    polls; an empty file keeps its objects until it is deleted."""
    store = Store()
    source = FilesSource(tmp_path, store)
    path = tmp_path / "shop.yaml"
    write(path, service("web"), service("db"))
    source.scan(settled_only=True)
    source.scan(settled_only=True)
    assert names(store) == ["db", "web"]

    write(path, service("web"))  # caught half written: db not there yet
    source.scan(settled_only=True)
    assert names(store) == ["db", "web"], "not read while it may still be written"
    write(path, service("web"), service("db", port=5432))  # the writer finished
    source.scan(settled_only=True)
    assert names(store) == ["db", "web"]
    source.scan(settled_only=True)
    assert ports(store, "db") == [5432], "read once it stayed the same for a poll"

    path.write_text("")  # truncated, and the writer stalls
    for _ in range(3):
        source.scan(settled_only=True)
    assert names(store) == ["db", "web"]
    assert "the file is empty" in source.errors["shop.yaml"]
    path.unlink()  # deleting the file is how its objects go, a poll later (it may be a move)
    source.scan(settled_only=True)
    assert names(store) == ["db", "web"]
    source.scan(settled_only=True)
    assert (names(store), source.errors) == ([], {})


def test_a_missing_directory_keeps_its_objects(tmp_path: Path) -> None:
    """`mv cfg cfg.old && mv cfg.new cfg`, or a volume not mounted yet. The message names the
    directory: the log line and `nodemesh status` showed only "config directory does not
    exist"."""
    config = tmp_path / "cfg"
    config.mkdir()
    write(config / "shop.yaml", service("web"))
    store = Store()
    source = FilesSource(config, store)
    source.scan()
    config.rename(tmp_path / "cfg.old")
    assert source.scan() is False
    assert names(store) == ["web"]
    assert source.errors[str(config)] == (
        f"config directory {config} does not exist; keeping its objects"
    )

    (tmp_path / "cfg.old").rename(config)
    source.scan()
    assert (names(store), source.errors) == (["web"], {})


def test_a_mounted_configmap_is_read_once_and_its_updates_are_seen(tmp_path: Path) -> None:
    """The kubelet's layout: the data in `..<timestamp>/`, `..data` linking to it, and each
    key as a top-level symlink through `..data`; an update swaps `..data`. The hidden
    directories once made every object a duplicate of itself."""
    first = tmp_path / "..2026_11_22_09_00_00.1"
    first.mkdir()
    write(first / "shop.yaml", service("web"))
    (tmp_path / "..data").symlink_to(first.name)
    (tmp_path / "shop.yaml").symlink_to("..data/shop.yaml")
    store = Store()
    source = FilesSource(tmp_path, store)
    source.scan()
    assert (names(store), source.errors) == (["web"], {})

    second = tmp_path / "..2026_11_22_09_05_00.2"
    second.mkdir()
    write(second / "shop.yaml", service("web", port=8080))
    (tmp_path / "..data_tmp").symlink_to(second.name)
    os.replace(tmp_path / "..data_tmp", tmp_path / "..data")
    source.scan()
    assert (ports(store, "web"), source.errors) == ([8080], {})


def test_a_configmap_swapped_while_it_is_listed_is_read_without_an_error(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The kubelet removes the old `..<timestamp>/` right after it swaps `..data`: a read
    that resolved `..data` just before found no directory to list, and reported "cannot list
    the directory" (once in 1,498 back-to-back swaps). It lists the new one."""
    first = tmp_path / "..2026_11_22_09_00_00.1"
    first.mkdir()
    write(first / "shop.yaml", service("web"))
    (tmp_path / "..data").symlink_to(first.name)
    store = Store()
    source = FilesSource(tmp_path, store)
    source.scan()
    second = tmp_path / "..2026_11_22_09_05_00.2"
    second.mkdir()
    write(second / "shop.yaml", service("web", port=8080))
    real_scandir = os.scandir

    def swapping_scandir(path: Any) -> Any:
        if Path(path) == first:  # resolved before the swap: swap and remove it now
            (tmp_path / "..data_tmp").symlink_to(second.name)
            os.replace(tmp_path / "..data_tmp", tmp_path / "..data")
            (first / "shop.yaml").unlink()
            first.rmdir()
        return real_scandir(path)

    monkeypatch.setattr(files.os, "scandir", swapping_scandir)
    source.scan()
    assert (ports(store, "web"), source.errors) == ([8080], {})


def test_a_symlinked_subdirectory_is_read(tmp_path: Path) -> None:
    config, elsewhere = tmp_path / "cfg", tmp_path / "team-a"
    config.mkdir()
    elsewhere.mkdir()
    write(elsewhere / "web.yaml", service("web"))
    (config / "team-a").symlink_to(elsewhere)
    (elsewhere / "loop").symlink_to(config)  # and a loop does not hang the reader
    store = Store()
    FilesSource(config, store).scan()
    assert names(store) == ["web"]


def test_a_replacement_with_the_same_mtime_and_size_is_seen(tmp_path: Path) -> None:
    """`cp -p`, `rsync -t` or `tar x` keep the mtime; a port 80 -> 81 keeps the size."""
    store = Store()
    source = FilesSource(tmp_path, store)
    path = tmp_path / "shop.yaml"
    write(path, service("web", port=80))
    source.scan()
    st = path.stat()
    new = tmp_path / "shop.yaml.new"
    write(new, service("web", port=81))
    assert new.stat().st_size == st.st_size
    os.utime(new, ns=(st.st_atime_ns, st.st_mtime_ns))
    new.rename(path)
    source.scan()
    assert ports(store, "web") == [81]


def test_a_route_of_the_wrong_shape_is_refused_like_invalid_yaml(tmp_path: Path) -> None:
    """`matches:` indented as an object instead of a list: the builder read it as no matches,
    so the header canary rule caught every request and sent it to the canary, Accepted. The
    API server refuses such an object against the Gateway API CRD; files mode now does too,
    and the file keeps its last good version."""
    route = web_route(
        {
            "matches": [{"headers": [{"name": "x-canary", "value": "1"}]}],
            "backendRefs": [{"name": "web-canary", "port": 80}],
        },
        {"backendRefs": [{"name": "web", "port": 80}]},
    )
    store = Store()
    source = FilesSource(tmp_path, store)
    write(tmp_path / "route.yaml", route)
    source.scan()
    assert source.errors == {}

    slip = yaml.safe_load(yaml.safe_dump(route))
    slip["spec"]["rules"][0]["matches"] = {"headers": [{"name": "x-canary", "value": "1"}]}
    slip["spec"]["parentRefs"][0]["name"] = 5
    write(tmp_path / "route.yaml", slip)
    source.scan()
    assert source.errors["route.yaml"] == (
        "route.yaml: HTTPRoute/shop/web: spec.parentRefs[0].name: must be a string, not int 5; "
        "spec.rules[0].matches: must be a list, not an object; "
        "route.yaml: keeping the objects from its last good version"
    )
    (key,) = store.keys("HTTPRoute")
    kept = store.get(key)
    assert kept is not None and isinstance(kept["spec"]["rules"][0]["matches"], list)


def test_service_and_slice_values_the_api_server_refuses_are_refused(tmp_path: Path) -> None:
    """A port out of range (or `true`) failed the translation of the whole mesh, a port twice
    gave Envoy a domain twice (its NACK of the shared routes held every route back), and an
    address of the wrong family is refused by Envoy. Kubernetes refuses these objects; files
    mode now does too, naming the field, and the file keeps its last good version."""
    store = Store()
    source = FilesSource(tmp_path, store)
    good = service("web")
    write(tmp_path / "web.yaml", good)
    source.scan()
    bad = yaml.safe_load(yaml.safe_dump(good))
    bad["spec"]["ports"] += [{"name": "again", "port": 80}, {"name": "b", "port": True}]
    bad["spec"]["clusterIP"] = "web"
    write(tmp_path / "web.yaml", bad)
    slice_ = {
        "apiVersion": "discovery.k8s.io/v1",
        "kind": "EndpointSlice",
        "metadata": {"name": "web-1", "namespace": "shop",
                     "labels": {"kubernetes.io/service-name": "web"}},
        "addressType": "IPv4",
        "ports": [{"name": "http", "port": -1}],
        "endpoints": [{"addresses": ["10.244.0.5", "fd00::5"]}],
    }  # fmt: skip
    write(tmp_path / "slice.yaml", slice_)
    source.scan()
    assert source.errors == {
        "web.yaml": "web.yaml: Service/shop/web: spec.ports[1].port: 80/TCP is spec.ports[0]'s "
        "too; spec.ports[2].port: must be a number from 1 to 65535, not True; spec.clusterIP: "
        "must be an IP address or None, not 'web'; "
        "web.yaml: keeping the objects from its last good version",
        "slice.yaml": "slice.yaml: EndpointSlice/shop/web-1: ports[0].port: must be a number "
        "from 1 to 65535, not -1; endpoints[0].addresses[1]: must be an IPv4 address "
        "(addressType IPv4), not 'fd00::5'",
    }
    kept = store.get(ObjectKey("Service", "shop", "web"))
    assert kept is not None and kept["spec"] == good["spec"]
    assert store.keys("EndpointSlice") == []


def test_node_and_pod_addresses_that_are_not_addresses_are_refused(tmp_path: Path) -> None:
    """A typo in a Node's InternalIP left the node without an Envoy address (every L7
    connection there refused), and one in a Pod's IP dropped the pod from its node's map,
    both without a word. They are refused now, naming the field, as a Service's are."""
    store = Store()
    source = FilesSource(tmp_path, store)
    node = {
        "apiVersion": "v1",
        "kind": "Node",
        "metadata": {"name": "node-a"},
        "status": {"addresses": [{"type": "Hostname", "address": "node-a"},
                                 {"type": "InternalIP", "address": "10.250.0.300"}]},
    }  # fmt: skip
    pod = {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": "p", "namespace": "shop"},
        "spec": {"nodeName": "node-a"},
        "status": {"podIP": "10.244.1.5.6", "podIPs": [{"ip": "10.244.1.5.6"}]},
    }
    write(tmp_path / "node.yaml", node)
    write(tmp_path / "pod.yaml", pod)
    source.scan()
    assert source.errors == {
        "node.yaml": "node.yaml: Node/node-a: status.addresses[1].address: must be an IP "
        "address (type InternalIP), not '10.250.0.300'",
        "pod.yaml": "pod.yaml: Pod/shop/p: status.podIP: must be an IP address, not "
        "'10.244.1.5.6'; status.podIPs[0].ip: must be an IP address, not '10.244.1.5.6'",
    }
    assert store.keys("Node") == [] and store.keys("Pod") == []
    pod["status"] = {"podIP": "10.244.1.5", "podIPs": ["10.244.1.5"]}  # not {ip: ...}
    write(tmp_path / "pod.yaml", pod)
    source.scan()
    assert source.errors["pod.yaml"] == (
        "pod.yaml: Pod/shop/p: status.podIPs[0]: must be an object {ip: ...}, not '10.244.1.5'"
    )
    node["status"]["addresses"][1]["address"] = "10.250.0.3"
    pod["status"] = {"podIP": "10.244.1.5", "podIPs": [{"ip": "10.244.1.5"}]}
    write(tmp_path / "node.yaml", node)
    write(tmp_path / "pod.yaml", pod)
    source.scan()
    assert source.errors == {}
    assert len(store.keys("Node")) == 1 and len(store.keys("Pod")) == 1


def test_names_the_api_server_refuses_are_refused(tmp_path: Path) -> None:
    """`Web`, a name with a newline, a namespace with a dot: the API server refuses each, and
    files mode took them (a newline in a name broke `nodemesh status`'s table into two rows,
    and a capital made host names no client sends)."""
    store = Store()
    source = FilesSource(tmp_path, store)
    write(tmp_path / "a.yaml", service("Web"))
    route = {
        "apiVersion": "gateway.networking.k8s.io/v1",
        "kind": "HTTPRoute",
        "metadata": {"name": "two\nlines", "namespace": "shop.prod"},
        "spec": {"parentRefs": [{"kind": "Service", "name": "web"}]},
    }
    write(tmp_path / "b.yaml", route)
    source.scan()
    assert source.errors == {
        "a.yaml": "a.yaml: Service/shop/Web: metadata.name: 'Web' is not an RFC 1035 label "
        "(lower case, at most 63)",
        "b.yaml": "b.yaml: HTTPRoute/shop.prod/two\nlines: metadata.name: 'two\\nlines' is "
        "not an RFC 1123 subdomain (lower case, at most 253); metadata.namespace: 'shop.prod' "
        "is not an RFC 1123 label (lower case, at most 63)",
    }
    assert store.keys("Service") == [] and store.keys("HTTPRoute") == []


def test_a_moved_file_keeps_its_objects_while_its_new_path_settles(tmp_path: Path) -> None:
    """`mv web.yaml team/web.yaml`, a `git checkout`, vim's save (the old file renamed aside,
    a new one written): the new path is read once it settled, a poll later, and until then the
    vanished path keeps contributing, so no snapshot goes out without the objects."""
    store = Store()
    source = FilesSource(tmp_path, store)
    write(tmp_path / "web.yaml", service("web"))
    source.scan(settled_only=True)
    source.scan(settled_only=True)
    assert names(store) == ["web"]
    (tmp_path / "team").mkdir()
    (tmp_path / "web.yaml").rename(tmp_path / "team" / "web.yaml")
    for _ in range(3):
        source.scan(settled_only=True)
        assert names(store) == ["web"]
        assert source.errors == {}
    (tmp_path / "team" / "web.yaml").unlink()  # a deletion: gone after a poll
    source.scan(settled_only=True)
    source.scan(settled_only=True)
    assert names(store) == []


def test_a_document_that_refers_to_itself_is_reported(tmp_path: Path) -> None:
    """`extra: &x {self: *x}` is valid YAML and once made the store's copy recurse until
    start-up crashed."""
    store = Store()
    source = FilesSource(tmp_path, store)
    (tmp_path / "loop.yaml").write_text(
        "apiVersion: v1\nkind: Service\nmetadata: {name: web, namespace: shop}\n"
        "spec:\n  ports: [{port: 80}]\n  extra: &x {self: *x}\n"
        "---\n"
        "apiVersion: v1\nkind: Service\nmetadata: {name: db, namespace: shop}\n"
        "spec:\n  ports: &p [{port: 5432}]\n  again: *p\n"  # shared, not a loop: fine
    )
    source.scan()
    assert "document 1 refers to itself" in source.errors["loop.yaml"]
    assert names(store) == ["db"]


def test_yaml_is_read_as_kubectl_reads_it(tmp_path: Path) -> None:
    """A date is a string (an HTTPRoute header value `2024-01-01` was a `datetime.date`, which
    the shape check refuses), a null field is no field (`timeouts: ~` was an empty section,
    which the TrafficPolicy check refuses), and `1e-3` is a number (a string to YAML 1.1, so
    the policy was refused); the API server accepts all three."""
    (tmp_path / "route.yaml").write_text(
        "apiVersion: gateway.networking.k8s.io/v1\nkind: HTTPRoute\n"
        "metadata: {name: web, namespace: shop}\n"
        "spec:\n  parentRefs: [{kind: Service, name: web}]\n"
        "  rules:\n  - matches: [{headers: [{name: x-release, value: 2024-01-01}]}]\n"
        "    backendRefs: [{name: web, port: 80}]\n"
        "---\n"
        "apiVersion: nodemesh.io/v1alpha1\nkind: TrafficPolicy\n"
        "metadata: {name: web, namespace: shop}\n"
        "spec:\n  targetRefs: [{kind: Service, name: web}]\n  timeouts: ~\n"
        "  circuitBreaker: {maxConnections: 10}\n"
        "  faultInjection: {abort: {httpStatus: 503, percent: 1e-3}}\n"
    )
    store = Store()
    source = FilesSource(tmp_path, store)
    source.scan()
    assert source.errors == {}
    (route,) = [store.get(k) for k in store.keys("HTTPRoute")]
    assert route is not None
    assert route["spec"]["rules"][0]["matches"][0]["headers"][0]["value"] == "2024-01-01"
    (policy,) = [store.get(k) for k in store.keys("TrafficPolicy")]
    assert policy is not None and "timeouts" not in policy["spec"]
    assert policy["spec"]["faultInjection"]["abort"]["percent"] == 0.001


def test_a_file_left_with_none_of_nodemeshs_objects_gives_none(tmp_path: Path) -> None:
    """Only a blank file (or `---`) is one being written, which keeps its objects. A file of
    comments, of another controller's objects or an empty List holds none of nodemesh's: its
    objects went on being served, the error said "the file is empty", and the Service moved
    to another file was refused there as a duplicate."""
    deployment = {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": {"name": "web", "namespace": "shop"},
    }
    for rest in (
        yaml.safe_dump(deployment),
        "# apiVersion: v1\n# kind: Service\n",
        "apiVersion: v1\nkind: List\nitems: []\n",
    ):
        store = Store()
        source = FilesSource(tmp_path, store)
        write(tmp_path / "app.yaml", deployment, service("web"))
        source.scan()
        assert names(store) == ["web"]
        (tmp_path / "app.yaml").write_text(rest)
        write(tmp_path / "web.yaml", service("web", port=8080))
        source.scan()
        assert (ports(store, "web"), source.errors) == ([8080], {}), rest
        (tmp_path / "web.yaml").unlink()
    write(tmp_path / "app.yaml", service("web"))
    source.scan()
    (tmp_path / "app.yaml").write_text("---\n\n---\n")  # blank: kept while it is written
    source.scan()
    assert names(store) == ["web"] and "the file is empty" in source.errors["app.yaml"]


def test_duplicates_are_reported_with_a_files_other_problems(tmp_path: Path) -> None:
    """Every duplicate a file brings is reported, also when the file has a problem already
    (here: emptied, so it keeps its objects); before, only the file's first problem was."""
    store = Store()
    source = FilesSource(tmp_path, store)
    write(tmp_path / "b.yaml", service("web"), service("db"))
    source.scan()
    (tmp_path / "b.yaml").write_text("")
    write(tmp_path / "a.yaml", service("web"), service("db"))
    source.scan()
    assert names(store) == ["db", "web"]
    problems = source.errors["b.yaml"]
    assert "the file is empty" in problems, problems
    for name in ("web", "db"):
        assert f"Service/shop/{name} is already defined in a.yaml" in problems, problems


def lol(name: str, levels: int) -> str:
    """A Service with a "billion laughs": each anchor lists the previous one ten times."""
    lines = ["  l0: &l0 [ha, ha, ha, ha, ha, ha, ha, ha, ha, ha]"]
    lines += [f"  l{i}: &l{i} [{', '.join([f'*l{i - 1}'] * 10)}]" for i in range(1, levels)]
    return (
        f"apiVersion: v1\nkind: Service\nmetadata: {{name: {name}, namespace: shop}}\n"
        "spec:\n  ports: [{port: 80}]\n" + "\n".join(lines) + "\n"
    )


def test_a_yaml_alias_bomb_is_refused_and_the_rest_is_read(tmp_path: Path) -> None:
    """Six levels of anchors are 1.2 million values in 462 bytes, nine are 1.2 billion in 645:
    the reader expanded them (and the store copied them) on the thread that serves xDS and
    /status, 0.9 s for six levels and ten times more for each level above. Anchors are per
    document, so the limit is per file: many small bombs are one big one."""
    (tmp_path / "lol.yaml").write_text(lol("lol", 6))
    (tmp_path / "lols.yaml").write_text("---\n".join(lol(f"lol{i}", 4) for i in range(10)))
    write(tmp_path / "web.yaml", service("web"))
    store = Store()
    source = FilesSource(tmp_path, store)
    source.scan()
    assert names(store) == [f"lol{i}" for i in range(8)] + ["web"]
    assert source.errors == {
        "lol.yaml": "lol.yaml: document 1 repeats 1234550 values through YAML aliases "
        "(at most 100000 in a file)",
        "lols.yaml": "; ".join(
            f"lols.yaml: document {i} repeats 12330 values through YAML aliases, 98640 more "
            "before it (at most 100000 in a file)"
            for i in (9, 10)
        ),
    }


def test_a_merge_key_bomb_is_refused_before_it_is_expanded(tmp_path: Path) -> None:
    """Merge keys copy the merged mappings' pairs before the alias limit could count them:
    ten merges of ten merges, eight deep (633 bytes), took 80 s and 0.9 GB, each level ten
    times more, while no other change was read."""
    lines = ["  m0: &m0 {a: 1}"]
    lines += [f"  m{i}: &m{i}\n    <<: [{', '.join([f'*m{i - 1}'] * 10)}]" for i in range(1, 12)]
    (tmp_path / "bomb.yaml").write_text(
        "apiVersion: v1\nkind: Service\nmetadata: {name: bomb, namespace: shop}\n"
        "spec:\n  ports: [{port: 80}]\n" + "\n".join(lines) + "\n"
    )
    write(tmp_path / "web.yaml", service("web"))
    store = Store()
    source = FilesSource(tmp_path, store)
    source.scan()
    assert names(store) == ["web"]
    assert source.errors["bomb.yaml"].startswith("bomb.yaml: invalid YAML at line ")
    assert source.errors["bomb.yaml"].endswith("merge keys (<<) copy more than 100000 values")
    # counted per file, not per document: 300 documents of 91,000 copies each took 26 s
    doc = "a0: &a0 {" + ", ".join(f"k{i}: {i}" for i in range(10)) + "}\n"
    doc += "".join(f"a{i}: &a{i} {{<<: [{', '.join([f'*a{i - 1}'] * 10)}]}}\n" for i in (1, 2, 3))
    (tmp_path / "bomb.yaml").write_text("---\n".join([doc] * 300))
    source.scan()
    assert "merge keys (<<) copy more than 100000 values" in source.errors["bomb.yaml"]


@pytest.mark.parametrize(
    "name,text,problem",
    [
        # libyaml's composer recursed in C: 40,000 levels crashed the process (SIGSEGV),
        # again at every restart while the file was there
        ("flow.yaml", "x: " + "[" * 40_000 + "]" * 40_000, "invalid YAML at line 6: nested deeper"),
        (
            "block.yaml",
            "x:\n" + "".join("  " * i + f"  k{i}:\n" for i in range(300)) + "  " * 301 + "v",
            "invalid YAML at line 206: nested deeper",
        ),
        ("dashes.yaml", "x:\n" + "- " * 40_000 + "v", "invalid YAML at line 7: nested deeper"),
        # indented lines after another of YAML's line breaks (CR, NEL, LS) than \n
        (
            "cr.yaml",
            "x:\r" + "".join(" " * i + "a:\r" + " " * i + "-\r" for i in range(120)) + "  v",
            "invalid YAML at line 207: nested deeper",
        ),
        # 500 levels raised RecursionError, which stopped every scan of the directory
        ("json.json", None, "document 1 is nested deeper"),
        # aliases of aliases nest deeper than the text
        (
            "aliases.yaml",
            "".join(f"a{i}: &a{i} [*a{i - 1}]\n" if i else "a0: &a0 [x]\n" for i in range(300)),
            "document 1 is nested deeper",
        ),
    ],
)
def test_a_document_nested_too_deep_is_refused_and_the_rest_is_read(
    tmp_path: Path, name: str, text: str | None, problem: str
) -> None:
    head = "apiVersion: v1\nkind: Service\nmetadata: {name: deep, namespace: shop}\n"
    head += "spec:\n  ports: [{port: 80}]\n"
    if text is None:
        doc = {**service("deep"), "x": "HOLE"}
        text = json.dumps(doc).replace('"HOLE"', "[" * 500 + "]" * 500)
    else:
        text = head + text + "\n"
    (tmp_path / name).write_text(text)
    write(tmp_path / "web.yaml", service("web"))
    store = Store()
    source = FilesSource(tmp_path, store)
    source.scan()
    assert names(store) == ["web"]
    assert source.errors[name].startswith(f"{name}: {problem} than 200 levels"), source.errors
    write(tmp_path / "db.yaml", service("db"))  # the directory is still read
    source.scan()
    assert names(store) == ["db", "web"]


def test_a_lone_surrogate_in_json_is_replaced_as_the_api_server_does(tmp_path: Path) -> None:
    """Half an emoji (`\\ud83d`, which a cut JavaScript string leaves) was kept, and every
    build failed encoding it, holding back every change to the mesh until the file went."""
    doc = service("web")
    doc["metadata"]["annotations"] = {"note": "HALF", "whole": "WHOLE"}
    text = json.dumps(doc).replace("HALF", "hi \\ud83d").replace("WHOLE", "\\ud83d\\ude00")
    (tmp_path / "web.json").write_text(text)
    store = Store()
    source = FilesSource(tmp_path, store)
    source.scan()
    assert source.errors == {}
    obj = store.get(ObjectKey("Service", "shop", "web"))
    assert obj is not None
    assert obj["metadata"]["annotations"] == {"note": "hi \ufffd", "whole": "\U0001f600"}
    # so are the documents before an error, which are read too (kubectl applies them)
    (tmp_path / "web.json").unlink()
    (tmp_path / "more.json").write_text(text + "\n# exported by a tool\n")
    source.scan()
    assert source.errors["more.json"].startswith("more.json: invalid JSON")
    obj = store.get(ObjectKey("Service", "shop", "web"))
    assert obj is not None and obj["metadata"]["annotations"]["note"] == "hi \ufffd"


def test_a_file_given_a_new_inode_and_written_in_pieces_is_read_once_it_settled(
    tmp_path: Path,
) -> None:
    """vim (backupcopy=no), emacs, install, tar (kubectl cp) make a new file at the path and
    write it in pieces. A rule that read a file with a new inode at once (taking it for one
    renamed in whole) read it half written: `web` was gone for two polls, or had a port never
    written. It is read once it stayed the same for a poll, as any other."""
    store = Store()
    source = FilesSource(tmp_path, store)
    path = tmp_path / "shop.yaml"
    write(path, service("api"), service("db"), service("web", 9090))
    source.scan()
    os.rename(path, tmp_path / "shop.yaml~")  # the backup (not a config file name)
    text = yaml.safe_dump_all([service("api"), service("db"), service("web", 8080)])
    cut = text.index("---", text.index("name: db"))
    with open(path, "w") as f:
        f.write(text[:cut])  # a first piece: api and db, whole
        f.flush()
        source.scan(settled_only=True)
        assert (names(store), ports(store, "web")) == (["api", "db", "web"], [9090])
        f.write(text[cut:])
    source.scan(settled_only=True)  # written: it may still change
    assert ports(store, "web") == [9090]
    source.scan(settled_only=True)
    assert (names(store), ports(store, "web"), source.errors) == (["api", "db", "web"], [8080], {})


async def test_reading_a_large_file_does_not_stall_the_control_plane(tmp_path: Path) -> None:
    """The polling loop shares its event loop with the xDS server and /status, /livez: a 1 MB
    file (a ConfigMap's limit) held them all for 7 s on every change, long enough for a
    liveness probe to fail and restart the control plane."""
    store = Store()
    source = FilesSource(tmp_path, store, interval=0.02)
    await source.start()
    try:
        big = [service(f"s{i}") for i in range(5000)]
        for obj in big:
            obj["metadata"]["labels"] = {"app": obj["metadata"]["name"], "team": "shop"}
        write(tmp_path / "big.tmp", *big)
        assert (tmp_path / "big.tmp").stat().st_size > 900_000
        (tmp_path / "big.tmp").rename(tmp_path / "big.yaml")
        loop = asyncio.get_running_loop()
        longest, last, deadline = 0.0, loop.time(), loop.time() + 60
        while len(store.keys("Service")) < 5000:
            assert loop.time() < deadline, "the file was not read within 60 s"
            await asyncio.sleep(0.01)
            longest, last = max(longest, loop.time() - last), loop.time()
        assert longest < 0.5, f"the event loop was held for {longest:.1f} s"
    finally:
        await source.stop()


def test_json_is_read_as_json(tmp_path: Path) -> None:
    """What JSON tools write: `json.dump` escapes an emoji as two UTF-16 halves, which YAML
    read as two lone surrogates (libyaml refuses them); `jq --tab` indents with tabs, which
    YAML refused; `kubectl get -o json` of two names writes one object after the other, which
    YAML refused too. kubectl reads all three."""
    route = web_route(
        {
            "matches": [{"headers": [{"name": "x-mood", "value": "\N{GRINNING FACE}"}]}],
            "backendRefs": [{"name": "web", "port": 80}],
        }
    )
    (tmp_path / "shop.json").write_text(
        json.dumps(service("web"), indent="\t") + "\n" + json.dumps(route, indent="\t") + "\n"
    )
    assert "\\ud83d\\ude00" in (tmp_path / "shop.json").read_text()
    store = Store()
    source = FilesSource(tmp_path, store)
    source.scan()
    assert source.errors == {}
    assert names(store) == ["web"]
    (key,) = store.keys("HTTPRoute")
    got = store.get(key)
    assert got is not None
    assert got["spec"]["rules"][0]["matches"][0]["headers"][0]["value"] == "\N{GRINNING FACE}"

    (tmp_path / "shop.json").write_text('{"apiVersion": "v1",\n "kind": "Service"\n')
    source.scan()
    assert source.errors["shop.json"] == (
        "shop.json: invalid JSON: Expecting ',' delimiter: line 3 column 1 (char 40); "
        "shop.json: keeping the objects from its last good version"
    )
    (tmp_path / "shop.json").write_text(  # YAML's flow style starts with `{` too
        "{apiVersion: v1, kind: Service, metadata: {name: db, namespace: shop},\n"
        " spec: {ports: [{port: 5432}]}}\n"
    )
    source.scan()
    assert (names(store), source.errors) == (["db"], {})


def test_a_key_twice_in_a_mapping_is_refused(tmp_path: Path) -> None:
    """A `backendRefs:` pasted a second time into a canary rule: YAML kept the second, so every
    request went to the canary, Accepted. The API server's strict decoding refuses it ("key
    already set in map"); so does files mode now, in YAML and in JSON. Merge keys may still
    be overridden."""
    store = Store()
    source = FilesSource(tmp_path, store)
    route = (
        "apiVersion: gateway.networking.k8s.io/v1\nkind: HTTPRoute\n"
        "metadata: {name: web, namespace: shop}\n"
        "spec:\n  parentRefs: [{kind: Service, name: web}]\n"
        "  rules:\n  - backendRefs: [{name: web, port: 80}]\n"
    )
    (tmp_path / "route.yaml").write_text(route)
    source.scan()
    assert source.errors == {}
    (tmp_path / "route.yaml").write_text(
        route + "    backendRefs: [{name: web-canary, port: 80}]\n"
    )
    source.scan()
    assert source.errors["route.yaml"] == (
        "route.yaml: invalid YAML at line 8, column 5: found key 'backendRefs' a second time "
        "(while reading a mapping, line 7); "
        "route.yaml: keeping the objects from its last good version"
    )
    (key,) = store.keys("HTTPRoute")
    kept = store.get(key)
    assert kept is not None and kept["spec"]["rules"][0]["backendRefs"][0]["name"] == "web"

    (tmp_path / "web.json").write_text(
        '{"apiVersion": "v1", "kind": "Service", "metadata": {"name": "web", "name": "db"}}'
    )
    (tmp_path / "merged.yaml").write_text(
        "apiVersion: v1\nkind: Service\nmetadata: {name: api, namespace: shop}\n"
        "spec:\n  ports: [{port: 80}]\n  x: &x {a: 1}\n  y: {<<: *x, a: 2}\n"
    )
    source.scan()
    assert source.errors["web.json"] == (
        "web.json: invalid JSON: found key 'name' a second time in an object"
    )
    assert "merged.yaml" not in source.errors
    assert names(store) == ["api"]


def kubelet_writes(volume: Path, version: str, payload: dict[str, list[dict[str, Any]]]) -> Any:
    """The kubelet's AtomicWriter, a step per `next()`: the new data in a `..<timestamp>`
    directory, `..data` swapped to it (its one atomic step), links for new keys made beside
    it, links of removed keys removed, the old data removed."""
    data = volume / f"..{version}"
    data.mkdir()
    for key, objs in payload.items():
        write(data / key, *objs)
    old = os.readlink(volume / "..data") if (volume / "..data").is_symlink() else None
    (volume / "..data_tmp").symlink_to(data.name)
    os.replace(volume / "..data_tmp", volume / "..data")
    yield
    for key in payload:
        if not (volume / key).is_symlink():
            (volume / key).symlink_to(f"..data/{key}")
    yield
    for link in volume.iterdir():
        if not link.name.startswith(".") and link.name not in payload:
            link.unlink()
    yield
    if old is not None:
        for f in (volume / old).iterdir():
            f.unlink()
        (volume / old).rmdir()
    yield


def test_a_configmap_update_is_taken_whole_and_once(tmp_path: Path) -> None:
    """An update that moves objects to a new key: the poller read the links beside `..data`,
    which the kubelet makes after its atomic swap, so a poll between the two read the changed
    key without the new one, and `db` and `api` were gone from the store for a poll (and from
    every Envoy, if a snapshot went out)."""
    store = Store()
    source = FilesSource(tmp_path, store)
    changes: list[frozenset[Any]] = []
    store.subscribe(lambda _revision, changed: changes.append(changed))
    for _ in kubelet_writes(tmp_path, "2026_11_22_09_00_00.1", {
        "a.yaml": [service("web"), service("db")], "b.yaml": [service("api")],
    }):  # fmt: skip
        pass
    source.scan(settled_only=True)
    source.scan(settled_only=True)
    assert (names(store), len(changes)) == (["api", "db", "web"], 1)

    update = kubelet_writes(tmp_path, "2026_11_22_09_05_00.2", {
        "a.yaml": [service("web", port=8080)], "c.yaml": [service("db"), service("api")],
    })  # fmt: skip
    for _ in update:
        source.scan(settled_only=True)  # a poll after each step
        assert names(store) == ["api", "db", "web"]
    for _ in range(2):
        source.scan(settled_only=True)
    assert (ports(store, "web"), source.errors) == ([8080], {})
    assert [sorted(k.name for k in c) for c in changes[1:]] == [["web"]]


def test_an_object_defined_twice_keeps_its_definition_while_its_file_moves(
    tmp_path: Path,
) -> None:
    """Of two files defining one object the first path's counts. `mv a.yaml 0.yaml` keeps it
    first, but for the poll in which a.yaml is kept while 0.yaml settles, a.yaml counted after
    every other file, and b.yaml's definition went out for that poll."""
    write(tmp_path / "a.yaml", service("web", port=80))
    write(tmp_path / "b.yaml", service("web", port=81))
    store = Store()
    source = FilesSource(tmp_path, store)
    source.scan()
    assert ports(store, "web") == [80]
    assert source.errors == {"b.yaml": "b.yaml: Service/shop/web is already defined in a.yaml"}
    (tmp_path / "a.yaml").rename(tmp_path / "0.yaml")
    for _ in range(3):
        source.scan(settled_only=True)
        assert ports(store, "web") == [80]
    assert source.errors == {"b.yaml": "b.yaml: Service/shop/web is already defined in 0.yaml"}


def test_invalid_yaml_is_reported_on_one_line_with_where(tmp_path: Path) -> None:
    """PyYAML's text spread the place over its message, naming the file `<unicode string>`."""
    (tmp_path / "web.yaml").write_text(
        "apiVersion: v1\nkind: Service\nmetadata: {name: web, namespace: shop}\n"
        "spec:\n  ports: [{port: 80}\n"
    )
    source = FilesSource(tmp_path, Store())
    source.scan()
    assert source.errors == {
        "web.yaml": "web.yaml: invalid YAML at line 6, column 1: did not find expected ',' or "
        "']' (while parsing a flow sequence, line 5)"
    }


def test_each_problem_is_logged_once(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """A second broken file logged the first one's problem again (every problem was logged on
    every change to any of them), and a fixed file was not mentioned."""
    caplog.set_level(logging.INFO, logger="nodemesh.controlplane.files")
    source = FilesSource(tmp_path, Store())
    (tmp_path / "a.yaml").write_text("kind: [\n")
    source.scan()
    (tmp_path / "b.yaml").write_text("kind: Service\n")
    source.scan()
    (tmp_path / "b.yaml").unlink()
    source.scan()
    assert [(r.levelname, r.getMessage()) for r in caplog.records] == [
        ("ERROR", source.errors["a.yaml"]),
        ("ERROR", "b.yaml: document 1: Service has no metadata"),
        ("INFO", "b.yaml: no problem any more"),
    ]


def test_a_utf16_file_with_its_byte_order_mark_is_read(tmp_path: Path) -> None:
    """What Windows PowerShell 5's `>` and `Out-File` write, and kubectl reads: it was "not
    UTF-8 text". UTF-8 with a byte order mark (Notepad's) was read already."""
    (tmp_path / "web.yaml").write_bytes(yaml.safe_dump(service("web")).encode("utf-16"))
    (tmp_path / "db.yaml").write_bytes(yaml.safe_dump(service("db")).encode("utf-8-sig"))
    (tmp_path / "api.yaml").write_bytes(b"\xff\xfe" + b"\x00\xd8")  # a lone surrogate
    store = Store()
    source = FilesSource(tmp_path, store)
    source.scan()
    assert names(store) == ["db", "web"]
    assert source.errors == {
        "api.yaml": "api.yaml: not UTF-16-LE text: 'utf-16-le' codec can't decode bytes in "
        "position 2-3: unexpected end of data"
    }


def test_a_link_to_nothing_keeps_its_objects_and_is_reported(tmp_path: Path) -> None:
    """`web.yaml -> /mnt/team/web.yaml`, or `team -> /mnt/team`, while that volume is not
    mounted: the link was skipped without a word, and the objects read through it went."""
    config, team = tmp_path / "config", tmp_path / "team"
    (team / "api").mkdir(parents=True)
    config.mkdir()
    write(team / "web.yaml", service("web"))
    write(team / "api" / "api.yaml", service("api"))
    (config / "web.yaml").symlink_to(team / "web.yaml")
    (config / "api").symlink_to(team / "api")
    (config / "db.yaml").symlink_to(team / "db.yaml")  # never there
    (config / "LICENSE").symlink_to(team / "LICENSE")  # never there, and no config
    store = Store()
    source = FilesSource(config, store)
    source.scan()
    assert names(store) == ["api", "web"]
    missing = "which does not exist; keeping the objects read through it"
    assert source.errors == {"db.yaml": f"db.yaml: a symbolic link to {team}/db.yaml, {missing}"}
    team.rename(tmp_path / "unmounted")
    for _ in range(3):
        source.scan(settled_only=True)
        assert names(store) == ["api", "web"]
    assert source.errors == {
        link: f"{link}: a symbolic link to {team}/{target}, {missing}"
        for link, target in (("api", "api"), ("db.yaml", "db.yaml"), ("web.yaml", "web.yaml"))
    }
    (tmp_path / "unmounted").rename(team)
    (config / "db.yaml").unlink()
    source.scan(settled_only=True)
    assert (names(store), source.errors) == (["api", "web"], {})


def test_other_controllers_objects_are_skipped_and_mistaken_kinds_reported(
    tmp_path: Path,
) -> None:
    """A directory of an application's manifests: a Deployment and a ConfigMap beside the
    Service and its route are skipped, and the file's changes are taken. They were problems,
    which kept the whole file at its last clean version, so the route's change was ignored.
    A kind that looks like a mistake for one of nodemesh's is still reported."""
    deployment = (
        "apiVersion: apps/v1\nkind: Deployment\nmetadata: {name: web, namespace: shop}\n"
        "spec: {replicas: 2}\n---\n"
        "apiVersion: v1\nkind: ConfigMap\nmetadata: {name: web, namespace: shop}\n---\n"
    )
    svc = "apiVersion: v1\nkind: Service\nmetadata: {name: web, namespace: shop}\n---\n"
    route = (
        "apiVersion: gateway.networking.k8s.io/v1\nkind: HTTPRoute\n"
        "metadata: {name: web, namespace: shop}\n"
        "spec:\n  parentRefs: [{kind: Service, name: web}]\n"
        "  rules: [{backendRefs: [{name: web, port: %d}]}]\n"
    )
    path = tmp_path / "app.yaml"
    store = Store()
    source = FilesSource(tmp_path, store)
    path.write_text(deployment + svc + route % 80)
    source.scan()
    assert source.errors == {}
    assert sorted(k.kind for k in store.view()) == ["HTTPRoute", "Service"]

    path.write_text(deployment + svc + route % 8080)
    os.utime(path, ns=(1, 1))  # a new stamp whatever the clock's resolution
    source.scan()
    got = store.get(ObjectKey("HTTPRoute", "shop", "web"))
    assert got is not None and got["spec"]["rules"][0]["backendRefs"][0]["port"] == 8080

    path.write_text(
        svc.replace("kind: Service", "kind: Services")
        + "apiVersion: nodemesh.io/v1alpha1\nkind: TrafficPolcy\n"
        "metadata: {name: web, namespace: shop}\n---\n"
        "apiVersion: nodemesh.io/v1alpha1\nkind: AccessPolicy\n"
        "metadata: {name: deny-all, namespace: shop}\nspec: {action: Deny}\n"
    )
    os.utime(path, ns=(2, 2))
    source.scan()
    # An AccessPolicy was taken without a word and enforced nowhere: a deny allowed all.
    assert source.errors["app.yaml"] == (
        "app.yaml: Services/shop/web: kind 'Services' is not read by nodemesh; did you mean "
        "'Service'?; app.yaml: TrafficPolcy/shop/web: kind 'TrafficPolcy' is not one of "
        "nodemesh.io's (TrafficPolicy); app.yaml: AccessPolicy/shop/deny-all: kind "
        "'AccessPolicy' is not built yet (it comes with the mesh's identities): nothing would "
        "enforce it, so it is refused; app.yaml: keeping the objects from its last good version"
    )


def test_a_new_file_with_a_syntax_error_gives_the_documents_before_it(tmp_path: Path) -> None:
    """As kubectl applies the documents before a syntax error: a new file whose third document
    is broken gives the first two, and the error is reported. It gave none. A file that was
    clean keeps its last clean version whole, as before."""
    good = "apiVersion: v1\nkind: Service\nmetadata: {name: %s, namespace: shop}\n---\n"
    path = tmp_path / "shop.yaml"
    path.write_text(good % "web" + good % "db" + "kind: Service\nmetadata: {name: [api\n")
    store = Store()
    source = FilesSource(tmp_path, store)
    source.scan()
    assert names(store) == ["db", "web"]
    assert source.errors["shop.yaml"].startswith("shop.yaml: invalid YAML at line 11, column 1")

    (tmp_path / "other.json").write_text(
        '{"apiVersion": "v1", "kind": "Service", "metadata": {"name": "api", "namespace": "shop"}}'
        '\n{"apiVersion": "v1", "kind":'
    )
    source.scan()
    assert names(store) == ["api", "db", "web"]
    assert source.errors["other.json"].startswith("other.json: invalid JSON: Expecting value")


def test_topology_hints_of_the_wrong_shape_are_refused() -> None:
    """The node agents follow hints, and one endpoint whose hints were read as absent (the
    builder skips what it cannot read) made every node ignore the Service's hints."""
    from nodemesh.controlplane.shapes import shape_problems

    def problems(hints: Any) -> list[str]:
        return shape_problems(
            {
                "apiVersion": "discovery.k8s.io/v1",
                "kind": "EndpointSlice",
                "metadata": {"name": "s", "namespace": "shop"},
                "addressType": "IPv4",
                "endpoints": [{"addresses": ["10.244.0.1"], "hints": hints}],
            }
        )

    assert problems({"forZones": [{"name": "za"}], "forNodes": [{"name": "n1"}]}) == []
    for wrong, said in (
        ({"forZones": ["za"]}, "endpoints[0].hints.forZones[0]: must be {name: <a name>}"),
        ({"forZones": {"name": "za"}}, "endpoints[0].hints.forZones: must be a list"),
        ({"forZone": [{"name": "za"}]}, "endpoints[0].hints.forZone: unknown field"),
        (["za"], "endpoints[0].hints: must be a mapping"),
    ):
        got = problems(wrong)
        assert len(got) == 1 and got[0].startswith(said), (wrong, got)
