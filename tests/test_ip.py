"""nodemesh._ip's fast path must say exactly what `ipaddress` says."""

from __future__ import annotations

import ipaddress

from hypothesis import example, given, settings
from hypothesis import strategies as st

from nodemesh._ip import all_dotted_quads, ip_version, is_dotted_quad

_PART = st.one_of(
    st.integers(0, 300).map(str),
    st.sampled_from(["00", "01", "007", "", "-1", "+1", " 1", "1 ", "٣", "²", "0x1", "1e2"]),
)
_QUADS = st.lists(_PART, min_size=3, max_size=5).map(".".join)


def _reference(text: str) -> int:
    try:
        return ipaddress.ip_address(text).version
    except ValueError:
        return 0


@settings(max_examples=2000)
@given(st.one_of(_QUADS, st.text(max_size=20), st.ip_addresses().map(str)))
@example("10.0.0.1")
@example("010.0.0.1")
@example("::ffff:10.0.0.1")
@example("1.2.3.٤")
def test_ip_version_is_ipaddress(text: str) -> None:
    assert ip_version(text) == _reference(text)
    if is_dotted_quad(text):
        assert _reference(text) == 4 and str(ipaddress.IPv4Address(text)) == text


_VALUES = st.lists(
    st.one_of(
        _QUADS,
        st.ip_addresses(v=4).map(str),
        st.text(alphabet="0123456789.\n", max_size=16),
        st.integers(0, 9),
    ),
    max_size=6,
)


@settings(max_examples=2000)
@given(_VALUES)
@example(["10.0.0.1", "10.0.0.2"])
@example(["10.0.0.1\n10.0.0.2"])  # one value, two quads: not a quad
@example(["10.0.0.1\n10.0.0.2", "10.0.0.3"])
@example(["10.0.0.1", "", "10.0.0.2"])
@example([])
def test_all_dotted_quads_is_each_one(values: list[object]) -> None:
    """The one pass over the joined values says what a check of each one says."""
    assert all_dotted_quads(values) == all(type(v) is str and is_dotted_quad(v) for v in values)
