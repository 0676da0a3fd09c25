"""Pods -> `ir.SocketRedirectPods`: per node, the pods that chose about the node's socket short
cut with the annotation `nodemesh.io/socket-redirect` ("on" or "off"; anything else counts as
unset). The node agent short-circuits a same-node connection according to its mode and these
choices (docs/ebpf.md, "Pods choose")."""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable, Mapping
from typing import Any

from nodemesh.controlplane.builder._util import as_map
from nodemesh.controlplane.builder.node import Placement, pod_placement
from nodemesh.controlplane.store import ObjectKey
from nodemesh.xds.translate import ir

__all__ = ["SOCKET_REDIRECT_ANNOTATION", "SocketRedirectIndex", "pod_choice"]

SOCKET_REDIRECT_ANNOTATION = "nodemesh.io/socket-redirect"
_CHOICES = ("on", "off")


def pod_choice(obj: Mapping[str, Any]) -> str | None:
    """The annotation's value: "on" or "off" (any case, spaces around allowed), or None."""
    annotations = as_map(as_map(obj.get("metadata")).get("annotations"))
    value = annotations.get(SOCKET_REDIRECT_ANNOTATION)
    if not isinstance(value, str):
        return None
    value = value.strip().lower()
    return value if value in _CHOICES else None


class SocketRedirectIndex:
    """Keeps only the Pods with a choice, updated from the Pods that changed (a cold build
    gives every Pod as changed). Not thread-safe."""

    def __init__(self) -> None:
        self._placed: dict[ObjectKey, tuple[str, Placement]] = {}
        # node -> IP -> choice -> how many Pods claim it
        self._claims: dict[str, dict[str, Counter[str]]] = {}
        self._by_node: dict[str, ir.SocketRedirectPods] = {}
        self._result: tuple[ir.SocketRedirectPods, ...] = ()

    def update(
        self, changed: Iterable[tuple[ObjectKey, Mapping[str, Any] | None]]
    ) -> tuple[ir.SocketRedirectPods, ...]:
        """The choices per node, sorted by node, given the Pods changed since the last call
        (None: deleted). The same tuple when nothing about them changed."""
        dirty: set[str] = set()
        for key, obj in changed:
            choice = pod_choice(obj) if obj is not None else None
            new = (choice, pod_placement(obj)) if obj is not None and choice else None
            if new is not None and not new[1]:
                new = None  # not running on a node (yet), or host network
            old = self._placed.pop(key, None)
            if new is not None:
                self._placed[key] = new
            if new == old:
                continue
            if old is not None:
                for node, ip in old[1]:
                    per_ip = self._claims[node]
                    claims = per_ip[ip]
                    claims[old[0]] -= 1
                    if not claims[old[0]]:
                        del claims[old[0]]
                        if not claims:
                            del per_ip[ip]
                            if not per_ip:
                                del self._claims[node]
                    dirty.add(node)
            if new is not None:
                for node, ip in new[1]:
                    self._claims.setdefault(node, {}).setdefault(ip, Counter())[new[0]] += 1
                    dirty.add(node)
        if not dirty:
            return self._result
        for node in dirty:
            claimed = self._claims.get(node)
            if not claimed:
                self._by_node.pop(node, None)
                continue
            off = sorted(ip for ip, claims in claimed.items() if "off" in claims)
            on = sorted(ip for ip, claims in claimed.items() if "off" not in claims)
            self._by_node[node] = ir.SocketRedirectPods(node, tuple(on), tuple(off))
        self._result = tuple(self._by_node[n] for n in sorted(self._by_node))
        return self._result
