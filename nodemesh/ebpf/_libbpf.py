"""ctypes binding to the system's libbpf.so.1 (1.1 or newer): only what the loader needs.

Every failing call raises `BpfError` with the operation and its subject; libbpf's own log goes
to the `nodemesh.ebpf.libbpf` logger.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import errno
import logging
import os
import struct
from dataclasses import dataclass
from typing import Any

from nodemesh.ebpf.errors import BpfError

__all__ = [
    "BPF_CGROUP_GETSOCKOPT",
    "BPF_CGROUP_INET4_CONNECT",
    "BPF_CGROUP_INET6_CONNECT",
    "BPF_ANY",
    "BPF_CGROUP_SOCK_OPS",
    "BPF_MAP_TYPE_HASH",
    "BPF_MAP_TYPE_LRU_HASH",
    "BPF_NOEXIST",
    "BPF_SK_LOOKUP",
    "BPF_SK_MSG_VERDICT",
    "BPF_TRACE_RAW_TP",
    "BpfObject",
    "LinkInfo",
    "MapDef",
    "MapInfo",
    "ProgInfo",
    "close_fd",
    "libbpf",
    "link_create",
    "link_exists",
    "link_info",
    "link_update",
    "map_create",
    "map_delete",
    "map_get_fd_by_id",
    "map_info",
    "map_keys",
    "map_lookup",
    "map_update",
    "num_possible_cpus",
    "obj_get",
    "obj_pin",
    "prog_get_fd_by_id",
    "prog_query",
    "prog_info",
]

# enum bpf_attach_type (uapi linux/bpf.h)
BPF_CGROUP_SOCK_OPS = 3
BPF_SK_MSG_VERDICT = 7
BPF_CGROUP_INET4_CONNECT = 10
BPF_CGROUP_INET6_CONNECT = 11
BPF_CGROUP_GETSOCKOPT = 21
BPF_TRACE_RAW_TP = 23
BPF_SK_LOOKUP = 36

# enum bpf_map_type
BPF_MAP_TYPE_HASH = 1
BPF_MAP_TYPE_LRU_HASH = 9

BPF_ANY = 0
BPF_NOEXIST = 1

_log = logging.getLogger("nodemesh.ebpf.libbpf")
_PRINT_FN = ctypes.CFUNCTYPE(ctypes.c_int, ctypes.c_int, ctypes.c_char_p, ctypes.c_void_p)
_LEVELS = {0: logging.WARNING, 1: logging.INFO, 2: logging.DEBUG}


class _OpenOpts(ctypes.Structure):
    # The head of struct bpf_object_open_opts; libbpf accepts a shorter `sz` from older callers.
    _fields_ = [
        ("sz", ctypes.c_size_t),
        ("object_name", ctypes.c_char_p),
        ("relaxed_maps", ctypes.c_bool),
        ("pin_root_path", ctypes.c_char_p),
    ]


class _Lib:
    def __init__(self) -> None:
        name = ctypes.util.find_library("bpf") or "libbpf.so.1"
        try:
            self.so = ctypes.CDLL(name, use_errno=True)
            self.libc = ctypes.CDLL(None, use_errno=True)
        except OSError as exc:
            raise BpfError(f"load {name} (install libbpf1)", exc.errno or 2) from exc
        so = self.so
        vp, ci, cu, cc = ctypes.c_void_p, ctypes.c_int, ctypes.c_uint32, ctypes.c_char_p
        self._sig("bpf_object__open_file", vp, [cc, ctypes.POINTER(_OpenOpts)])
        self._sig("bpf_object__load", ci, [vp])
        self._sig("bpf_object__close", None, [vp])
        self._sig("bpf_object__find_program_by_name", vp, [vp, cc])
        self._sig("bpf_object__find_map_by_name", vp, [vp, cc])
        self._sig("bpf_program__fd", ci, [vp])
        self._sig("bpf_program__attach", vp, [vp])
        self._sig("bpf_link__fd", ci, [vp])
        self._sig("bpf_link__destroy", ci, [vp])
        self._sig("bpf_map__set_initial_value", ci, [vp, vp, ctypes.c_size_t])
        self._sig("bpf_map__fd", ci, [vp])
        self._sig("bpf_map__type", ci, [vp])
        self._sig("bpf_map__key_size", cu, [vp])
        self._sig("bpf_map__value_size", cu, [vp])
        self._sig("bpf_map__max_entries", cu, [vp])
        self._sig("bpf_map__map_flags", cu, [vp])
        self._sig("bpf_map_create", ci, [ci, cc, cu, cu, cu, vp])
        self._sig("bpf_link_create", ci, [ci, ci, ci, vp])
        self._sig("bpf_link_update", ci, [ci, ci, vp])
        self._sig("bpf_link_detach", ci, [ci])
        self._sig("bpf_obj_pin", ci, [ci, cc])
        self._sig("bpf_obj_get", ci, [cc])
        self._sig("bpf_obj_get_info_by_fd", ci, [ci, vp, ctypes.POINTER(cu)])
        self._sig("bpf_prog_get_fd_by_id", ci, [cu])
        self._sig("bpf_prog_query", ci, [ci, ci, cu, ctypes.POINTER(cu), vp, ctypes.POINTER(cu)])
        self._sig("bpf_map_get_fd_by_id", ci, [cu])
        self._sig("bpf_link_get_fd_by_id", ci, [cu])
        self._sig("bpf_map_update_elem", ci, [ci, vp, vp, ctypes.c_uint64])
        self._sig("bpf_map_lookup_elem", ci, [ci, vp, vp])
        self._sig("bpf_map_delete_elem", ci, [ci, vp])
        self._sig("bpf_map_get_next_key", ci, [ci, vp, vp])
        self._sig("libbpf_num_possible_cpus", ci, [])
        self._sig("libbpf_set_print", vp, [_PRINT_FN])
        self.libc.vsnprintf.restype = ci
        self.libc.vsnprintf.argtypes = [ctypes.c_char_p, ctypes.c_size_t, cc, vp]
        self._printer = _PRINT_FN(self._print)  # kept referenced: libbpf holds the pointer
        so.libbpf_set_print(self._printer)

    def _sig(self, name: str, restype: Any, argtypes: list[Any]) -> None:
        fn = getattr(self.so, name)
        fn.restype = restype
        fn.argtypes = argtypes

    def _print(self, level: int, fmt: bytes | None, args: int | None) -> int:
        buf = ctypes.create_string_buffer(1 << 16)  # verifier logs come in one message
        # va_list is an array type on x86_64 and aarch64, so it travels as a pointer.
        self.libc.vsnprintf(buf, len(buf), fmt, args)
        text = buf.value.decode(errors="replace").rstrip()
        if text:
            _log.log(_LEVELS.get(level, logging.DEBUG), "%s", text)
        return 0


_lib: _Lib | None = None


def libbpf() -> _Lib:
    """The process-wide binding, loaded on first use."""
    global _lib
    if _lib is None:
        _lib = _Lib()
    return _lib


def _errno_of(ret: int) -> int:
    # libbpf 1.x returns -errno and also sets errno; raw syscalls return -1 and set errno.
    return -ret if ret < -1 else (ctypes.get_errno() or 1)


def _check(ret: int, operation: str) -> int:
    if ret < 0:
        raise BpfError(operation, _errno_of(ret))
    return ret


def close_fd(fd: int) -> None:
    if fd >= 0:
        os.close(fd)


class BpfObject:
    """One opened and loaded BPF ELF object. Close it (or use `with`); pinned maps and links
    outlive it, everything else goes away with it.
    """

    def __init__(self, path: str, pin_root: str) -> None:
        lib = libbpf()
        self.path = path
        opts = _OpenOpts(
            sz=ctypes.sizeof(_OpenOpts), pin_root_path=pin_root.encode(), relaxed_maps=False
        )
        ctypes.set_errno(0)
        ptr = lib.so.bpf_object__open_file(path.encode(), ctypes.byref(opts))
        if not ptr:
            raise BpfError(f"open BPF object {path}", ctypes.get_errno() or 22)
        self._obj: int | None = ptr

    def load(self) -> None:
        _check(libbpf().so.bpf_object__load(self._ptr), f"load BPF object {self.path}")

    @property
    def _ptr(self) -> int:
        if self._obj is None:
            raise ValueError(f"BPF object {self.path} is closed")
        return self._obj

    def _program(self, name: str) -> int:
        prog = libbpf().so.bpf_object__find_program_by_name(self._ptr, name.encode())
        if not prog:
            raise BpfError(f"find program {name} in {self.path}", 2)
        return int(prog)

    def program_fd(self, name: str) -> int:
        return _check(libbpf().so.bpf_program__fd(self._program(name)), f"fd of program {name}")

    def set_rodata(self, data: bytes) -> None:
        """Replace the object's `.rodata` (its `const volatile` globals) before `load()`; the
        size must be the section's, or libbpf refuses (EINVAL)."""
        m = libbpf().so.bpf_object__find_map_by_name(self._ptr, b".rodata")
        if not m:
            raise BpfError(f"find .rodata in {self.path}", 2)
        buf = ctypes.create_string_buffer(data, len(data))
        ret = libbpf().so.bpf_map__set_initial_value(m, buf, len(data))
        _check(ret, f"set .rodata of {self.path} ({len(data)} bytes)")

    def attach_pinned(self, name: str, pin: str) -> None:
        """Attach a program that names its own target (`SEC("tp_btf/name")`, fentry/fexit)
        with `bpf_program__attach` and pin the link at `pin`; the pin keeps it attached."""
        ctypes.set_errno(0)
        link = libbpf().so.bpf_program__attach(self._program(name))
        if not link:
            raise BpfError(f"attach program {name}", ctypes.get_errno() or 22)
        try:
            fd = _check(libbpf().so.bpf_link__fd(link), f"fd of link {name}")
            obj_pin(fd, pin, f"link {name}")
        finally:
            # Closes our fd only: a pinned link stays attached.
            libbpf().so.bpf_link__destroy(link)

    def _map(self, name: str) -> int:
        m = libbpf().so.bpf_object__find_map_by_name(self._ptr, name.encode())
        if not m:
            raise BpfError(f"find map {name} in {self.path}", 2)
        return int(m)

    def has_map(self, name: str) -> bool:
        return bool(libbpf().so.bpf_object__find_map_by_name(self._ptr, name.encode()))

    def map_fd(self, name: str) -> int:
        return _check(libbpf().so.bpf_map__fd(self._map(name)), f"fd of map {name}")

    def map_definition(self, name: str) -> MapDef:
        """What the object asks for (before `load()`), as libbpf compares it with a pin."""
        lib, m = libbpf().so, self._map(name)
        return MapDef(
            lib.bpf_map__type(m),
            lib.bpf_map__key_size(m),
            lib.bpf_map__value_size(m),
            lib.bpf_map__max_entries(m),
            lib.bpf_map__map_flags(m),
        )

    def close(self) -> None:
        if self._obj is not None:
            libbpf().so.bpf_object__close(self._obj)
            self._obj = None

    def __enter__(self) -> BpfObject:
        return self

    def __exit__(self, *_: object) -> None:
        self.close()


