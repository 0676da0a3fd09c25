"""The outbound HTTP listener.

A connection the node agent redirected keeps its original destination (`original_dst` restores
it from SO_ORIGINAL_DST), and a filter chain per L7 destination (ClusterIP, port) sends it to
that Service's own route configuration, whose virtual host matches any Host: the kernel chose
the Service, so a `Host` header naming another one (or nothing known) cannot re-route it.
Connections made to the listener directly take chain `by-host/direct`, routed by Host/:authority
(as is anything no chain matches, by the default chain).
"""

from __future__ import annotations

import functools
import ipaddress
from collections.abc import Sequence
from typing import Any, NamedTuple

from envoy.config.accesslog.v3 import accesslog_pb2
from envoy.config.core.v3 import (
    address_pb2,
    base_pb2,
    config_source_pb2,
    protocol_pb2,
)
from envoy.config.core.v3 import (
    substitution_format_string_pb2 as substitution_format_pb2,
)
from envoy.config.listener.v3 import listener_components_pb2 as lc_pb2
from envoy.config.listener.v3 import listener_pb2
from envoy.extensions.access_loggers.file.v3 import file_pb2
from envoy.extensions.access_loggers.stream.v3 import stream_pb2
from envoy.extensions.filters.common.set_filter_state.v3 import value_pb2
from envoy.extensions.filters.http.router.v3 import router_pb2
from envoy.extensions.filters.listener.original_dst.v3 import original_dst_pb2
from envoy.extensions.filters.network.http_connection_manager.v3 import (
    http_connection_manager_pb2 as hcm_pb2,
)
from envoy.extensions.filters.network.set_filter_state.v3 import set_filter_state_pb2
from google.protobuf import duration_pb2, struct_pb2, wrappers_pb2

from nodemesh.xds._wire import any_bytes
from nodemesh.xds.translate._encode import LEN, VARINT, tag, varint
from nodemesh.xds.translate._proto import any_of
from nodemesh.xds.translate.fault import FILTER_NAME as FAULT_FILTER
from nodemesh.xds.translate.fault import fault_filter
from nodemesh.xds.translate.route import CONSUMER_STATE

__all__ = [
    "ACCESS_LOG_FORMAT",
    "ConsumerChain",
    "Destination",
    "consumer_chain",
    "consumer_chains_bytes",
    "outbound_listener",
    "outbound_listener_bytes",
    "outbound_listener_parts",
    "outbound_listener_routes",
]

# (ClusterIP, port, name of that Service port's own route configuration)
Destination = tuple[str, int, str]


class ConsumerChain(NamedTuple):
    """A filter chain for one client of a consumer namespace on this node (`source`, a pod
    IP): it marks the connection with the namespace (filter state `CONSUMER_STATE`), which that
    namespace's consumer routes match. `destination` None: connections made to the listener
    itself (routed by Host, `route_config`); else a redirected connection to that destination,
    whose route configuration holds the namespace's routes for it.

    One chain per pod, not one per namespace listing its pods: a pod that comes or goes adds
    or removes its own chains, and Envoy drains only those (a chain whose match changed would
    be drained, closing the other pods' connections on it)."""

    namespace: str
    source: str
    destination: Destination | None = None


def _cidr(ip: str) -> address_pb2.CidrRange:
    addr = ipaddress.ip_address(ip)
    return address_pb2.CidrRange(
        address_prefix=str(addr), prefix_len=wrappers_pb2.UInt32Value(value=addr.max_prefixlen)
    )


