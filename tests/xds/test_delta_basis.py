"""TypeSet lineage: what changed since an earlier TypeSet of the same chain of updates."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from nodemesh.xds import types
from nodemesh.xds.cache import (
    Resource,
    TypeSet,
)
from nodemesh.xds.cache._snapshot import LINEAGE
from tests.xds import resources as R

NAMES = tuple("abcdefghijkl")
VARIANTS = 3
# Per type, name and variant: a resource. Three versions of each name, so that a name can
# change, and change back.
MADE: dict[str, dict[str, list[Resource]]] = {
    types.CLUSTER: {
        n: [Resource.from_message(R.eds_cluster(n, 1 + v)) for v in range(VARIANTS)] for n in NAMES
    },
    types.ENDPOINT: {
        n: [Resource.from_message(R.endpoints(n, 1000 + v)) for v in range(VARIANTS)] for n in NAMES
    },
}


def chain_of_updates(
    steps: list[tuple[int, dict[str, int], list[str]]],
) -> list[TypeSet]:
    """TypeSets made by `updated()`, each from one of the earlier ones (so they branch)."""
    sets = [TypeSet(MADE[types.ENDPOINT][n][0] for n in NAMES[:4])]
    for back, upserts, removed in steps:
        parent = sets[max(0, len(sets) - 1 - back)]
        made = [MADE[types.ENDPOINT][n][v] for n, v in upserts.items()]
        sets.append(parent.updated(made, removed))
    return sets


def differ(a: TypeSet, b: TypeSet) -> set[str]:
    return {n for n in {*a.items, *b.items} if a.items.get(n) is not b.items.get(n)}


update_steps = st.lists(
    st.tuples(
        st.sampled_from([0, 0, 0, 1, 3]),
        st.dictionaries(st.sampled_from(NAMES), st.integers(0, VARIANTS - 1), max_size=3),
        st.lists(st.sampled_from(NAMES), max_size=2),
    ),
    max_size=3 * LINEAGE,
)


@settings(max_examples=300, deadline=None)
@given(update_steps)
def test_changed_since_names_every_difference_or_nothing(
    steps: list[tuple[int, dict[str, int], list[str]]],
) -> None:
    sets = chain_of_updates(steps)
    for old in sets:
        for new in sets:
            changed = new.changed_since(old.token, len(NAMES))
            if changed is not None:
                assert changed >= differ(old, new)
    assert sets[-1].changed_since(sets[-1].token, 0) == set()


def test_changed_since_follows_a_straight_chain_for_lineage_steps_and_no_further() -> None:
    sets = chain_of_updates([(0, {NAMES[i % 8]: i % VARIANTS}, []) for i in range(4 * LINEAGE)])
    last = sets[-1]
    assert last.changed_since(sets[-1 - LINEAGE].token, len(NAMES)) is not None
    assert last.changed_since(sets[-2 - LINEAGE].token, len(NAMES)) is None
    assert last.changed_since(sets[-2].token, 0) is None  # one name changed: over the limit
    assert last.changed_since(sets[-2].token, 1) == {NAMES[(4 * LINEAGE - 1) % 8]}
