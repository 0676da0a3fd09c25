"""`NodeMaps`: the pinned maps of one node data plane, read and written from user space.

`apply()` writes a `NodeMap` with minimal updates: only entries whose bytes differ are written,
entries no longer wanted are deleted, so flows of unchanged services never notice.
"""

from __future__ import annotations

import ctypes
import enum
import errno
import os
import socket
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from nodemesh.api.servicemap import MapView, NodeMap, NodePart, Service, ServiceIPv6
from nodemesh.ebpf import _libbpf as bpf
from nodemesh.ebpf import _maps as m
from nodemesh.ebpf.errors import BpfError, ServiceMapError
from nodemesh.ebpf.loader import DEFAULT_PIN_ROOT

__all__ = ["ApplyResult", "NodeMaps", "SocketRedirect"]


class SocketRedirect(enum.Enum):
    """Which same-node connections carry their payload socket to socket (sk_msg, the
    sockhash): the agent's `--socket-redirect`. A Pod annotated `nodemesh.io/socket-redirect:
    "off"` is left out in every mode; the node Envoy counts as a Pod that says "on"."""

    ALL = "all"  # every pair of local pods
    OPTED_IN = "opted-in"  # only pairs whose both Pods say "on" (a kernel that fails the probe)
    NONE = "none"

    @property
    def flags(self) -> int:
        """Its `nm_config.flags` bits."""
        return _REDIRECT_FLAGS[self]


_REDIRECT_FLAGS = {
    SocketRedirect.ALL: m.NM_CFG_SOCKET_REDIRECT,
    SocketRedirect.OPTED_IN: m.NM_CFG_REDIRECT_OPTED_IN,
    SocketRedirect.NONE: 0,
}
_REDIRECT_MASK = m.NM_CFG_SOCKET_REDIRECT | m.NM_CFG_REDIRECT_OPTED_IN


def _addr(text: str) -> int:
    """An IPv4 address as the u32 whose memory holds it in network order."""
    return int.from_bytes(socket.inet_aton(text), "little")


def _port(port: int) -> int:
    return int.from_bytes(port.to_bytes(2, "big"), "little")


def addr_text(value: int) -> str:
    return socket.inet_ntoa(value.to_bytes(4, "little"))


def svc6_key(svc: ServiceIPv6) -> m.Svc6Key:
    key = m.Svc6Key()
    key.addr = (ctypes.c_uint32 * 4).from_buffer_copy(
        socket.inet_pton(socket.AF_INET6, svc.address)
    )
    key.port = _port(svc.port)
    return key


def svc6_value(svc: ServiceIPv6) -> m.Svc6:
    return m.Svc6(_addr(svc.target) if svc.target else 0, m.NM_SVC6_L7 if svc.l7 else 0)


def port_number(value: int) -> int:
    return int.from_bytes(value.to_bytes(2, "little"), "big")


@dataclass(frozen=True, slots=True)
class ApplyResult:
    written: int
    deleted: int
    unchanged: int


def service_value(svc: Service) -> m.Service:
    if len(svc.backends) > m.MAX_BACKENDS:
        raise ServiceMapError(
            f"service {svc.name}: {len(svc.backends)} backends, the kernel map holds "
            f"{m.MAX_BACKENDS}"
        )
    value = m.Service()
    value.flags = (m.NM_SVC_L7 if svc.l7 else 0) | (
        m.NM_SVC_AFFINITY if svc.client_ip_affinity else 0
    )
    value.n_backends = len(svc.backends)
    value.total_weight = sum(b.weight for b in svc.backends)
    for i, b in enumerate(svc.backends):
        value.backends[i] = m.Backend(_addr(b.address), _port(b.port), b.weight)
    return value


