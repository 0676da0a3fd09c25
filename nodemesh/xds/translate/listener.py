"""The outbound HTTP listener.

A connection the node agent redirected keeps its original destination (`original_dst` restores
it from SO_ORIGINAL_DST), and a filter chain per L7 destination (ClusterIP, port) sends it to
that Service's own route configuration, whose virtual host matches any Host: the kernel chose
the Service, so a `Host` header naming another one (or nothing known) cannot re-route it.
Connections made to the listener directly fall to the default chain, routed by Host/:authority.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Sequence

from envoy.config.core.v3 import address_pb2, config_source_pb2
from envoy.config.listener.v3 import listener_components_pb2 as lc_pb2
from envoy.config.listener.v3 import listener_pb2
from envoy.extensions.filters.http.router.v3 import router_pb2
from envoy.extensions.filters.listener.original_dst.v3 import original_dst_pb2
from envoy.extensions.filters.network.http_connection_manager.v3 import (
    http_connection_manager_pb2 as hcm_pb2,
)
from google.protobuf import wrappers_pb2

from nodemesh.xds.translate._proto import any_of
from nodemesh.xds.translate.fault import FILTER_NAME as FAULT_FILTER
from nodemesh.xds.translate.fault import fault_filter

__all__ = ["Destination", "outbound_listener"]

# (ClusterIP, port, name of that Service port's own route configuration)
Destination = tuple[str, int, str]


def outbound_listener(
    name: str,
    address: str,
    port: int,
    route_config: str,
    destinations: Sequence[Destination] = (),
) -> listener_pb2.Listener:
    chains = []
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
                filters=[_hcm_filter(name, rc_name)],
            )
        )
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
            name="by-host", filters=[_hcm_filter(name, route_config)]
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


def _hcm_filter(stat_prefix: str, route_config: str) -> lc_pb2.Filter:
    hcm = hcm_pb2.HttpConnectionManager(
        stat_prefix=stat_prefix,
        codec_type=hcm_pb2.HttpConnectionManager.AUTO,
        rds=hcm_pb2.Rds(route_config_name=route_config, config_source=_ADS),
        http_filters=_HTTP_FILTERS,
    )
    return lc_pb2.Filter(
        name="envoy.filters.network.http_connection_manager", typed_config=any_of(hcm)
    )
