"""NodeIndex keeps each node's pod IPs as Pods come, move and go: whatever the order of
changes, a node's `pod_ips` must be the sorted set of the IPs its objects place on it."""

from __future__ import annotations

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from nodemesh.controlplane.builder import node as node_module
from nodemesh.controlplane.builder.node import NodeIndex
from nodemesh.controlplane.store import ObjectKey

NODES = ("node-a", "node-b", "node-c")
_NODE_OBJECTS = [
    (ObjectKey("Node", "", n), {"status": {"addresses": [{"type": "InternalIP", "address": a}]}})
    for n, a in zip(NODES, ("10.250.0.1", "10.250.0.2", "10.250.0.3"), strict=True)
]
# a state: pod name -> (node, IP); two pods may claim one IP (it stays while either does)
_STATES = st.lists(
    st.dictionaries(
        st.sampled_from([f"p{i}" for i in range(8)]),
        st.tuples(st.sampled_from(NODES), st.sampled_from([f"10.244.0.{i}" for i in range(1, 7)])),
        max_size=8,
    ),
    min_size=1,
    max_size=6,
)


def _pod(node: str, ip: str) -> dict[str, object]:
    return {"spec": {"nodeName": node}, "status": {"podIP": ip, "phase": "Running"}}


@pytest.mark.parametrize("few", [64, 0], ids=["in-place", "sorted-later"])
@settings(
    max_examples=200, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(states=_STATES)
def test_pod_ips_follow_every_change(
    states: list[dict[str, tuple[str, str]]], few: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Both ways of keeping the order: updated in place (a few changes) and sorted once
    when needed (a big batch, as a cold build gives)."""
    monkeypatch.setattr(node_module, "_FEW", few)
    index = NodeIndex()
    index.update(_NODE_OBJECTS, [], [])
    last: dict[str, tuple[str, str]] = {}
    for state in states:
        changed = [
            (ObjectKey("Pod", "ns", name), _pod(*place) if name in state else None)
            for name, place in {**last, **state}.items()
            if last.get(name) != state.get(name)
        ]
        infos = index.update_changed(changed, None)
        want = {n: sorted({ip for node, ip in state.values() if node == n}) for n in NODES}
        assert {i.name: list(i.pod_ips) for i in infos} == want
        last = state


_ADDRESSES = st.one_of(
    st.sampled_from(["10.0.0.1", "10.0.0.2", "010.0.0.1", "10.0.0.1\n10.0.0.2", "::1", ""]),
    st.integers(0, 3),
)


@settings(max_examples=300)
@given(
    st.lists(
        st.fixed_dictionaries(
            {
                "nodeName": st.sampled_from(["node-a", "node-b", "", None]),
                "addresses": st.lists(_ADDRESSES, max_size=3),
            }
        ),
        max_size=5,
    )
)
def test_slice_placement_is_each_address_checked(endpoints: list[dict[str, object]]) -> None:
    """The whole-slice check of the addresses places what checking each one places."""
    want = {
        (e["nodeName"], ip)
        for e in endpoints
        if isinstance(e["nodeName"], str) and e["nodeName"]
        for a in e["addresses"]  # type: ignore[attr-defined]
        if (ip := node_module._ipv4(a)) is not None
    }
    assert node_module.slice_placement({"endpoints": endpoints}) == tuple(sorted(want))