def link_create(prog_fd: int, target_fd: int, attach_type: int, what: str) -> int:
    ret = libbpf().so.bpf_link_create(prog_fd, target_fd, attach_type, None)
    return _check(ret, f"create link {what}")


def link_update(link_fd: int, prog_fd: int, what: str) -> None:
    _check(libbpf().so.bpf_link_update(link_fd, prog_fd, None), f"update link {what}")


def link_detach(link_fd: int, what: str) -> bool:
    """Detach the link's program now, in this call (the link object stays until its last
    reference goes); False where its type cannot be detached this way (EOPNOTSUPP)."""
    ret = libbpf().so.bpf_link_detach(link_fd)
    if ret < 0 and _errno_of(ret) == errno.EOPNOTSUPP:
        return False
    _check(ret, f"detach link {what}")
    return True


def obj_pin(fd: int, path: str, what: str) -> None:
    _check(libbpf().so.bpf_obj_pin(fd, path.encode()), f"pin {what} at {path}")


def obj_get(path: str) -> int:
    return _check(libbpf().so.bpf_obj_get(path.encode()), f"open pinned object {path}")


def prog_get_fd_by_id(prog_id: int) -> int:
    return _check(libbpf().so.bpf_prog_get_fd_by_id(prog_id), f"open program id {prog_id}")


