"""`Dataplane`: install, converge and remove the node data plane (programs, links, pinned maps).

Everything lives under one pin root (default /sys/fs/bpf/nodemesh): maps by name, links under
`links/`. Pinned links keep the programs attached while no agent runs, and pinned maps keep
established flows and the service map alive across agent restarts.
"""

from __future__ import annotations

import ctypes
import errno
import fcntl
import logging
import os
import struct
import time
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from nodemesh.ebpf import _libbpf as bpf
from nodemesh.ebpf._build import build_objects
from nodemesh.ebpf.errors import BpfError, NodemeshEbpfError

__all__ = [
    "DEFAULT_BACKLOG_LIMIT",
    "DEFAULT_PIN_ROOT",
    "MAP_NAMES",
    "Attachment",
    "Dataplane",
    "ensure_bpffs",
]

log = logging.getLogger(__name__)

DEFAULT_PIN_ROOT = Path("/sys/fs/bpf/nodemesh")
BPFFS = Path("/sys/fs/bpf")
# Unread redirected bytes a receiving socket may hold before its writer goes to plain TCP
# (redir.bpf.c). The kernel's default tcp_wmem[2] (send buffer ceiling), so a stalled reader
# holds about what plain TCP would buffer on the sending side, and far above what a reader
# that keeps up ever has queued.
DEFAULT_BACKLOG_LIMIT = 4 << 20
MAP_NAMES = (
    "nm_backlog",
    "nm_config",
    "nm_fallback",
    "nm_local",
    "nm_orig_cookie",
    "nm_orig_tuple",
    "nm_rcv_seq",
    "nm_services",
    "nm_services6",
    "nm_socks",
    "nm_stats",
)
# Every map may change definition between versions (an upgrade, or a rollback, that changed a
# type, a size, max_entries or flags). libbpf refuses to reuse a pinned map whose definition
# differs, so `enable()` moves such a pin aside (`<name>_old`), lets libbpf create and pin the
# new map, copies the entries of the maps in COPIED, swaps every program in and then drops the
# old pin. Sockets already in nm_socks keep the sk_msg program they were inserted with (a psock
# holds its own program reference; a link update reaches only sockets inserted later), and
# that program keeps the maps it was loaded with, so an old connection's per-socket state
# (nm_backlog, nm_fallback, its nm_socks peer) stays where its program looks; the old maps go
# when their last connection does. nm_stats restarts at 0.
REPLACEABLE = MAP_NAMES
# Maps whose entries go over to the new map when key and value sizes are unchanged (a change
# of capacity or flags): what the agent wrote (config, local addresses, services), so that no
# connection misses them until the control plane answers, and the original destinations of
# connections on their way to the node Envoy. With other sizes the agent writes its maps again
# at its first converge; until then a connection to a Service is left as it was made.
COPIED = ("nm_config", "nm_local", "nm_orig_cookie", "nm_orig_tuple", "nm_services", "nm_services6")


@dataclass(frozen=True, slots=True)
class Attachment:
    """One program attached through a pinned link."""

    obj: str
    program: str
    attach_type: int
    # kernel: tp_btf, the program names it; netns: the agent's network namespace (the node's)
    target: Literal["cgroup", "sockhash", "kernel", "netns"]


WANTED = (
    Attachment("connect", "nm_sock4_connect", bpf.BPF_CGROUP_INET4_CONNECT, "cgroup"),
    Attachment("connect", "nm_sock6_connect", bpf.BPF_CGROUP_INET6_CONNECT, "cgroup"),
    Attachment("sockops", "nm_sockops", bpf.BPF_CGROUP_SOCK_OPS, "cgroup"),
    Attachment("sockopt", "nm_getsockopt", bpf.BPF_CGROUP_GETSOCKOPT, "cgroup"),
    Attachment("redir", "nm_msg_redirect", bpf.BPF_SK_MSG_VERDICT, "sockhash"),
    Attachment("backlog", "nm_msg_consumed", bpf.BPF_TRACE_RAW_TP, "kernel"),
    # Last: the guard admits the connections sockops (above, swapped in first on an upgrade)
    # records before their SYN.
    Attachment("guard", "nm_envoy_guard", bpf.BPF_SK_LOOKUP, "netns"),
)
GUARD = "nm_envoy_guard"