def consumer_chain(
    stat_prefix: str, port: int, route_config: str, chain: ConsumerChain, access_log: str = ""
) -> lc_pb2.FilterChain:
    match = lc_pb2.FilterChainMatch(source_prefix_ranges=[_cidr(chain.source)])
    if chain.destination is None:
        # the listener's own port, so that a Service port equal to it cannot take precedence
        match.destination_port.value = port
        name, rc_name = f"consumer/{chain.namespace}/{chain.source}", route_config
    else:
        ip, dport, rc_name = chain.destination
        match.destination_port.value = dport
        match.prefix_ranges.append(_cidr(ip))
        name = f"{ip}:{dport}/consumer/{chain.namespace}/{chain.source}"
    mark = set_filter_state_pb2.Config(
        on_new_connection=[
            value_pb2.FilterStateValue(
                object_key=CONSUMER_STATE,
                factory_key="envoy.string",
                format_string=substitution_format_pb2.SubstitutionFormatString(
                    text_format_source=base_pb2.DataSource(inline_string=chain.namespace)
                ),
            )
        ]
    )
    return lc_pb2.FilterChain(
        name=name,
        filter_chain_match=match,
        filters=[
            lc_pb2.Filter(name="envoy.filters.network.set_filter_state", typed_config=any_of(mark)),
            _hcm_filter(stat_prefix, rc_name, access_log),
        ],
    )


def consumer_chains_bytes(
    stat_prefix: str,
    port: int,
    route_config: str,
    chains: Sequence[ConsumerChain],
    access_log: str = "",
) -> bytes:
    """The `filter_chains` entries of `chains`, as they follow the destinations' in the
    serialized listener (a few per node: made through protobuf)."""
    return b"".join(
        _field(
            _L_FILTER_CHAINS,
            consumer_chain(stat_prefix, port, route_config, c, access_log).SerializeToString(
                deterministic=True
            ),
        )
        for c in chains
    )


def outbound_listener(
    name: str,
    address: str,
    port: int,
    route_config: str,
    destinations: Sequence[Destination] = (),
    consumers: Sequence[ConsumerChain] = (),
    access_log: str = "",
) -> listener_pb2.Listener:
    """`access_log`: the file every connection manager writes a JSON line per request to
    ("": none).

    The first filter chain takes the connections made to the listener itself, as the default
    chain would: it is there so that the listener always has one. Envoy updates a Listener in
    place, draining only the chains that changed, only if the new one has a filter chain; one
    without is a new Listener, and the old one is drained whole, every connection on the node
    closed after Envoy's drain time (the last HTTPRoute of the mesh removed, say)."""
    chains = [
        lc_pb2.FilterChain(
            name="by-host/direct",
            filter_chain_match=lc_pb2.FilterChainMatch(
                destination_port=wrappers_pb2.UInt32Value(value=port)
            ),
            filters=[_hcm_filter(name, route_config, access_log)],
        )
    ]
    for ip, dport, rc_name in destinations:
        cidr = ipaddress.ip_address(ip)
        chains.append(
            lc_pb2.FilterChain(
                name=f"{ip}:{dport}",
                filter_chain_match=lc_pb2.FilterChainMatch(
                    destination_port=wrappers_pb2.UInt32Value(value=dport),
                    prefix_ranges=[
                        address_pb2.CidrRange(
                            address_prefix=str(cidr),
                            prefix_len=wrappers_pb2.UInt32Value(value=cidr.max_prefixlen),
                        )
                    ],
                ),
                filters=[_hcm_filter(name, rc_name, access_log)],
            )
        )
    chains += [consumer_chain(name, port, route_config, c, access_log) for c in consumers]
    return listener_pb2.Listener(
        name=name,
        address=address_pb2.Address(
            socket_address=address_pb2.SocketAddress(address=address, port_value=port)
        ),
        listener_filters=[
            lc_pb2.ListenerFilter(
                name="envoy.filters.listener.original_dst",
                typed_config=any_of(original_dst_pb2.OriginalDst()),
            )
        ],
        filter_chains=chains,
        default_filter_chain=lc_pb2.FilterChain(
            name="by-host", filters=[_hcm_filter(name, route_config, access_log)]
        ),
    )


# Made once and copied into every connection manager (never altered): one per L7 destination.
_ADS = config_source_pb2.ConfigSource(
    ads=config_source_pb2.AggregatedConfigSource(),
    resource_api_version=config_source_pb2.V3,
)
_HTTP_FILTERS = (
    hcm_pb2.HttpFilter(name=FAULT_FILTER, typed_config=any_of(fault_filter())),
    hcm_pb2.HttpFilter(name="envoy.filters.http.router", typed_config=any_of(router_pb2.Router())),
)