def prog_query(target_fd: int, attach_type: int, what: str) -> list[int]:
    """The ids of the programs attached to `target_fd` (a cgroup, a network namespace) for
    `attach_type`."""
    ids = (ctypes.c_uint32 * 64)()
    count = ctypes.c_uint32(len(ids))
    flags = ctypes.c_uint32(0)
    ret = libbpf().so.bpf_prog_query(
        target_fd, attach_type, 0, ctypes.byref(flags), ids, ctypes.byref(count)
    )
    _check(ret, f"query the programs of {what}")
    return list(ids[: min(count.value, len(ids))])


def map_get_fd_by_id(map_id: int) -> int:
    return _check(libbpf().so.bpf_map_get_fd_by_id(map_id), f"open map id {map_id}")


def link_exists(link_id: int) -> bool:
    """Whether the kernel still has the link `link_id` (attached or on its way out)."""
    return _id_exists(libbpf().so.bpf_link_get_fd_by_id(link_id), f"link id {link_id}")


def prog_exists(prog_id: int) -> bool:
    """Whether the kernel still has the program `prog_id`."""
    return _id_exists(libbpf().so.bpf_prog_get_fd_by_id(prog_id), f"program id {prog_id}")


def _id_exists(fd: int, what: str) -> bool:
    if fd >= 0:
        close_fd(fd)
        return True
    if _errno_of(fd) == errno.ENOENT:
        return False
    _check(fd, f"open {what}")
    return True


