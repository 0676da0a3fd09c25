"""The route configuration assembled from per-virtual-host bytes is byte-identical to protobuf's
deterministic serialization of the whole message (so versions match `translate_messages`)."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from nodemesh.xds import types
from nodemesh.xds.translate import Translator, ir, translate_messages
from nodemesh.xds.translate._encode import LEN, strings, strings_bytes, varint
from nodemesh.xds.translate.route import (
    destination_route_configuration,
    destination_route_configuration_bytes,
    route_configuration,
    route_configuration_bytes,
    virtual_host,
    virtual_host_entry,
    virtual_host_routes,
)

_text = st.text(st.characters(blacklist_categories=("Cs",)), max_size=200)
# Host names are ASCII: the text fast path of strings_bytes, on both sides of 128 characters.
_ascii = st.text(st.characters(max_codepoint=127), max_size=200)
_pairs = st.lists(st.tuples(_text, _text), max_size=2).map(tuple)
_mutations = st.none() | st.builds(
    ir.HeaderMutation, set=_pairs, add=_pairs, remove=st.lists(_text, max_size=2).map(tuple)
)
# A backend with header changes of its own (a backendRef's filters) is never plain: it needs a
# weighted cluster, even alone.
_filtered_backends = st.builds(
    ir.Backend,
    cluster=_text,
    weight=st.integers(1, 1000),
    request_headers=_mutations,
    response_headers=_mutations,
    hostname=_text,
)
_routes = st.builds(
    ir.Route,
    name=_text,
    match=st.builds(
        ir.RouteMatch,
        headers=st.lists(st.builds(ir.HeaderMatch, name=_text, value=_text), max_size=2).map(tuple),
    ),
    backends=st.lists(
        st.builds(ir.Backend, cluster=_text, weight=st.integers(1, 1000)) | _filtered_backends,
        max_size=3,
    ).map(tuple),
    request_headers=_mutations,
    response_headers=_mutations,
    rewrite=st.none() | st.builds(ir.Rewrite, hostname=_text),
    invalid_weight=st.integers(0, 3),
    direct_status=st.sampled_from([500, 503]),
    timeout_ms=st.none() | st.integers(0, 10**7),
    origins=st.lists(_text, max_size=2).map(tuple),
)
_plain_routes = st.builds(
    ir.Route,
    name=_text,
    backends=st.tuples(st.builds(ir.Backend, cluster=_text, weight=st.integers(1, 1000))),
    origins=st.lists(_text, max_size=2).map(tuple),
)
# All but one thing plain: one backend with header changes of its own.
_almost_plain_routes = st.builds(
    ir.Route,
    name=_text,
    backends=st.tuples(_filtered_backends),
    origins=st.lists(_text, max_size=2).map(tuple),
)
_vhosts = st.builds(
    ir.VirtualHost,
    name=_text,
    domains=st.lists(_text | _ascii, max_size=12).map(tuple),
    routes=st.lists(_plain_routes, max_size=3).map(tuple)
    | st.lists(_routes | _plain_routes | _almost_plain_routes, max_size=3).map(tuple),
)


@settings(max_examples=400)
@given(_text, st.lists(_vhosts, max_size=5))
def test_route_configuration_bytes_equal_protobuf(name: str, vhosts: list[ir.VirtualHost]) -> None:
    expected = route_configuration(name, [virtual_host(v) for v in vhosts]).SerializeToString(
        deterministic=True
    )
    assert route_configuration_bytes(name, [virtual_host_entry(v) for v in vhosts]) == expected


@given(st.lists(_vhosts, max_size=5, unique_by=lambda v: v.name))
def test_translator_route_resource_matches_translate_messages(vhosts: list[ir.VirtualHost]) -> None:
    mesh = ir.Mesh(virtual_hosts=tuple(vhosts))
    resource = Translator().translate(mesh).shared[types.ROUTE][0]
    message = translate_messages(mesh)[types.ROUTE][0]
    assert resource.payload == message.SerializeToString(deterministic=True)
    assert resource.message == message


@given(_text, _vhosts)
def test_destination_route_configuration_bytes_equal_protobuf(
    name: str, vhost: ir.VirtualHost
) -> None:
    message = destination_route_configuration(name, virtual_host(vhost))
    expected = message.SerializeToString(deterministic=True)
    assert destination_route_configuration_bytes(name, vhost) == expected
    routes = virtual_host_routes(vhost)
    assert destination_route_configuration_bytes(name, vhost, routes) == expected


@given(st.lists(_vhosts, max_size=5))
def test_translator_destination_routes_match_translate_messages(
    vhosts: list[ir.VirtualHost],
) -> None:
    services = tuple(
        ir.ServiceInfo(f"ns/s{i}", (f"10.0.0.{i + 1}",), (80,), (80,)) for i in range(len(vhosts))
    )
    named = [
        ir.VirtualHost(f"{s.name}:80", v.domains, v.routes)
        for s, v in zip(services, vhosts, strict=True)
    ]
    mesh = ir.Mesh(virtual_hosts=tuple(named), services=services)
    resources = Translator().translate(mesh).shared[types.ROUTE]
    messages = translate_messages(mesh)[types.ROUTE]
    assert len(resources) == len(vhosts) + 1  # the outbound one and one per destination
    assert [r.payload for r in resources] == [
        m.SerializeToString(deterministic=True) for m in messages
    ]


@settings(max_examples=400)
@given(st.integers(1, 15) | st.integers(16, 2**29 - 1), st.lists(_text | _ascii, max_size=12))
def test_strings_bytes_equal_the_pieces_joined(field: int, values: list[str]) -> None:
    tag_bytes = varint((field << 3) | LEN)  # one byte up to field 15, more beyond
    assert strings_bytes(tag_bytes, values) == b"".join(strings(tag_bytes, values))
