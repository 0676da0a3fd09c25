"""Build: input objects -> mesh IR + conditions per object. Pure: no clock, no I/O.

One module per input kind (`service.py`, `endpointslice.py`, `node.py`, `httproute.py`,
`grpcroute.py`, `trafficpolicy.py`); this module assembles their results into `ir.Mesh`. Errors
are collected: a broken object gets conditions with precise messages and everything else still
programs.

>>> result = build(store.view())                # doctest: +SKIP
>>> result.mesh.virtual_hosts[0].domains        # doctest: +SKIP
>>> result.conditions[ObjectKey("HTTPRoute", "shop", "web")]  # doctest: +SKIP
"""

from __future__ import annotations

from nodemesh.controlplane.builder._engine import BuildResult, Engine, Objects
from nodemesh.controlplane.builder._selector import LabelSelector
from nodemesh.controlplane.builder.service import CLUSTER_DOMAIN, cluster_domain

__all__ = ["CLUSTER_DOMAIN", "BuildMemo", "BuildResult", "LabelSelector", "build", "cluster_domain"]


class BuildMemo:
    """What a build keeps for the next one: per-object results and the index of which routes
    and policies depend on which Services, so that a change recomputes only what it affects and
    every other IR object keeps its identity (the Translator's memo then hits on `is`).

    A build with a fresh memo gives the same result as one with a warm memo. Use one memo per
    store (a memo used with another store's views rebuilds from scratch)."""

    def __init__(self) -> None:
        self.engine = Engine()

    @property
    def cold(self) -> bool:
        """True until a build with this memo succeeded: the next build reads every object."""
        return self.engine.mesh is None

    def reset(self) -> None:
        self.engine = Engine(self.engine.cluster_domain)


def build(
    objects: Objects,
    *,
    outbound_address: str = "0.0.0.0",
    outbound_port: int = 15001,
    node_selector: LabelSelector | None = None,
    access_log: str = "",
    domain: str = CLUSTER_DOMAIN,
    memo: BuildMemo | None = None,
) -> BuildResult:
    """`node_selector`: the Node objects that run nodemesh (None: all). Only they get a
    `NodeInfo` (their agents' service maps) and count for `Programmed`. `access_log`: the file
    node Envoys write a JSON line per request to ("": none). `domain`: the cluster's DNS domain
    (as `cluster_domain` gives it), which Services' FQDNs end in."""
    memo = memo if memo is not None else BuildMemo()
    if domain != memo.engine.cluster_domain:
        domain = cluster_domain(domain)  # (ValueError if it is none)
        if domain != memo.engine.cluster_domain:  # every Service's FQDN changes: start again
            memo.engine = Engine(domain)
    try:
        return memo.engine.build(
            objects, outbound_address, outbound_port, node_selector, access_log
        )
    except BaseException:
        memo.reset()  # half-updated state must not leak into the next build
        raise