# What the node Envoy changes about a connection, kept to what the mesh API asks for: a
# WebSocket upgrade goes through (Envoy refuses upgrades it is not told about, with a 403), a
# stream is not reset for being idle (Envoy's default: 5 minutes), as without a mesh (a
# TrafficPolicy's `timeouts.idle` sets one per route), a response keeps the backend's
# Server header (Envoy's default writes `server: envoy` over it), and an HTTP/1.0 request is
# answered (Envoy's default refuses it with a 426; nginx's proxy_pass sends HTTP/1.0 unless
# told otherwise).
_UPGRADES = (hcm_pb2.HttpConnectionManager.UpgradeConfig(upgrade_type="websocket"),)
# An HTTP/1.0 request may carry no Host: it gets this one, which no Service has, so a direct
# connection answers 404 (no route), and a redirected one goes to its destination's virtual
# host, which takes any Host (Envoy refuses it with a 400 otherwise).
_HTTP1 = protocol_pb2.Http1ProtocolOptions(
    accept_http_10=True, default_host_for_http_10="no-host.nodemesh.invalid"
)
_NO_STREAM_IDLE_TIMEOUT = duration_pb2.Duration()
_SERVER_HEADER = hcm_pb2.HttpConnectionManager.PASS_THROUGH


# One JSON line per request: what an operator asks of a request that went wrong (where it was
# routed, what answered, Envoy's response flags such as UF, UH, NR or URX, how many tries).
ACCESS_LOG_FORMAT = {
    "start_time": "%START_TIME%",
    "method": "%REQ(:METHOD)%",
    "authority": "%REQ(:AUTHORITY)%",
    "path": "%REQ(X-ENVOY-ORIGINAL-PATH?:PATH)%",
    "protocol": "%PROTOCOL%",
    "response_code": "%RESPONSE_CODE%",
    "response_flags": "%RESPONSE_FLAGS%",
    "route_name": "%ROUTE_NAME%",
    "upstream_cluster": "%UPSTREAM_CLUSTER%",
    "upstream_host": "%UPSTREAM_HOST%",
    "attempts": "%UPSTREAM_REQUEST_ATTEMPT_COUNT%",
    "duration_ms": "%DURATION%",
    "bytes_received": "%BYTES_RECEIVED%",
    "bytes_sent": "%BYTES_SENT%",
    "downstream_remote_address": "%DOWNSTREAM_REMOTE_ADDRESS%",
    "request_id": "%REQ(X-REQUEST-ID)%",
}


@functools.lru_cache(maxsize=4)
def _access_logs(path: str) -> tuple[accesslog_pb2.AccessLog, ...]:
    """ "stdout": Envoy's standard output (nothing to open, so nothing to refuse); another
    path: a file the node Envoy opens ("": no access log)."""
    if not path:
        return ()
    json_format = struct_pb2.Struct()
    json_format.update(ACCESS_LOG_FORMAT)
    log_format = substitution_format_pb2.SubstitutionFormatString(json_format=json_format)
    if path == "stdout":
        out = stream_pb2.StdoutAccessLog(log_format=log_format)
        return (
            accesslog_pb2.AccessLog(name="envoy.access_loggers.stdout", typed_config=any_of(out)),
        )
    config = file_pb2.FileAccessLog(path=path, log_format=log_format)
    return (accesslog_pb2.AccessLog(name="envoy.access_loggers.file", typed_config=any_of(config)),)


def _after_rds(access_log: str) -> dict[str, Any]:
    """The connection manager's fields after `rds`: the same in every one (`_hcm_tail` has
    them serialized)."""
    return {
        "http_filters": _HTTP_FILTERS,
        "upgrade_configs": _UPGRADES,
        "stream_idle_timeout": _NO_STREAM_IDLE_TIMEOUT,
        "server_header_transformation": _SERVER_HEADER,
        "http_protocol_options": _HTTP1,
        "access_log": _access_logs(access_log),
        # `web.shop.svc.cluster.local.` (a resolver's absolute name, which skips the search
        # domains) is the same Service: it got 404
        "strip_trailing_host_dot": True,
    }