def _is_bpffs(path: Path) -> bool:
    with open("/proc/self/mounts") as f:
        return any(
            line.split()[1] == str(path) and line.split()[2] == "bpf" for line in f if line.strip()
        )


BPF_FS_MAGIC = 0xCAFE4A11


class _Statfs(ctypes.Structure):
    # struct statfs begins with f_type (__fsword_t, a long on x86_64 and aarch64)
    _fields_ = [("f_type", ctypes.c_long), ("rest", ctypes.c_byte * 256)]


CGROUP2_SUPER_MAGIC = 0x63677270
CGROUP_SUPER_MAGIC = 0x27E0EB  # cgroup v1


def _fs_type(path: Path) -> int:
    buf = _Statfs()
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.statfs(str(path).encode(), ctypes.byref(buf)) != 0:
        raise BpfError(f"statfs {path}", ctypes.get_errno())
    return int(buf.f_type & 0xFFFFFFFF)


def _on_bpffs(path: Path) -> bool:
    """Is `path`, or the nearest directory above it that exists, on a bpf filesystem?"""
    while not path.exists() and path.parent != path:
        path = path.parent
    return _fs_type(path) == BPF_FS_MAGIC


def _cgroup_problem(path: Path) -> str:
    """Why the programs cannot attach to `path` ("" if they can): it must be a cgroup v2
    directory. A cgroup v1 one (a hybrid host's /sys/fs/cgroup/memory/...) or a plain
    directory failed at the first link with EBADF, which said nothing about the path."""
    if not path.is_dir():
        return f"cgroup {path}: no such directory"
    fs = _fs_type(path)
    if fs == CGROUP2_SUPER_MAGIC:
        return ""
    what = "a cgroup v1 hierarchy" if fs == CGROUP_SUPER_MAGIC else f"filesystem type {fs:#x}"
    return (
        f"cgroup {path}: not a cgroup v2 directory (it is on {what}); the programs attach to "
        "cgroup v2 only, such as the pods' cgroup below /sys/fs/cgroup on a cgroup v2 host"
    )


def ensure_bpffs(root: Path = BPFFS) -> None:
    """Mount bpffs at /sys/fs/bpf if nothing is mounted there (needs CAP_SYS_ADMIN).

    Each mount is a new bpffs, seen in this mount namespace only: in a container whose
    /sys/fs/bpf is not the host's, the pins (and with them the links and maps) go when the
    container does, so the warning says so."""
    if _is_bpffs(root):
        return
    libc = ctypes.CDLL(None, use_errno=True)
    root.mkdir(parents=True, exist_ok=True)
    if libc.mount(b"bpf", str(root).encode(), b"bpf", 0, None) != 0:
        raise BpfError(f"mount bpffs at {root}", ctypes.get_errno())
    log.warning(
        "mounted bpffs at %s (nothing was mounted there): pins in it last as long as this "
        "mount. In a container, mount the host's %s into it (a hostPath volume): otherwise "
        "the data plane is removed whenever the agent's container ends, and every start "
        "begins from nothing",
        root,
        root,
    )


