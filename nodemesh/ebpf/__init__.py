"""The eBPF node data plane: BPF programs, their loader, the maps, and the node agent."""

from __future__ import annotations

from nodemesh.ebpf.errors import BpfError, BuildError, NodemeshEbpfError, ServiceMapError
from nodemesh.ebpf.loader import DEFAULT_PIN_ROOT, Dataplane, ensure_bpffs
from nodemesh.ebpf.maps import ApplyResult, NodeMaps

__all__ = [
    "DEFAULT_PIN_ROOT",
    "ApplyResult",
    "BpfError",
    "BuildError",
    "Dataplane",
    "NodeMaps",
    "NodemeshEbpfError",
    "ServiceMapError",
    "ensure_bpffs",
]