def _hcm_filter(stat_prefix: str, route_config: str, access_log: str = "") -> lc_pb2.Filter:
    hcm = hcm_pb2.HttpConnectionManager(
        stat_prefix=stat_prefix,
        codec_type=hcm_pb2.HttpConnectionManager.AUTO,
        rds=hcm_pb2.Rds(route_config_name=route_config, config_source=_ADS),
        **_after_rds(access_log),
    )
    return lc_pb2.Filter(
        name="envoy.filters.network.http_connection_manager", typed_config=any_of(hcm)
    )


# -- the same listener encoded by hand ---------------------------------------------------------
# Per L7 destination, a filter chain whose connection manager differs only in its route
# configuration name: 1,500 destinations through the protobuf API cost about 50 ms. The parts
# that do not repeat are still made by protobuf; the filter chains are spliced in between them.


def _field(tag_bytes: bytes, payload: bytes) -> bytes:
    return tag_bytes + varint(len(payload)) + payload


_L = listener_pb2.Listener
_HCM = hcm_pb2.HttpConnectionManager
_L_FILTER_CHAINS = tag(_L, "filter_chains", LEN)
_FC_MATCH = tag(lc_pb2.FilterChain, "filter_chain_match", LEN)
_FC_FILTERS = tag(lc_pb2.FilterChain, "filters", LEN)
_FC_NAME = tag(lc_pb2.FilterChain, "name", LEN)
_FCM_PREFIX_RANGES = tag(lc_pb2.FilterChainMatch, "prefix_ranges", LEN)
_FCM_DESTINATION_PORT = tag(lc_pb2.FilterChainMatch, "destination_port", LEN)
_CIDR_ADDRESS = tag(address_pb2.CidrRange, "address_prefix", LEN)
_CIDR_LEN = tag(address_pb2.CidrRange, "prefix_len", LEN)
_UINT32_VALUE = tag(wrappers_pb2.UInt32Value, "value", VARINT)
_F_NAME = tag(lc_pb2.Filter, "name", LEN)
_F_TYPED_CONFIG = tag(lc_pb2.Filter, "typed_config", LEN)
_HCM_RDS = tag(_HCM, "rds", LEN)
_RDS_CONFIG_SOURCE = _field(
    tag(hcm_pb2.Rds, "config_source", LEN), _ADS.SerializeToString(deterministic=True)
)
_RDS_NAME = tag(hcm_pb2.Rds, "route_config_name", LEN)
_HCM_NAME = "envoy.filters.network.http_connection_manager"
_HCM_TYPE_URL = any_of(_HCM()).type_url


@functools.lru_cache(maxsize=4)
def _hcm_tail(access_log: str) -> bytes:
    """The fields after `rds` in every connection manager, serialized."""
    tail: bytes = _HCM(**_after_rds(access_log)).SerializeToString(deterministic=True)
    return tail


def _numbers(message: type, *names: str) -> list[int]:
    return [message.DESCRIPTOR.fields_by_name[n].number for n in names]  # type: ignore[attr-defined]


# What the splicing relies on: fields written in field-number order, as deterministic
# serialization writes them (tests/xds/test_listener_bytes.py compares with protobuf).
assert max(_numbers(_L, "name", "address")) < _numbers(_L, "filter_chains")[0]
assert _numbers(_L, "filter_chains")[0] < min(
    _numbers(_L, "listener_filters", "default_filter_chain")
)
assert _numbers(lc_pb2.FilterChain, "filter_chain_match", "filters", "name") == sorted(
    _numbers(lc_pb2.FilterChain, "filter_chain_match", "filters", "name")
)
assert _numbers(lc_pb2.FilterChainMatch, "prefix_ranges") < _numbers(
    lc_pb2.FilterChainMatch, "destination_port"
)
assert max(_numbers(_HCM, "codec_type", "stat_prefix")) < _numbers(_HCM, "rds")[0]
assert _numbers(_HCM, "rds")[0] < min(_numbers(_HCM, *_after_rds("")))


