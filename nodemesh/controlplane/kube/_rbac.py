"""The Kubernetes RBAC rules the operator needs, derived from what it does.

- Every watched kind (`RESOURCES`): `list` and `watch` (kopf lists, then watches; it never GETs).
- Kinds with status: `patch` on `<plural>/status` (the conditions) and `patch` on `<plural>`
  (kopf removes `FINALIZER` where an older nodemesh, whose status timers needed it, left it).
- The leader-election Lease, in the operator's namespace only: `create`, and `get`/`patch` on
  that one Lease by name.
- Nothing else: kopf runs with event posting and CRD/namespace scanning disabled.
"""

from __future__ import annotations

from dataclasses import dataclass

from nodemesh.controlplane.kube._resources import LEASE, RESOURCES

__all__ = ["Rule", "cluster_rules", "lease_rules"]


@dataclass(frozen=True, slots=True, order=True)
class Rule:
    group: str
    resource: str  # plural, or plural/subresource
    verbs: frozenset[str]
    names: frozenset[str] = frozenset()


def cluster_rules() -> list[Rule]:
    """The ClusterRole's rules (all namespaces), one per resource."""
    rules: list[Rule] = []
    for r in RESOURCES:
        verbs = {"list", "watch"}
        if r.status:
            verbs.add("patch")
            rules.append(Rule(r.group, f"{r.plural}/status", frozenset({"patch"})))
        rules.append(Rule(r.group, r.plural, frozenset(verbs)))
    return sorted(rules)


def lease_rules(lease_name: str = "nodemesh-controlplane") -> list[Rule]:
    """The Role's rules in the operator's own namespace."""
    return sorted(
        [
            # `create` cannot be limited by name: the name is not known before the object exists.
            Rule(LEASE.group, LEASE.plural, frozenset({"create"})),
            Rule(LEASE.group, LEASE.plural, frozenset({"get", "patch"}), frozenset({lease_name})),
        ]
    )