def _info(fd: int, what: str) -> bytes:
    buf = ctypes.create_string_buffer(256)
    size = ctypes.c_uint32(len(buf))
    _check(libbpf().so.bpf_obj_get_info_by_fd(fd, buf, ctypes.byref(size)), f"info of {what}")
    return buf.raw[: size.value]


@dataclass(frozen=True, slots=True)
class LinkInfo:
    type: int
    id: int
    prog_id: int
    # cgroup id for cgroup links, map id for sockmap links, BTF id of the traced function for
    # tracing links, the network namespace's inode for netns links; 0 once detached
    target_id: int
    attach_type: int


# enum bpf_link_type
_LINK_RAW_TRACEPOINT = 1
_LINK_TRACING = 2
_LINK_CGROUP = 3
_LINK_NETNS = 5
_LINK_SOCKMAP = 14


def link_info(fd: int, what: str) -> LinkInfo:
    raw = _info(fd, f"link {what}").ljust(32, b"\0")
    ltype, lid, prog_id = struct.unpack_from("=III", raw, 0)
    if ltype == _LINK_CGROUP:
        target, attach = struct.unpack_from("=QI", raw, 16)
    elif ltype in (_LINK_SOCKMAP, _LINK_NETNS):  # (map_id | netns_ino, attach_type)
        target, attach = struct.unpack_from("=II", raw, 16)
    elif ltype == _LINK_RAW_TRACEPOINT:
        target, attach = 0, BPF_TRACE_RAW_TP  # tp_btf links; info holds only the name
    elif ltype == _LINK_TRACING:
        attach, _btf_obj_id, target = struct.unpack_from("=III", raw, 16)
    else:
        target, attach = 0, -1
    return LinkInfo(ltype, lid, prog_id, target, attach)