def _uint32_value(tag_bytes: bytes, value: int) -> bytes:
    """A `google.protobuf.UInt32Value` field (its value left out when 0, as proto3 does)."""
    inner = _UINT32_VALUE + varint(value) if value else b""
    return tag_bytes + varint(len(inner)) + inner


def _hcm_filter_bytes(hcm_head: bytes, route_config: str, access_log: str = "") -> bytes:
    """`_hcm_filter(stat_prefix, route_config)` serialized, from the connection manager's fields
    before `rds` (`hcm_head`)."""
    name = route_config.encode()
    rds = _RDS_CONFIG_SOURCE + (_field(_RDS_NAME, name) if name else b"")
    hcm = hcm_head + _field(_HCM_RDS, rds) + _hcm_tail(access_log)
    return _field(_F_NAME, _HCM_NAME.encode()) + _field(
        _F_TYPED_CONFIG, any_bytes(_HCM_TYPE_URL, hcm)
    )


def outbound_listener_bytes(
    name: str,
    address: str,
    port: int,
    route_config: str,
    destinations: Sequence[Destination] = (),
    consumers: Sequence[ConsumerChain] = (),
    access_log: str = "",
) -> bytes:
    """`outbound_listener(...)` serialized deterministically; its filter chains encoded here."""
    head, chains, tail = outbound_listener_parts(
        name, address, port, route_config, destinations, access_log
    )
    if consumers:
        chains += consumer_chains_bytes(name, port, route_config, consumers, access_log)
    return head + chains + tail


def outbound_listener_parts(
    name: str,
    address: str,
    port: int,
    route_config: str,
    destinations: Sequence[Destination] = (),
    access_log: str = "",
) -> tuple[bytes, bytes, bytes]:
    """`outbound_listener_bytes(...)` without consumers, in three parts: what precedes the
    destinations' filter chains (the direct chain included), their chains, what follows
    (consumer chains go between the last two)."""
    if not all(0 <= dport <= 0xFFFF_FFFF for _, dport, _ in destinations):
        # Out of range for uint32: let protobuf raise what it raises.
        out: bytes = outbound_listener(
            name, address, port, route_config, destinations, access_log=access_log
        ).SerializeToString(deterministic=True)
        return out, b"", b""
    full = outbound_listener(name, address, port, route_config, access_log=access_log)
    head: bytes = _L(
        name=full.name, address=full.address, filter_chains=full.filter_chains
    ).SerializeToString(deterministic=True)
    tail: bytes = _L(
        listener_filters=full.listener_filters, default_filter_chain=full.default_filter_chain
    ).SerializeToString(deterministic=True)
    hcm_head = _HCM(stat_prefix=name, codec_type=_HCM.AUTO).SerializeToString(deterministic=True)
    chains = []
    for ip, dport, rc_name in destinations:
        cidr = ipaddress.ip_address(ip)
        prefix = str(cidr).encode()
        cidr_range = _field(_CIDR_ADDRESS, prefix) + _uint32_value(_CIDR_LEN, cidr.max_prefixlen)
        match = _field(_FCM_PREFIX_RANGES, cidr_range) + _uint32_value(_FCM_DESTINATION_PORT, dport)
        chain = (
            _field(_FC_MATCH, match)
            + _field(_FC_FILTERS, _hcm_filter_bytes(hcm_head, rc_name, access_log))
            + _field(_FC_NAME, f"{ip}:{dport}".encode())
        )
        chains.append(_field(_L_FILTER_CHAINS, chain))
    return head, b"".join(chains), tail


def outbound_listener_routes(
    route_config: str, destinations: Sequence[Destination]
) -> tuple[str, ...]:  # consumer chains add none: theirs are among these
    """The route configuration names `outbound_listener(...)` refers to, sorted (what
    `Snapshot.consistent()` would read from the message)."""
    return tuple(sorted({route_config, *(rc_name for _, _, rc_name in destinations)}))
