"""Pods -> `ir.SocketRedirectPods`: per node, the pods that chose about the node's socket short
cut with the annotation `nodemesh.io/socket-redirect` ("on" or "off"; any other value counts as
no choice, and the Pod gets a `SocketRedirect=False` condition in `/status` saying so). The
node agent short-circuits a same-node connection according to its mode and these choices
(docs/ebpf.md, "Pods choose")."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

from nodemesh.controlplane.builder._util import as_map
from nodemesh.controlplane.builder.node import Claims, Placement, claim, pod_placement, unclaim
from nodemesh.controlplane.store import ObjectKey
from nodemesh.xds.translate import ir

__all__ = ["SOCKET_REDIRECT_ANNOTATION", "SocketRedirectIndex", "pod_choice", "unusable_choice"]

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


def unusable_choice(obj: Mapping[str, Any]) -> str | None:
    """Why the annotation counts as no choice when it is set but neither "on" nor "off" (a
    typo such as "yes", or an unquoted on in a YAML file, which YAML reads as true); else
    None."""
    annotations = as_map(as_map(obj.get("metadata")).get("annotations"))
    if SOCKET_REDIRECT_ANNOTATION not in annotations or pod_choice(obj) is not None:
        return None
    value = annotations[SOCKET_REDIRECT_ANNOTATION]
    message = (
        f'annotation {SOCKET_REDIRECT_ANNOTATION}: {value!r} is neither "on" nor "off", '
        "so the pod makes no choice about the node's socket short cut"
    )
    if isinstance(value, bool):
        message += " (YAML reads an unquoted on or off as a boolean: quote the value)"
    return message


_UNSET = ""  # a Pod without a (valid) choice


class SocketRedirectIndex:
    """Per node and pod IP, the choices of the Pods that claim the IP. Every Pod is indexed
    (a cold build gives every Pod as changed, later builds the changed ones): an IP is "on"
    only if every Pod that claims it said "on", and "off" if any said "off". So a Pod that
    said nothing and got the IP of one that said "on" and still lingers is not short-circuited
    on a node where only opted-in pods are. Not thread-safe."""

    def __init__(self) -> None:
        self._placed: dict[ObjectKey, tuple[str, Placement]] = {}
        # node -> IP -> choice ("on", "off", or _UNSET) -> how many Pods claim it so
        self._claims: Claims = {}
        self._by_node: dict[str, ir.SocketRedirectPods] = {}
        self._result: tuple[ir.SocketRedirectPods, ...] = ()
        # Pods whose annotation is set to something unusable -> why (for their conditions)
        self.unusable: dict[ObjectKey, str] = {}

    def update(
        self, changed: Iterable[tuple[ObjectKey, Mapping[str, Any] | None]]
    ) -> tuple[ir.SocketRedirectPods, ...]:
        """The choices per node (only nodes with an IP that is "on" or "off"), sorted by node,
        given the Pods changed since the last call (None: deleted). The same tuple when
        nothing about them changed."""
        dirty: set[str] = set()
        for key, obj in changed:
            # Any Pod, placed or not: the typo is worth telling before the Pod runs.
            bad = unusable_choice(obj) if obj is not None else None
            if bad is None:
                self.unusable.pop(key, None)
            else:
                self.unusable[key] = bad
            new: tuple[str, Placement] | None = None
            if obj is not None:
                placement = pod_placement(obj)
                if placement:  # running on a node, with its own network namespace
                    new = (pod_choice(obj) or _UNSET, placement)
            old = self._placed.pop(key, None)
            if new is not None:
                self._placed[key] = new
            if new == old:
                continue
            if old is not None:
                choice, placement = old
                for node, ip in placement:
                    unclaim(self._claims, node, ip, choice)
                    dirty.add(node)
            if new is not None:
                choice, placement = new
                for node, ip in placement:
                    claim(self._claims, node, ip, choice)
                    dirty.add(node)
        if not dirty:
            return self._result
        for node in dirty:
            claimed = self._claims.get(node, {})
            off = sorted(ip for ip, claims in claimed.items() if "off" in claims)
            on = sorted(ip for ip, claims in claimed.items() if claims.keys() == {"on"})
            if on or off:
                self._by_node[node] = ir.SocketRedirectPods(node, tuple(on), tuple(off))
            else:
                self._by_node.pop(node, None)
        result = tuple(self._by_node[n] for n in sorted(self._by_node))
        if result != self._result:
            self._result = result
        return self._result
