"""ctypes mirrors of the structs in bpf/nodemesh.h. A test compares them with the object's BTF."""

from __future__ import annotations

import ctypes

__all__ = [
    "MAX_BACKENDS",
    "MAX_CGROUP_LEVEL",
    "NM_CFG_ENVOY_SET",
    "NM_CFG_REDIRECT_OPTED_IN",
    "NM_CFG_SOCKET_REDIRECT",
    "NM_LOCAL",
    "NM_LOCAL_REDIRECT_OFF",
    "NM_LOCAL_REDIRECT_ON",
    "NM_SVC6_L7",
    "NM_SVC_AFFINITY",
    "NM_SVC_L7",
    "Backend",
    "Config",
    "OrigDst",
    "Service",
    "Stats",
    "Svc6",
    "Svc6Key",
    "SvcKey",
    "Tuple",
]

MAX_BACKENDS = 32
MAX_CGROUP_LEVEL = 64  # NM_MAX_CGROUP_LEVEL: the deepest node Envoy cgroup connect4/6 find
NM_SVC_L7 = 1 << 0
NM_SVC_AFFINITY = 1 << 1
NM_SVC6_L7 = 1 << 0
NM_CFG_ENVOY_SET = 1 << 0
NM_CFG_SOCKET_REDIRECT = 1 << 1
NM_CFG_REDIRECT_OPTED_IN = 1 << 2
NM_LOCAL = 1 << 0
NM_LOCAL_REDIRECT_ON = 1 << 1
NM_LOCAL_REDIRECT_OFF = 1 << 2

# Addresses and ports are stored in network byte order: fill them from bytes
# (socket.inet_aton, int.to_bytes(..., "big")), never from host integers.


class SvcKey(ctypes.Structure):
    _fields_ = [("addr", ctypes.c_uint32), ("port", ctypes.c_uint16), ("pad", ctypes.c_uint16)]


class Svc6Key(ctypes.Structure):
    _fields_ = [
        ("addr", ctypes.c_uint32 * 4),
        ("port", ctypes.c_uint16),
        ("pad", ctypes.c_uint16),
    ]


class Svc6(ctypes.Structure):
    _fields_ = [("addr", ctypes.c_uint32), ("flags", ctypes.c_uint32)]


class Backend(ctypes.Structure):
    _fields_ = [("addr", ctypes.c_uint32), ("port", ctypes.c_uint16), ("weight", ctypes.c_uint16)]


class Service(ctypes.Structure):
    _fields_ = [
        ("flags", ctypes.c_uint32),
        ("n_backends", ctypes.c_uint32),
        ("total_weight", ctypes.c_uint32),
        ("pad", ctypes.c_uint32),
        ("backends", Backend * MAX_BACKENDS),
    ]


class Tuple(ctypes.Structure):
    _fields_ = [
        ("saddr", ctypes.c_uint32),
        ("daddr", ctypes.c_uint32),
        ("sport", ctypes.c_uint16),
        ("dport", ctypes.c_uint16),
    ]


class OrigDst(ctypes.Structure):
    _fields_ = [("addr", ctypes.c_uint32), ("port", ctypes.c_uint16), ("flags", ctypes.c_uint16)]


class Config(ctypes.Structure):
    _fields_ = [
        ("envoy_cgroup_id", ctypes.c_uint64),
        ("envoy_addr", ctypes.c_uint32),
        ("envoy_port", ctypes.c_uint16),
        ("flags", ctypes.c_uint16),
    ]


class Stats(ctypes.Structure):
    _fields_ = [
        ("msg_redirected", ctypes.c_uint64),
        ("bytes_redirected", ctypes.c_uint64),
        ("msg_passed", ctypes.c_uint64),
        ("l7_redirects", ctypes.c_uint64),
        ("l4_picks", ctypes.c_uint64),
        ("misses", ctypes.c_uint64),
        ("refused", ctypes.c_uint64),
        ("sockhash_inserts", ctypes.c_uint64),
        ("orig_dst_answered", ctypes.c_uint64),
        ("orig_dst_missing", ctypes.c_uint64),
        ("fallback_backlog", ctypes.c_uint64),
        ("fallback_nopeer", ctypes.c_uint64),
        ("bytes_consumed", ctypes.c_uint64),
        ("bytes_clamped", ctypes.c_uint64),
        ("untracked_full", ctypes.c_uint64),
        ("fallback_unrecorded", ctypes.c_uint64),
        ("entries_freed", ctypes.c_uint64),
        ("sockhash_detached", ctypes.c_uint64),
        ("cas_exhausted", ctypes.c_uint64),
        ("bytes_tcp_read", ctypes.c_uint64),
        ("lookup_races", ctypes.c_uint64),
        ("envoy_refused", ctypes.c_uint64),
    ]