class NodeMaps:
    """File descriptors of the pinned maps under `pin_root`. Close when done."""

    def __init__(self, pin_root: Path = DEFAULT_PIN_ROOT) -> None:
        self.pin_root = Path(pin_root)
        self._fds: dict[str, int] = {}
        try:
            for name in (
                "nm_services",
                "nm_services6",
                "nm_config",
                "nm_local",
                "nm_stats",
                "nm_orig_tuple",
                "nm_backlog",
                "nm_fallback",
                "nm_rcv_seq",
                "nm_socks",
            ):
                self._fds[name] = bpf.obj_get(str(self.pin_root / name))
        except BaseException:
            self.close()
            raise

    def close(self) -> None:
        for fd in self._fds.values():
            os.close(fd)
        self._fds.clear()

    def __enter__(self) -> NodeMaps:
        return self

    def __exit__(self, *_: object) -> None:
        self.close()

    # -- reading --------------------------------------------------------------------------
    def _read_hash(self, name: str, key_type: type[Any], value_type: type[Any]) -> dict[bytes, Any]:
        fd = self._fds[name]
        out: dict[bytes, Any] = {}
        for key in bpf.map_keys(fd, key_type, name):
            value = value_type()
            if bpf.map_lookup(fd, key, value, name):
                out[bytes(key)] = value
        return out

    def services(self) -> dict[tuple[str, int], m.Service]:
        raw = self._read_hash("nm_services", m.SvcKey, m.Service)
        result = {}
        for kb, value in raw.items():
            key = m.SvcKey.from_buffer_copy(kb)
            result[(addr_text(key.addr), port_number(key.port))] = value
        return result

    def services_ipv6(self) -> dict[tuple[str, int], m.Svc6]:
        raw = self._read_hash("nm_services6", m.Svc6Key, m.Svc6)
        result = {}
        for kb, value in raw.items():
            key = m.Svc6Key.from_buffer_copy(kb)
            addr = socket.inet_ntop(socket.AF_INET6, bytes(key.addr))
            result[(addr, port_number(key.port))] = value
        return result

    def config(self) -> m.Config:
        value = m.Config()
        bpf.map_lookup(self._fds["nm_config"], ctypes.c_uint32(0), value, "nm_config")
        return value

    def count(self, name: str) -> int:
        """Entries in one of the tuple-keyed maps (nm_backlog, nm_fallback, nm_rcv_seq,
        nm_socks, nm_orig_tuple): a snapshot."""
        return len(bpf.map_keys(self._fds[name], m.Tuple, name))

    def sock_state(self, name: str) -> dict[tuple[str, int, str, int], int]:
        """nm_backlog or nm_fallback as {(saddr, sport, daddr, dport): value}."""
        value_type = ctypes.c_int64 if name == "nm_backlog" else ctypes.c_uint32
        out = {}
        for kb, value in self._read_hash(name, m.Tuple, value_type).items():
            k = m.Tuple.from_buffer_copy(kb)
            key = (
                addr_text(k.saddr),
                port_number(k.sport),
                addr_text(k.daddr),
                port_number(k.dport),
            )
            out[key] = value.value
        return out

    def stats(self) -> dict[str, int]:
        """Counters summed over CPUs."""
        ncpu = bpf.num_possible_cpus()
        # the kernel pads each CPU's value to 8 bytes; Stats is a multiple of 8 already
        values = (m.Stats * ncpu)()
        bpf.map_lookup(self._fds["nm_stats"], ctypes.c_uint32(0), values, "nm_stats")
        names = [f[0] for f in m.Stats._fields_]
        return {n: sum(getattr(v, n) for v in values) for n in names}

    # -- writing --------------------------------------------------------------------------
    def set_socket_redirect(self, mode: SocketRedirect) -> bool:
        """Set only the socket-redirect switch in nm_config (the agent does it at start, before
        its first map arrives, so the switch of a previous run does not rule until then);
        returns whether it changed. New connections follow; sockets already in nm_socks stay
        until they close or leave."""
        cfg = self.config()
        flags = cfg.flags & ~_REDIRECT_MASK | mode.flags
        if flags == cfg.flags:
            return False
        cfg.flags = flags
        bpf.map_update(self._fds["nm_config"], ctypes.c_uint32(0), cfg, "nm_config")
        return True

    def set_envoy_cgroup(self, cgroup_id: int) -> bool:
        """Set only the node Envoy's cgroup id in nm_config (the agent does it at start and
        whenever the directory it was given is a new cgroup); returns whether it changed.
        connect4/6 leave alone every connection made in that cgroup or below it."""
        cfg = self.config()
        if cfg.envoy_cgroup_id == cgroup_id:
            return False
        cfg.envoy_cgroup_id = cgroup_id
        bpf.map_update(self._fds["nm_config"], ctypes.c_uint32(0), cfg, "nm_config")
        return True

    def apply(
        self,
        node_map: NodeMap,
        envoy_cgroup_id: int = 0,
        socket_redirect: SocketRedirect = SocketRedirect.ALL,
    ) -> ApplyResult:
        """Make the maps say exactly `node_map`, touching only entries that change.
        `socket_redirect`: which same-node connections sockops puts into the sockhash (new
        connections follow a change; docs/ebpf.md, Known limitations). Reads every map: the
        agent calls it once per start; afterwards `apply_node` and `patch` keep them."""
        # config first: a new L7 service must find the Envoy address already in place
        written, unchanged = self._write_config(node_map.envoy, envoy_cgroup_id, socket_redirect)
        want_local, have_local = self._local(node_map, node_map.envoy)
        w, u = self._add_local(want_local, have_local)
        written, unchanged = written + w, unchanged + u

        want4 = {
            bytes(m.SvcKey(_addr(svc.address), _port(svc.port), 0)): service_value(svc)
            for svc in node_map.services
        }
        want6 = {bytes(svc6_key(s)): svc6_value(s) for s in node_map.services_ipv6}
        have4 = self._read_hash("nm_services", m.SvcKey, m.Service)
        have6 = self._read_hash("nm_services6", m.Svc6Key, m.Svc6)
        # Entries that go, first: a map full of them (written by an agent of another map, or
        # by anyone) must not keep the wanted ones out. A wanted key is written in place, so
        # no Service that stays is ever missing. IPv6 ClusterIPs are removed before the IPv4
        # entries they stand for, and written after them.
        deleted = 0
        for name, key_type, have, want in (
            ("nm_services6", m.Svc6Key, have6, want6),
            ("nm_services", m.SvcKey, have4, want4),
        ):
            for kb in sorted(have.keys() - want.keys()):
                bpf.map_delete(self._fds[name], key_type.from_buffer_copy(kb), name)
                deleted += 1
        for name, key_type, have, want in (
            ("nm_services", m.SvcKey, have4, want4),
            ("nm_services6", m.Svc6Key, have6, want6),
        ):
            w, u = self._write_changed(name, key_type, have, want)
            written, unchanged = written + w, unchanged + u
        # local addresses go last, so a pod leaving the node stops being short-circuited only
        # after no service points at it any more
        deleted += self._remove_local(want_local, have_local)
        return ApplyResult(written, deleted, unchanged)

    def apply_node(
        self,
        part: NodePart,
        envoy_cgroup_id: int = 0,
        socket_redirect: SocketRedirect = SocketRedirect.ALL,
    ) -> ApplyResult:
        """Only the node's own part: the config (node Envoy) and the local addresses."""
        written, unchanged = self._write_config(part.envoy, envoy_cgroup_id, socket_redirect)
        want_local, have_local = self._local(part, part.envoy)
        w, u = self._add_local(want_local, have_local)
        deleted = self._remove_local(want_local, have_local)
        return ApplyResult(written + w, deleted, unchanged + u)

    def patch(
        self, view: MapView, keys4: Iterable[tuple[str, int]], keys6: Iterable[tuple[str, int]]
    ) -> ApplyResult:
        """Make the service entries at `keys4`/`keys6` what `view` says (written, or deleted
        where it has none), leaving every other entry alone: one Service's change costs its
        own entries. Same order as `apply`: IPv6 deletes, IPv4 deletes, IPv4 writes, IPv6
        writes."""
        written = deleted = unchanged = 0
        found4 = [((addr, port), view.service((addr, port))) for addr, port in sorted(keys4)]
        found6 = [((addr, port), view.service6((addr, port))) for addr, port in sorted(keys6)]
        for (addr, port), v6 in found6:
            if v6 is None:
                key6 = svc6_key(ServiceIPv6("", addr, port))
                deleted += bpf.map_delete(self._fds["nm_services6"], key6, "nm_services6")
        for (addr, port), svc in found4:
            if svc is None:
                key4 = m.SvcKey(_addr(addr), _port(port), 0)
                deleted += bpf.map_delete(self._fds["nm_services"], key4, "nm_services")
        for (addr, port), svc in found4:
            if svc is None:
                continue
            key = m.SvcKey(_addr(addr), _port(port), 0)
            if self._write_if_changed("nm_services", key, service_value(svc), m.Service):
                written += 1
            else:
                unchanged += 1
        for _, v6 in found6:
            if v6 is None:
                continue
            if self._write_if_changed("nm_services6", svc6_key(v6), svc6_value(v6), m.Svc6):
                written += 1
            else:
                unchanged += 1
        return ApplyResult(written, deleted, unchanged)

    def _write_if_changed(self, name: str, key: Any, value: Any, value_type: type[Any]) -> bool:
        current = value_type()
        if bpf.map_lookup(self._fds[name], key, current, name) and bytes(current) == bytes(value):
            return False
        self._update(name, key, value)
        return True

    def _update(self, name: str, key: Any, value: Any, wanted: int | None = None) -> None:
        """Write one service or local entry. A full map says so, with its capacity (and how
        many entries this node's map needs, when the caller knows): the kernel's E2BIG reads
        "Argument list too long"."""
        try:
            bpf.map_update(self._fds[name], key, value, name)
        except BpfError as exc:
            if exc.errno != errno.E2BIG:
                raise
            capacity = bpf.map_info(self._fds[name], name).max_entries
            need = f"; this node's map has {wanted}" if wanted is not None else ""
            raise ServiceMapError(
                f"{name} is full: it holds {capacity} entries{need}. Entries not written "
                "keep their old values, new ones are missing"
            ) from exc

    def _write_config(
        self,
        envoy: tuple[str, int] | None,
        envoy_cgroup_id: int,
        socket_redirect: SocketRedirect,
    ) -> tuple[int, int]:
        cfg = m.Config()
        cfg.envoy_cgroup_id = envoy_cgroup_id
        if envoy is not None:
            cfg.envoy_addr = _addr(envoy[0])
            cfg.envoy_port = _port(envoy[1])
            cfg.flags = m.NM_CFG_ENVOY_SET
        cfg.flags |= socket_redirect.flags
        if bytes(self.config()) == bytes(cfg):
            return 0, 1
        bpf.map_update(self._fds["nm_config"], ctypes.c_uint32(0), cfg, "nm_config")
        return 1, 0

    def local(self) -> dict[str, int]:
        """nm_local as {address: flags} (`NM_LOCAL` | `NM_LOCAL_REDIRECT_*`)."""
        raw = self._read_hash("nm_local", ctypes.c_uint32, ctypes.c_uint32)
        return {
            addr_text(ctypes.c_uint32.from_buffer_copy(kb).value): v.value for kb, v in raw.items()
        }

    def _local(
        self, part: NodeMap | NodePart, envoy: tuple[str, int] | None
    ) -> tuple[dict[bytes, int], dict[bytes, int]]:
        """(wanted, present) local addresses, as map key bytes -> flags. The node Envoy is
        local, and its sockets may always be short-circuited (it reads without blocking and
        never splices)."""
        want = {bytes(ctypes.c_uint32(_addr(a))): m.NM_LOCAL for a in part.local_addresses}
        for addresses, flag in (
            (part.redirect_on, m.NM_LOCAL_REDIRECT_ON),
            (part.redirect_off, m.NM_LOCAL_REDIRECT_OFF),
        ):
            for a in addresses:
                kb = bytes(ctypes.c_uint32(_addr(a)))
                if kb in want:  # only for the node's own pod IPs
                    want[kb] |= flag
        if envoy is not None:
            want[bytes(ctypes.c_uint32(_addr(envoy[0])))] = m.NM_LOCAL | m.NM_LOCAL_REDIRECT_ON
        have = self._read_hash("nm_local", ctypes.c_uint32, ctypes.c_uint32)
        return want, {kb: v.value for kb, v in have.items()}

    def _add_local(self, want: dict[bytes, int], have: dict[bytes, int]) -> tuple[int, int]:
        written = 0
        for kb in sorted(want):
            if have.get(kb) != want[kb]:
                self._update(
                    "nm_local",
                    ctypes.c_uint32.from_buffer_copy(kb),
                    ctypes.c_uint32(want[kb]),
                    len(want),
                )
                written += 1
        return written, len(want) - written

    def _remove_local(self, want: dict[bytes, int], have: dict[bytes, int]) -> int:
        gone = sorted(have.keys() - want.keys())
        for kb in gone:
            bpf.map_delete(self._fds["nm_local"], ctypes.c_uint32.from_buffer_copy(kb), "nm_local")
        return len(gone)

    def _write_changed(
        self,
        name: str,
        key_type: type[ctypes.Structure],
        have: dict[bytes, Any],
        want: dict[bytes, Any],
    ) -> tuple[int, int]:
        """Write the entries of `want` whose bytes differ from `have`: (written, unchanged)."""
        written = unchanged = 0
        for kb, value in sorted(want.items()):
            current = have.get(kb)
            if current is not None and bytes(current) == bytes(value):
                unchanged += 1
                continue
            self._update(name, key_type.from_buffer_copy(kb), value, len(want))
            written += 1
        return written, unchanged
