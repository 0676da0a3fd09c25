"""nodemesh._ip's fast path must say exactly what `ipaddress` says."""

from __future__ import annotations

import ipaddress

from hypothesis import example, given, settings
from hypothesis import strategies as st

from nodemesh._ip import ip_version, is_dotted_quad

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
