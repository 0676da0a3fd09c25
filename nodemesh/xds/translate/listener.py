"""The outbound HTTP listener: routes by Host/:authority through RDS, for plain and transparently
redirected (original destination) connections alike."""

from __future__ import annotations

from envoy.config.core.v3 import address_pb2, config_source_pb2
from envoy.config.listener.v3 import listener_components_pb2 as lc_pb2
from envoy.config.listener.v3 import listener_pb2
from envoy.extensions.filters.http.router.v3 import router_pb2
from envoy.extensions.filters.listener.original_dst.v3 import original_dst_pb2
from envoy.extensions.filters.network.http_connection_manager.v3 import (
    http_connection_manager_pb2 as hcm_pb2,
)

from nodemesh.xds.translate._proto import any_of
from nodemesh.xds.translate.fault import FILTER_NAME as FAULT_FILTER
from nodemesh.xds.translate.fault import fault_filter

__all__ = ["outbound_listener"]


def outbound_listener(
    name: str, address: str, port: int, route_config: str
) -> listener_pb2.Listener:
    hcm = hcm_pb2.HttpConnectionManager(
        stat_prefix=name,
        codec_type=hcm_pb2.HttpConnectionManager.AUTO,
        rds=hcm_pb2.Rds(
            route_config_name=route_config,
            config_source=config_source_pb2.ConfigSource(
                ads=config_source_pb2.AggregatedConfigSource(),
                resource_api_version=config_source_pb2.V3,
            ),
        ),
        http_filters=[
            hcm_pb2.HttpFilter(name=FAULT_FILTER, typed_config=any_of(fault_filter())),
            hcm_pb2.HttpFilter(
                name="envoy.filters.http.router", typed_config=any_of(router_pb2.Router())
            ),
        ],
    )
    return listener_pb2.Listener(
        name=name,
        address=address_pb2.Address(
            socket_address=address_pb2.SocketAddress(address=address, port_value=port)
        ),
        # Connections redirected by the node agent keep their original destination; routing
        # still goes by Host, which also lists every ClusterIP:port.
        listener_filters=[
            lc_pb2.ListenerFilter(
                name="envoy.filters.listener.original_dst",
                typed_config=any_of(original_dst_pb2.OriginalDst()),
            )
        ],
        filter_chains=[
            lc_pb2.FilterChain(
                filters=[
                    lc_pb2.Filter(
                        name="envoy.filters.network.http_connection_manager",
                        typed_config=any_of(hcm),
                    )
                ]
            )
        ],
    )
