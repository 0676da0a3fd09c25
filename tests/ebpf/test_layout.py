"""User space and kernel agree: ctypes mirrors match the BTF of the compiled objects, and the
committed protobuf code is what protoc generates from servicemap.proto.
"""

from __future__ import annotations

import ctypes
import json
import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest

from nodemesh.ebpf import _maps as m
from nodemesh.ebpf._build import OBJECTS, build_objects
from tests.support import need

MIRRORS: dict[str, type[ctypes.Structure]] = {
    "nm_svc_key": m.SvcKey,
    "nm_svc6_key": m.Svc6Key,
    "nm_svc6": m.Svc6,
    "nm_backend": m.Backend,
    "nm_service": m.Service,
    "nm_tuple": m.Tuple,
    "nm_orig_dst": m.OrigDst,
    "nm_config": m.Config,
    "nm_stats": m.Stats,
}


def _btf_structs(obj: Path) -> dict[str, dict[str, Any]]:
    out = subprocess.run(
        ["bpftool", "-j", "btf", "dump", "file", str(obj)], capture_output=True, text=True
    )
    assert out.returncode == 0, out.stderr
    return {t["name"]: t for t in json.loads(out.stdout)["types"] if t["kind"] == "STRUCT"}


@pytest.mark.parametrize("obj_name", OBJECTS)
def test_ctypes_mirrors_match_btf(obj_name: str) -> None:
    need(shutil.which("clang") and shutil.which("bpftool"), "clang and bpftool (make setup)")
    structs = _btf_structs(build_objects()[obj_name])
    for name, mirror in MIRRORS.items():
        btf = structs.get(name)
        if btf is None:
            continue  # this object never mentions the struct
        assert btf["size"] == ctypes.sizeof(mirror), f"{name} size"
        got = [(f["name"], f["bits_offset"] // 8) for f in btf["members"]]
        want = [(f[0], getattr(mirror, f[0]).offset) for f in mirror._fields_]
        assert got == want, f"{name} fields differ from the ctypes mirror"
    assert "nm_service" in structs or obj_name != "connect"


def test_the_loader_writes_the_whole_rodata_of_redir() -> None:
    """Dataplane.enable() replaces redir's .rodata with one little-endian s64 (the backlog
    limit): that must stay the section's only variable."""
    need(shutil.which("clang") and shutil.which("bpftool"), "clang and bpftool (make setup)")
    out = subprocess.run(
        ["bpftool", "-j", "btf", "dump", "file", str(build_objects()["redir"])],
        capture_output=True,
        text=True,
    )
    assert out.returncode == 0, out.stderr
    types = json.loads(out.stdout)["types"]
    (sec,) = [t for t in types if t["kind"] == "DATASEC" and t["name"] == ".rodata"]
    names = {t["id"]: t["name"] for t in types}
    assert [(names[v["type_id"]], v["offset"], v["size"]) for v in sec["vars"]] == [
        ("nm_backlog_limit", 0, 8)
    ]


def test_committed_protobuf_code_is_current(tmp_path: Path) -> None:
    from nodemesh.api._generate import generate

    api = Path(__file__).resolve().parents[2] / "nodemesh" / "api"
    for fresh in generate(tmp_path):
        assert fresh.read_text() == (api / fresh.name).read_text(), (
            f"{fresh.name} is stale: run python -m nodemesh.api._generate"
        )


def test_the_flag_constants_are_the_headers() -> None:
    """Every flag `_maps` mirrors has the value of the #define of that name in nodemesh.h
    (no compiler needed: the defines are plain `(1U << n)`)."""
    header = (Path(m.__file__).parent / "bpf" / "nodemesh.h").read_text()
    defines = dict(re.findall(r"^#define (NM_[A-Z0-9_]+) \(1U << (\d+)\)", header, re.M))
    mirrored = {name: getattr(m, name) for name in m.__all__ if name.startswith("NM_")}
    assert mirrored, "no flags in _maps.__all__"
    assert {n: 1 << int(defines[n]) if n in defines else None for n in mirrored} == mirrored


def test_the_limits_are_the_headers() -> None:
    """The sizes `_maps` mirrors are the header's: the backends a Service value holds, and the
    deepest node Envoy cgroup connect4/6 look for (the agent refuses a deeper one)."""
    header = (Path(m.__file__).parent / "bpf" / "nodemesh.h").read_text()
    defines = dict(re.findall(r"^#define (NM_MAX_[A-Z_]+) (\d+)$", header, re.M))
    assert defines == {
        "NM_MAX_BACKENDS": str(m.MAX_BACKENDS),
        "NM_MAX_CGROUP_LEVEL": str(m.MAX_CGROUP_LEVEL),
    }
