"""Conditions on user objects (Gateway API conventions) and their status shapes.

A route has conditions per parentRef (`Condition.parent`, see `parent_label`); a policy
has them at the top level (`parent == ""`). `Accepted` and `ResolvedRefs` come from build;
`Programmed` comes from the data plane (ACK/NACK), see `nodemesh.controlplane.pipeline`.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any, Literal

__all__ = [
    "CONTROLLER_NAME",
    "MESSAGE_LIMIT",
    "Condition",
    "kubernetes_status",
    "parent_label",
    "parse_parent",
]

CONTROLLER_NAME = "nodemesh.io/mesh"
# `conditions[].message` maxLength in the Gateway API and nodemesh CRDs: the API server refuses
# a status with a longer one, and the object would keep its old status
MESSAGE_LIMIT = 32768

Status = Literal["True", "False", "Unknown"]


@dataclass(frozen=True, slots=True)
class Condition:
    type: str
    status: Status
    reason: str
    message: str
    observed_generation: int
    parent: str = ""

    def as_dict(self) -> dict[str, Any]:
        return {
            "type": self.type,
            "status": self.status,
            "reason": self.reason,
            "message": self.message,
            "observedGeneration": self.observed_generation,
        }


def parent_label(
    namespace: str | None, name: str, port: int | None = None, section: str = "", group: str = ""
) -> str:
    """A route's parentRef to a Service as one string, as the user wrote it:
    "Service[.core]/[namespace/]name[:port][#sectionName]", the namespace only if written,
    and the group `core` if written (Gateway API's core group is ""; nodemesh takes `core`
    too, and the status echoed "" for it, so an entry matched no parentRef).

    It keys the route's conditions and is what `nodemesh status` shows; `parse_parent` turns it
    back into the parentRef of `status.parents[]`, which must echo the user's parentRef: its
    namespace, port and sectionName as written (not the namespace it defaulted to, nor the port
    a sectionName resolved to). So `{name: web}` and `{name: web, namespace: shop}`, two
    parentRefs to one Service that Gateway API tells apart, get an entry each. Neither a
    namespace, a name nor a sectionName can hold "/", ":" or "#", so the parts split back.
    """
    kind = f"Service.{group}" if group else "Service"
    label = f"{kind}/{namespace}/{name}" if namespace else f"{kind}/{name}"
    if port is not None:
        label += f":{port}"
    if section:
        label += f"#{section}"
    return label


def parse_parent(parent: str) -> dict[str, Any]:
    """`parent_label`'s string -> a Gateway API parentRef."""
    kind, rest = parent.split("/", 1)
    kind, _, group = kind.partition(".")
    namespace, _, rest = rest.rpartition("/")
    rest, _, section = rest.partition("#")
    name, _, port = rest.partition(":")
    ref: dict[str, Any] = {"group": group, "kind": kind}
    if namespace:
        ref["namespace"] = namespace
    ref["name"] = name
    if section:
        ref["sectionName"] = section
    if port:
        ref["port"] = int(port)
    return ref


def kubernetes_status(
    kind: str, conditions: Iterable[Condition], last_transition: Mapping[tuple[str, str], str]
) -> dict[str, Any]:
    """The `status` subresource body for an object: `parents[]` for routes, `conditions` else.

    `last_transition` maps (parent, type) to an RFC 3339 time, kept by the caller so that the
    time changes only when the status does.
    """

    def render(cs: Iterable[Condition]) -> list[dict[str, Any]]:
        out = []
        for c in cs:
            d = {**c.as_dict(), "lastTransitionTime": last_transition.get((c.parent, c.type), "")}
            if len(c.message) > MESSAGE_LIMIT:  # the CRDs' maxLength: a longer one is refused
                d["message"] = c.message[: MESSAGE_LIMIT - 3] + "..."
            out.append(d)
        return out

    conditions = list(conditions)
    if kind in ("HTTPRoute", "GRPCRoute"):
        parents: dict[str, list[Condition]] = {}
        for c in conditions:
            parents.setdefault(c.parent, []).append(c)
        return {
            "parents": [
                {
                    "parentRef": parse_parent(p),
                    "controllerName": CONTROLLER_NAME,
                    "conditions": render(cs),
                }
                for p, cs in sorted(parents.items())
                if p
            ]
        }
    return {"conditions": render(conditions)}
