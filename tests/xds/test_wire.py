"""Hand-encoded responses decode, with the real protobuf runtime, to what was meant."""

from __future__ import annotations

from envoy.config.endpoint.v3 import endpoint_pb2
from envoy.service.discovery.v3 import discovery_pb2
from hypothesis import given
from hypothesis import strategies as st

from nodemesh.xds import _wire, types
from nodemesh.xds.cache import Resource
from tests.xds import resources as R


def test_sotw_response_decodes_to_the_original_resources() -> None:
    rs = [Resource.from_message(R.endpoints(n, 80, 81)) for n in ("a", "b")]
    raw = _wire.sotw_response(types.ENDPOINT, "v1", "7", (r.sotw_entry for r in rs))
    msg = discovery_pb2.DiscoveryResponse.FromString(raw)
    assert (msg.version_info, msg.nonce, msg.type_url) == ("v1", "7", types.ENDPOINT)
    decoded = [endpoint_pb2.ClusterLoadAssignment() for _ in msg.resources]
    for any_msg, out in zip(msg.resources, decoded, strict=True):
        assert any_msg.Unpack(out)
    assert decoded == [R.endpoints("a", 80, 81), R.endpoints("b", 80, 81)]


def test_delta_response_carries_names_versions_and_removals() -> None:
    r = Resource.from_message(R.endpoints("a", 80))
    raw = _wire.delta_response(types.ENDPOINT, "sys", "3", [r.delta_entry], ["gone", "old"])
    msg = discovery_pb2.DeltaDiscoveryResponse.FromString(raw)
    assert msg.system_version_info == "sys" and msg.nonce == "3"
    assert [(x.name, x.version) for x in msg.resources] == [("a", r.version)]
    assert list(msg.removed_resources) == ["gone", "old"]
    out = endpoint_pb2.ClusterLoadAssignment()
    assert msg.resources[0].resource.Unpack(out) and out == R.endpoints("a", 80)


@given(
    names=st.lists(st.text(min_size=1, max_size=300), min_size=0, max_size=5, unique=True),
    payload=st.binary(max_size=20000),
    version=st.text(max_size=40),
)
def test_any_length_and_text_round_trips(names: list[str], payload: bytes, version: str) -> None:
    entries = [_wire.delta_entry(n, version, _wire.any_bytes("t/x", payload)) for n in names]
    msg = discovery_pb2.DeltaDiscoveryResponse.FromString(
        _wire.delta_response("t/x", version, "1", entries, names)
    )
    assert [x.name for x in msg.resources] == names
    assert all(x.resource.value == payload and x.version == version for x in msg.resources)
    assert list(msg.removed_resources) == names
    assert _wire.varint(300) == bytes([0xAC, 0x02])


@given(
    type_url=st.text(max_size=200),
    name=st.text(max_size=300),
    payload=st.binary(max_size=20000),
)
def test_a_resource_frames_itself_once_per_protocol(
    type_url: str, name: str, payload: bytes
) -> None:
    r = Resource.from_payload(
        type_url, name, payload, endpoint_pb2.ClusterLoadAssignment.FromString
    )
    any_payload = _wire.any_bytes(type_url, payload)
    assert r.sotw_entry == _wire.sotw_entry(any_payload)
    assert r.delta_entry == _wire.delta_entry(name, r.version, any_payload)
    assert r.sotw_entry is r.sotw_entry and r.delta_entry is r.delta_entry  # made once
