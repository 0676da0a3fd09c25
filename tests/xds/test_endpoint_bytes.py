"""The hand-encoded ClusterLoadAssignment is byte-identical to protobuf's deterministic
serialization of the same message, so versions match `translate_messages` and restarts."""

from __future__ import annotations

from envoy.config.endpoint.v3 import endpoint_pb2
from hypothesis import given, settings
from hypothesis import strategies as st

from nodemesh.xds import types
from nodemesh.xds.cache import Resource
from nodemesh.xds.translate import ir
from nodemesh.xds.translate.endpoint import load_assignment, load_assignment_bytes

_text = st.text(st.characters(blacklist_categories=("Cs",)), max_size=300)
_endpoints = st.builds(
    ir.Endpoint,
    address=st.one_of(st.ip_addresses().map(str), _text),
    port=st.integers(0, 2**32 - 1),
    draining=st.booleans(),
    node=st.just(""),
    zone=st.one_of(st.sampled_from(["", "a", "zone-b"]), _text),
)
_cluster_endpoints = st.builds(
    ir.ClusterEndpoints, cluster=_text, endpoints=st.lists(_endpoints, max_size=40).map(tuple)
)


@settings(max_examples=500)
@given(_cluster_endpoints, _text)
def test_encoded_load_assignment_equals_protobuf_bytes(ce: ir.ClusterEndpoints, name: str) -> None:
    expected = load_assignment(ce, name).SerializeToString(deterministic=True)
    assert load_assignment_bytes(ce, name) == expected


@st.composite
def _uniform_cluster_endpoints(draw: st.DrawFn) -> ir.ClusterEndpoints:
    """Endpoints that share port, draining flag and zone (the encoder's fast path), addresses
    of any length (short ones usually)."""
    port = draw(st.one_of(st.integers(0, 2**32 - 1), st.sampled_from([80, 8080, 2**21])))
    draining = draw(st.booleans())
    zone = draw(st.one_of(st.sampled_from(["", "zone-b"]), _text))
    addresses = draw(
        st.lists(
            st.one_of(st.ip_addresses().map(str), _text, st.text(min_size=100, max_size=130)),
            min_size=1,
            max_size=40,
        )
    )
    return ir.ClusterEndpoints(
        draw(_text), tuple(ir.Endpoint(a, port, draining, "", zone) for a in addresses)
    )


@settings(max_examples=500)
@given(_uniform_cluster_endpoints(), _text)
def test_uniform_load_assignment_equals_protobuf_bytes(ce: ir.ClusterEndpoints, name: str) -> None:
    expected = load_assignment(ce, name).SerializeToString(deterministic=True)
    assert load_assignment_bytes(ce, name) == expected


@given(_cluster_endpoints)
def test_resource_from_payload_matches_from_message(ce: ir.ClusterEndpoints) -> None:
    message = load_assignment(ce, "ns/web:80")
    encoded = Resource.from_payload(
        types.ENDPOINT,
        "ns/web:80",
        load_assignment_bytes(ce, "ns/web:80"),
        endpoint_pb2.ClusterLoadAssignment.FromString,
    )
    plain = Resource.from_message(message)
    assert encoded == plain
    assert (encoded.version, encoded.sotw_entry, encoded.delta_entry) == (
        plain.version,
        plain.sotw_entry,
        plain.delta_entry,
    )
    assert encoded.message == message


def test_port_out_of_uint32_range_fails_as_protobuf_does() -> None:
    ce = ir.ClusterEndpoints("c", (ir.Endpoint("10.0.0.1", 2**32),))
    try:
        load_assignment(ce, "c")
    except ValueError as exc:
        expected: BaseException | None = exc
    else:
        expected = None
    try:
        load_assignment_bytes(ce, "c")
    except ValueError as exc:
        assert expected is not None and type(exc) is type(expected)
    else:
        assert expected is None