@dataclass(frozen=True, slots=True)
class ProgInfo:
    type: int
    id: int
    tag: bytes
    name: str


def prog_info(fd: int, what: str) -> ProgInfo:
    raw = _info(fd, f"program {what}")
    ptype, pid = struct.unpack_from("=II", raw, 0)
    tag = raw[8:16]
    name = raw[64:80].split(b"\0", 1)[0].decode()  # bpf_prog_info.name
    return ProgInfo(ptype, pid, tag, name)


@dataclass(frozen=True, slots=True)
class MapDef:
    """The attributes libbpf requires equal before it reuses a pinned map."""

    type: int
    key_size: int
    value_size: int
    max_entries: int
    flags: int


@dataclass(frozen=True, slots=True)
class MapInfo:
    type: int
    id: int
    key_size: int
    value_size: int
    max_entries: int
    name: str
    flags: int = 0

    @property
    def definition(self) -> MapDef:
        return MapDef(self.type, self.key_size, self.value_size, self.max_entries, self.flags)


def map_info(fd: int, what: str) -> MapInfo:
    raw = _info(fd, f"map {what}")
    mtype, mid, ks, vs, me, flags = struct.unpack_from("=IIIIII", raw, 0)
    name = raw[24:40].split(b"\0", 1)[0].decode()
    return MapInfo(mtype, mid, ks, vs, me, name, flags)


def map_create(
    map_type: int, name: str, key_size: int, value_size: int, max_entries: int, what: str
) -> int:
    """A new map (no options); returns its fd."""
    ret = libbpf().so.bpf_map_create(
        map_type, name.encode(), key_size, value_size, max_entries, None
    )
    return _check(ret, f"create map {what}")


def map_update(
    fd: int, key: ctypes.Array[Any] | Any, value: Any, what: str, flags: int = BPF_ANY
) -> bool:
    """Write; False when `flags` is BPF_NOEXIST and the key exists already."""
    ret = libbpf().so.bpf_map_update_elem(fd, ctypes.byref(key), ctypes.byref(value), flags)
    if ret < 0 and flags == BPF_NOEXIST and _errno_of(ret) == 17:  # EEXIST
        return False
    _check(ret, f"update {what}")
    return True


def map_lookup(fd: int, key: Any, value: Any, what: str) -> bool:
    """Fill `value`; False when the key is absent."""
    ret = libbpf().so.bpf_map_lookup_elem(fd, ctypes.byref(key), ctypes.byref(value))
    if ret < 0 and _errno_of(ret) == 2:
        return False
    _check(ret, f"look up {what}")
    return True


def map_delete(fd: int, key: Any, what: str) -> bool:
    """Delete; False when the key was already absent."""
    ret = libbpf().so.bpf_map_delete_elem(fd, ctypes.byref(key))
    if ret < 0 and _errno_of(ret) == 2:
        return False
    _check(ret, f"delete from {what}")
    return True


def map_keys(fd: int, key_type: type[Any], what: str) -> list[Any]:
    """All keys of a hash map (a snapshot; concurrent writers may add or remove entries)."""
    keys: list[Any] = []
    prev = None
    while True:
        nxt = key_type()
        prev_ref = ctypes.byref(prev) if prev is not None else None
        ret = libbpf().so.bpf_map_get_next_key(fd, prev_ref, ctypes.byref(nxt))
        if ret < 0:
            if _errno_of(ret) == 2:
                return keys
            _check(ret, f"iterate {what}")
        keys.append(nxt)
        prev = nxt


def num_possible_cpus() -> int:
    return _check(libbpf().so.libbpf_num_possible_cpus(), "count possible CPUs")
