"""`--node-selector`: Kubernetes label selectors as `kubectl get -l` reads them."""

from __future__ import annotations

import pytest

from nodemesh.controlplane.builder import LabelSelector

NODE = {"nodemesh.io/node": "true", "zone": "a", "kubernetes.io/os": "linux"}


@pytest.mark.parametrize(
    ("text", "matches"),
    [
        ("", True),  # every Node
        ("nodemesh.io/node=true", True),
        ("nodemesh.io/node==true", True),
        ("nodemesh.io/node=false", False),
        ("zone!=b", True),
        ("missing!=b", True),  # true without the label, as in Kubernetes
        ("zone", True),
        ("missing", False),
        ("!node-role.kubernetes.io/control-plane", True),
        ("!zone", False),
        ("zone in (a, b)", True),
        ("zone in (b,c)", False),
        ("zone notin (b)", True),
        ("missing notin (b)", True),
        # kubectl reads "()" as the empty value (apimachinery's `x in ()`): no Node has it here
        ("zone in ()", False),
        ("zone notin ( )", True),
        ("zone in (a,)", True),
        ("nodemesh.io/node=true, zone in (a,b), !node-role.kubernetes.io/control-plane", True),
        ("nodemesh.io/node=true,zone=b", False),  # every requirement must hold
    ],
)
def test_a_selector_matches_as_kubectl_does(text: str, matches: bool) -> None:
    assert LabelSelector(text).matches(NODE) is matches


@pytest.mark.parametrize(
    ("text", "unread"),
    [
        ("zone=a b", "'zone=a b'"),
        ("zone in a", "'zone in a'"),
        ("zone=a,", "''"),  # a trailing comma leaves an empty requirement
        ("=a", "'=a'"),
        ("zone==a==b", "'zone==a==b'"),
        ("zone in (a b)", "'zone in (a b)'"),
        ("-zone=a", "'-zone=a'"),
    ],
)
def test_a_selector_that_cannot_be_read_is_refused_naming_the_requirement(
    text: str, unread: str
) -> None:
    with pytest.raises(ValueError) as err:
        LabelSelector(text)
    assert str(err.value) == f"label selector {text!r}: cannot read {unread}"


def test_an_empty_set_is_the_empty_value_as_kubectl_reads_it() -> None:
    """`kubectl get -l 'zone in ()'` takes the selector and reads `()` as `("")` (the
    apimachinery parser's tests have `x in ()` and `x notin ( )` valid): it holds for a Node
    labelled `zone: ""` only. Refusing it made the control plane exit where kubectl lists."""
    assert LabelSelector("zone in ()").matches({"zone": ""})
    assert not LabelSelector("zone in ()").matches({})
    assert not LabelSelector("zone notin ()").matches({"zone": ""})