class Dataplane:
    """The data plane of one node: programs attached to `cgroup`, state pinned at `pin_root`.

    `enable()` converges to the wanted attachments and is idempotent: a second call (or a new
    agent process) keeps the same links and programs when the compiled code did not change, and
    swaps programs in place (`bpf_link_update`, no detach window) when it did. `disable()`
    removes every link and map pin; the kernel then frees programs and maps.

    >>> dp = Dataplane("/sys/fs/cgroup/unified/nodemesh")   # doctest: +SKIP
    >>> dp.enable()                                         # doctest: +SKIP
    {'nm_sock4_connect': 'created', ...}
    """

    def __init__(
        self,
        cgroup: str | os.PathLike[str],
        pin_root: Path = DEFAULT_PIN_ROOT,
        backlog_limit: int = DEFAULT_BACKLOG_LIMIT,
        envoy_guard: bool = True,
    ) -> None:
        self.cgroup = Path(cgroup)
        self.pin_root = Path(pin_root)
        self.backlog_limit = backlog_limit
        # `envoy_guard` False (`nodemesh agent --envoy-guard off`): the node Envoy's port is
        # not guarded (guard.bpf.c); enable() removes a guard an earlier run attached
        self.wanted = WANTED if envoy_guard else tuple(w for w in WANTED if w.target != "netns")

    @property
    def links_dir(self) -> Path:
        return self.pin_root / "links"

    def link_pin(self, program: str) -> Path:
        return self.links_dir / program

    def map_pin(self, name: str) -> Path:
        return self.pin_root / name

    # -- one agent per pin root ------------------------------------------------------------
    def try_lock(self) -> int | None:
        """Take the pin root for this process: an exclusive flock(2) on its directory (made if
        missing), which the kernel drops when the process ends, by SIGKILL too. Returns the
        fd to keep open while the process owns the data plane, or None while another process
        holds it. Two agents on one pin root would each converge the maps to their own view."""
        self._prepare_root()
        fd = os.open(self.pin_root, os.O_RDONLY | os.O_DIRECTORY)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            os.close(fd)
            if exc.errno == errno.EWOULDBLOCK:
                return None
            raise BpfError(f"lock {self.pin_root}", exc.errno or errno.EIO) from exc
        return fd

    def _prepare_root(self) -> None:
        """Mount bpffs at /sys/fs/bpf if the pin root is below it and nothing is mounted
        there, refuse a pin root on another filesystem (libbpf's EINVAL said nothing about
        where), and make the directory."""
        if self.pin_root.is_relative_to(BPFFS):
            ensure_bpffs()
        if not _on_bpffs(self.pin_root):
            raise BpfError(
                f"pin root {self.pin_root}: not on a bpf filesystem (name a directory under "
                f"{BPFFS}, or mount one there: mount -t bpf bpf DIR)",
                errno.EINVAL,
            )
        self.pin_root.mkdir(parents=True, exist_ok=True)

    def lock_holder(self) -> str:
        """Who holds the pin root's lock, for a message: "pid N" from /proc/locks (a pid of
        this PID namespace; 0 for one outside it), or "another process"."""
        try:
            st = os.stat(self.pin_root)
            dev = f"{os.major(st.st_dev):02x}:{os.minor(st.st_dev):02x}:{st.st_ino}"
            with open("/proc/locks") as f:
                for line in f:
                    fields = line.split()
                    if len(fields) > 5 and fields[1] == "FLOCK" and fields[5] == dev:
                        return f"pid {fields[4]}"
        except OSError:
            pass
        return "another process"

    # -- converge -------------------------------------------------------------------------
    def enable(self) -> dict[str, str]:
        """Attach every wanted program and detach the links of programs it does not know;
        returns {program: "created" | "updated" | "kept" | "removed"}."""
        self._prepare_root()
        problem = _cgroup_problem(self.cgroup)
        if problem:  # before anything is pinned
            raise NodemeshEbpfError(problem)
        self.links_dir.mkdir(exist_ok=True)
        objects = build_objects()
        result: dict[str, str] = {}
        with ExitStack() as stack:
            opened = {
                name: stack.enter_context(bpf.BpfObject(str(path), str(self.pin_root)))
                for name, path in objects.items()
            }
            replaced = self._set_aside_changed_maps(opened)
            loaded: dict[str, bpf.BpfObject] = {}
            for name, obj in opened.items():
                if name == "redir":
                    obj.set_rodata(struct.pack("=q", self.backlog_limit))  # nm_backlog_limit
                try:
                    obj.load()
                except BpfError as exc:
                    raise BpfError(
                        f"load {name}.bpf.o with maps pinned under {self.pin_root} (libbpf's "
                        "log before this line says why)",
                        exc.errno,
                    ) from exc
                loaded[name] = obj
            for name in replaced:
                if name in COPIED:
                    obj = next(o for o in loaded.values() if o.has_map(name))
                    self._copy_entries(name, obj.map_fd(name))
            cg_fd = os.open(self.cgroup, os.O_RDONLY | os.O_DIRECTORY)
            stack.callback(os.close, cg_fd)
            cg_id = os.stat(self.cgroup).st_ino
            netns_fd = os.open("/proc/self/ns/net", os.O_RDONLY)
            stack.callback(os.close, netns_fd)
            netns_id = os.fstat(netns_fd).st_ino
            socks_fd = loaded["redir"].map_fd("nm_socks")
            socks_id = bpf.map_info(socks_fd, "nm_socks").id
            # Where one program at a time attaches (the sockhash's sk_msg verdict), another
            # version's link must go first: ours would be refused (EBUSY). The rest go after
            # ours are attached, so that no connection goes without one meanwhile.
            result.update(self._remove_unwanted_links(exclusive_only=True))
            if "nm_orig_tuple" in replaced:
                # The guard admits what sockops records in nm_orig_tuple. While the links
                # swap, the old guard would read the old map and the new sockops write the new
                # one: pods' L7 connections refused. Detached for the swap (the port is open
                # meanwhile, as without a guard), attached again last, with the new map.
                self.link_pin(GUARD).unlink(missing_ok=True)
            for want in self.wanted:
                prog_fd = loaded[want.obj].program_fd(want.program)
                # A program loaded with a new map has the old tag (map fds are not part of
                # it) but must be swapped in all the same.
                force = bool(replaced)
                if want.target == "cgroup":
                    result[want.program] = self._converge(want, prog_fd, cg_fd, cg_id, force)
                elif want.target == "kernel":
                    result[want.program] = self._converge_trace(
                        want, loaded[want.obj], prog_fd, force
                    )
                elif want.target == "netns":
                    result[want.program] = self._converge(want, prog_fd, netns_fd, netns_id, force)
                else:
                    result[want.program] = self._converge(want, prog_fd, socks_fd, socks_id, force)
            self._warn_other_guards(netns_fd)  # (with or without ours: any one refuses)
            # Only now: an `_old` pin left by an interrupted enable() forces the swap again.
            for name in replaced:
                self.map_pin(name + "_old").unlink()
        result.update(self._remove_unwanted_links())
        log.info("data plane on %s: %s", self.cgroup, result)
        return result

    def _warn_other_guards(self, netns_fd: int) -> None:
        """Another data plane's guard in this network namespace (another pin root: an agent
        started with another --pin-root, never uninstalled) refuses the connections ours
        sends to the node Envoy (and ours, if attached, refuses its): say so (one data plane
        per node). Also with `envoy_guard` False: any guard there refuses."""
        try:
            pin = self.link_pin(GUARD)
            mine = self._prog_id_of_link(pin) if pin.exists() else 0
            for prog_id in bpf.prog_query(netns_fd, bpf.BPF_SK_LOOKUP, "the network namespace"):
                if prog_id == mine:
                    continue
                fd = bpf.prog_get_fd_by_id(prog_id)
                try:
                    name = bpf.prog_info(fd, f"program id {prog_id}").name
                finally:
                    bpf.close_fd(fd)
                if name == GUARD:
                    log.warning(
                        "another nodemesh data plane guards the node Envoy's port in this "
                        "network namespace (program id %d, not this pin root's %s): each "
                        "guard refuses the connections the other's programs send to the node "
                        "Envoy. One data plane per node: remove the other with `nodemesh agent "
                        "--uninstall --cgroup ... --pin-root <its pin root>`",
                        prog_id,
                        self.pin_root,
                    )
        except BpfError as exc:  # a look only: never in the way of enable()
            log.debug("could not look for other guards: %s", exc)

    def _prog_id_of_link(self, pin: Path) -> int:
        with self._pinned(pin) as fd:
            return bpf.link_info(fd, str(pin)).prog_id

    def _remove_unwanted_links(self, exclusive_only: bool = False) -> dict[str, str]:
        """Unpin every link in `links_dir` this version does not attach: another version's
        program (an upgrade that renamed one, a rollback from one that had more) would stay
        attached next to ours. The pins there are all ours; unpinning detaches a link that
        nothing else holds. `exclusive_only`: only the links of an attach type that takes one
        program at a time (WANTED's on the sockhash), each detached before it is unpinned, so
        that ours can attach right after."""
        wanted = {w.program for w in self.wanted}
        exclusive = {w.attach_type for w in self.wanted if w.target == "sockhash"}
        removed: dict[str, str] = {}
        for pin in sorted(self.links_dir.iterdir()):
            if pin.name in wanted:
                continue
            if exclusive_only:
                try:
                    with self._pinned(pin) as fd:
                        info = bpf.link_info(fd, str(pin))
                        if info.attach_type not in exclusive:
                            continue
                        log.warning("detaching %s: this version does not attach it", pin)
                        # Not left to the unpin: the kernel frees a link's id before it
                        # detaches the program, from a work queue, so no wait on the id
                        # would tell when the sockhash takes another program (EBUSY).
                        detached = bpf.link_detach(fd, str(pin))
                except BpfError:
                    continue  # not a link we can read: unpinned with the rest, afterwards
                pin.unlink()
                if not detached:
                    self._wait_released(info, str(pin))
            elif any(w.program == pin.name for w in WANTED):  # turned off (--envoy-guard off)
                log.info("detaching %s: turned off", pin)
                pin.unlink()
            else:
                log.warning("detaching %s: this version does not attach it", pin)
                pin.unlink()
            removed[pin.name] = "removed"
        return removed

    def _set_aside_changed_maps(self, objects: dict[str, bpf.BpfObject]) -> list[str]:
        """Move the pin of every REPLACEABLE map whose pinned attributes differ from the
        objects' definition to `<name>_old`; returns the maps with an `_old` pin (also one an
        interrupted `enable()` left behind)."""
        for name in REPLACEABLE:
            pin = self.map_pin(name)
            want = next(o.map_definition(name) for o in objects.values() if o.has_map(name))
            if pin.exists():
                with self._pinned(pin) as fd:
                    have = bpf.map_info(fd, str(pin)).definition
                if have != want:
                    log.warning(
                        "replacing pinned map %s (another version made it): %s, now %s",
                        name,
                        have,
                        want,
                    )
                    os.replace(pin, self.map_pin(name + "_old"))
        return [n for n in REPLACEABLE if self.map_pin(n + "_old").exists()]

    def _copy_entries(self, name: str, new_fd: int) -> None:
        """Copy every entry of `<name>_old` into the new map `name` when their key and value
        sizes are equal (BPF_ANY: the new map holds nothing of the agent's yet)."""
        old = self.map_pin(name + "_old")
        with self._pinned(old) as old_fd:
            have = bpf.map_info(old_fd, str(old))
            want = bpf.map_info(new_fd, name)
            if (have.key_size, have.value_size) != (want.key_size, want.value_size):
                log.warning(
                    "%s: entries not copied (key and value of %d and %d bytes, now %d and %d); "
                    "the agent writes its entries again when the control plane has answered",
                    name,
                    have.key_size,
                    have.value_size,
                    want.key_size,
                    want.value_size,
                )
                return
            key_type = ctypes.c_char * have.key_size
            value = (ctypes.c_char * have.value_size)()
            copied = 0
            for key in bpf.map_keys(old_fd, key_type, str(old)):
                if not bpf.map_lookup(old_fd, key, value, str(old)):
                    continue  # deleted meanwhile
                try:
                    bpf.map_update(new_fd, key, value, name)
                except BpfError as exc:
                    if exc.errno != errno.E2BIG:
                        raise
                    log.warning(
                        "%s: full after %d entries copied (it holds %d); the agent converges "
                        "it when the control plane has answered",
                        name,
                        copied,
                        want.max_entries,
                    )
                    return
                copied += 1
            log.info("%s: %d entries copied from the replaced map", name, copied)

    def _converge(
        self, want: Attachment, prog_fd: int, target_fd: int, target_id: int, force: bool = False
    ) -> str:
        pin = self.link_pin(want.program)
        what = f"{want.program} at {pin}"
        if pin.exists():
            link_fd = bpf.obj_get(str(pin))
            try:
                info = bpf.link_info(link_fd, what)
                if info.target_id == target_id and info.attach_type == want.attach_type:
                    tag = bpf.prog_info(prog_fd, want.program).tag
                    if not force and self._prog_tag(info.prog_id) == tag:
                        return "kept"
                    bpf.link_update(link_fd, prog_fd, what)
                    return "updated"
            finally:
                bpf.close_fd(link_fd)
            # attached elsewhere, or detached because its cgroup or map went away
            pin.unlink()
        link_fd = bpf.link_create(prog_fd, target_fd, want.attach_type, what)
        try:
            bpf.obj_pin(link_fd, str(pin), f"link {want.program}")
        finally:
            bpf.close_fd(link_fd)
        return "created"

    def _converge_trace(
        self, want: Attachment, obj: bpf.BpfObject, prog_fd: int, force: bool = False
    ) -> str:
        """tp_btf links cannot be updated in place (no `bpf_link_update` for them): a changed
        program replaces the link, the old one detached first. For that instant no read is
        counted, which leaves a count above the truth (safe: that socket only stays in
        nm_socks, or falls back sooner); both at once would subtract a read twice, below the
        truth, and a detach could then drop a redirect on its way."""
        pin = self.link_pin(want.program)
        pin.with_name(pin.name + "_new").unlink(missing_ok=True)  # from an earlier version
        if pin.exists():
            with self._pinned(pin) as link_fd:
                info = bpf.link_info(link_fd, str(pin))
            if (
                not force
                and info.attach_type == want.attach_type
                and self._prog_tag(info.prog_id) == bpf.prog_info(prog_fd, want.program).tag
            ):
                return "kept"
            pin.unlink()  # the pin held the last reference: the kernel detaches it
            self._wait_released(info, str(pin))  # no BPF_LINK_DETACH for tp_btf links
            obj.attach_pinned(want.program, str(pin))
            return "updated"
        obj.attach_pinned(want.program, str(pin))
        return "created"

    @staticmethod
    def _wait_released(info: bpf.LinkInfo, what: str, timeout: float = 5.0) -> None:
        """Until the kernel has released the unpinned link `info` and detached its program.
        It does that from a work queue, right after the last reference goes, and frees the
        link's id *before* it detaches the program: the program's id, which the link holds
        until after the detach, is what tells (no one else holds another version's)."""
        deadline = time.monotonic() + timeout
        while bpf.link_exists(info.id) or bpf.prog_exists(info.prog_id):
            if time.monotonic() > deadline:
                log.warning(
                    "link %d (%s) or its program %d still exists after %.0f s (another "
                    "holder?); attaching the new program anyway: for a moment both count reads",
                    info.id,
                    what,
                    info.prog_id,
                    timeout,
                )
                return
            time.sleep(0.01)

    @staticmethod
    def _prog_tag(prog_id: int) -> bytes:
        fd = bpf.prog_get_fd_by_id(prog_id)
        try:
            return bpf.prog_info(fd, f"id {prog_id}").tag
        finally:
            bpf.close_fd(fd)

    # -- inspect --------------------------------------------------------------------------
    def installed(self) -> bool:
        return self.pin_root.exists()

    def links(self) -> dict[str, bpf.LinkInfo]:
        """The pinned links by program name."""
        out: dict[str, bpf.LinkInfo] = {}
        for want in self.wanted:
            pin = self.link_pin(want.program)
            if pin.exists():
                with self._pinned(pin) as fd:
                    out[want.program] = bpf.link_info(fd, str(pin))
        return out

    def map_ids(self) -> dict[str, int]:
        out: dict[str, int] = {}
        for name in MAP_NAMES:
            pin = self.map_pin(name)
            if pin.exists():
                with self._pinned(pin) as fd:
                    out[name] = bpf.map_info(fd, str(pin)).id
        return out

    @staticmethod
    @contextmanager
    def _pinned(pin: Path) -> Iterator[int]:
        fd = bpf.obj_get(str(pin))
        try:
            yield fd
        finally:
            bpf.close_fd(fd)

    # -- remove ---------------------------------------------------------------------------
    def disable(self) -> None:
        """Detach everything and drop every pin; safe to call when nothing is installed."""
        if not self.pin_root.exists():
            return
        if self.links_dir.exists():
            for pin in self.links_dir.iterdir():  # ours and any other version's
                pin.unlink()
        for name in MAP_NAMES:
            self.map_pin(name).unlink(missing_ok=True)
        for name in REPLACEABLE:
            self.map_pin(name + "_old").unlink(missing_ok=True)
        if self.links_dir.exists():
            self.links_dir.rmdir()
        try:
            self.pin_root.rmdir()
        except OSError as exc:
            # Something we do not own was pinned here: leave it, but say what it is.
            left = sorted(p.name for p in self.pin_root.iterdir())
            log.warning("left %s in place (not ours): %s", self.pin_root, left)
            if not left:
                raise BpfError(f"remove {self.pin_root}", exc.errno or 16) from exc
