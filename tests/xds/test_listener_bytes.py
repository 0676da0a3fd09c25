"""The outbound listener encoded by hand is byte-identical to protobuf's deterministic
serialization of `outbound_listener(...)`, and declares the route configurations it names."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from nodemesh.xds import types
from nodemesh.xds.cache import Resource
from nodemesh.xds.cache._snapshot import _route_names
from nodemesh.xds.translate import Translator, ir, translate_messages
from nodemesh.xds.translate.listener import (
    ConsumerChain,
    outbound_listener,
    outbound_listener_bytes,
    outbound_listener_routes,
)

_text = st.text(st.characters(blacklist_categories=("Cs",)), max_size=150)
_ips = st.ip_addresses().map(str) | st.sampled_from(["10.96.0.1", "fd00::0001", "0.0.0.0"])
_ports = st.integers(0, 65535) | st.integers(65536, 2**32 - 1)
_destinations = st.lists(st.tuples(_ips, _ports, _text), max_size=6)


_consumers = st.lists(
    st.builds(
        ConsumerChain,
        _text,
        st.ip_addresses(v=4).map(str),
        st.none() | st.integers(0, 5),  # which destination (always one of the listener's)
    ),
    max_size=3,
)


@settings(max_examples=300)
@given(
    _text,
    _text | st.ip_addresses().map(str),
    _ports,
    _text,
    _destinations,
    _consumers,
    st.sampled_from(["", "stdout", "/dev/stdout"]) | _text,  # the access log
)
def test_outbound_listener_bytes_equal_protobuf(
    name: str,
    address: str,
    port: int,
    route_config: str,
    destinations: list[tuple[str, int, str]],
    consumers: list[ConsumerChain],
    access_log: str,
) -> None:
    if not 0 <= port <= 0xFFFF_FFFF:
        consumers = []  # a consumer chain matches on the listener's port: uint32
    consumers = [
        c._replace(destination=destinations[c.destination % len(destinations)])
        if c.destination is not None and destinations
        else c._replace(destination=None)
        for c in consumers
    ]
    message = outbound_listener(
        name, address, port, route_config, destinations, consumers, access_log
    )
    encoded = outbound_listener_bytes(
        name, address, port, route_config, destinations, consumers, access_log
    )
    assert encoded == message.SerializeToString(deterministic=True)
    routes = outbound_listener_routes(route_config, destinations)
    assert routes == tuple(sorted(_route_names([Resource.from_message(message)])))


def test_translator_listener_matches_translate_messages() -> None:
    mesh = ir.Mesh(
        virtual_hosts=(ir.VirtualHost("ns/web:80", ("web",), (ir.Route("r"),)),),
        services=(ir.ServiceInfo("ns/web", ("10.96.0.9", "fd00::9"), (80,), (80,)),),
    )
    resource = Translator().translate(mesh).shared[types.LISTENER][0]
    message = translate_messages(mesh)[types.LISTENER][0]
    assert resource.payload == message.SerializeToString(deterministic=True)
    assert resource.message == message
    assert resource.references == ("outbound", "outbound/ns/web:80")
