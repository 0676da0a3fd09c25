"""Hand-built Envoy resources for the ADS server tests (the translator is tested elsewhere)."""

from __future__ import annotations

from envoy.config.cluster.v3 import cluster_pb2
from envoy.config.core.v3 import address_pb2, config_source_pb2
from envoy.config.endpoint.v3 import endpoint_components_pb2, endpoint_pb2
from envoy.config.listener.v3 import listener_components_pb2, listener_pb2
from envoy.config.route.v3 import route_components_pb2, route_pb2
from envoy.extensions.filters.http.router.v3 import router_pb2
from envoy.extensions.filters.network.http_connection_manager.v3 import (
    http_connection_manager_pb2 as hcm_pb2,
)
from envoy.type.matcher.v3 import regex_pb2
from google.protobuf import any_pb2, duration_pb2
from google.protobuf.message import Message


def _any(msg: Message) -> any_pb2.Any:
    a = any_pb2.Any()
    a.Pack(msg)
    return a


def eds_cluster(name: str, connect_timeout_s: int = 1) -> cluster_pb2.Cluster:
    c = cluster_pb2.Cluster(name=name, type=cluster_pb2.Cluster.EDS)
    c.connect_timeout.CopyFrom(duration_pb2.Duration(seconds=connect_timeout_s))
    # A stalled EDS fetch must show as a stall, not hide inside a 15 s default timeout.
    c.eds_cluster_config.eds_config.initial_fetch_timeout.CopyFrom(
        duration_pb2.Duration(seconds=60)
    )
    c.eds_cluster_config.eds_config.ads.SetInParent()
    c.eds_cluster_config.eds_config.resource_api_version = config_source_pb2.V3
    return c


def endpoints(name: str, *ports: int) -> endpoint_pb2.ClusterLoadAssignment:
    cla = endpoint_pb2.ClusterLoadAssignment(cluster_name=name)
    group = cla.endpoints.add()
    for port in ports:
        lb = group.lb_endpoints.add()
        lb.endpoint.CopyFrom(
            endpoint_components_pb2.Endpoint(
                address=address_pb2.Address(
                    socket_address=address_pb2.SocketAddress(address="127.0.0.1", port_value=port)
                )
            )
        )
    return cla


def http_listener(name: str, port: int, route_config: str) -> listener_pb2.Listener:
    hcm = hcm_pb2.HttpConnectionManager(stat_prefix=name)
    hcm.rds.route_config_name = route_config
    hcm.rds.config_source.ads.SetInParent()
    hcm.rds.config_source.resource_api_version = config_source_pb2.V3
    hcm.http_filters.add(name="envoy.filters.http.router", typed_config=_any(router_pb2.Router()))
    return listener_pb2.Listener(
        name=name,
        address=address_pb2.Address(
            socket_address=address_pb2.SocketAddress(address="127.0.0.1", port_value=port)
        ),
        filter_chains=[
            listener_components_pb2.FilterChain(
                filters=[
                    listener_components_pb2.Filter(
                        name="envoy.filters.network.http_connection_manager",
                        typed_config=_any(hcm),
                    )
                ]
            )
        ],
    )


def routes(name: str, *prefix_to_cluster: tuple[str, str]) -> route_pb2.RouteConfiguration:
    vh = route_components_pb2.VirtualHost(name="all", domains=["*"])
    for prefix, cluster in prefix_to_cluster:
        r = vh.routes.add()
        r.match.prefix = prefix
        r.route.cluster = cluster
    return route_pb2.RouteConfiguration(name=name, virtual_hosts=[vh])


def bad_regex_routes(name: str, cluster: str) -> route_pb2.RouteConfiguration:
    """Valid protobuf that Envoy refuses: RE2 cannot compile the regex."""
    rc = routes(name, ("/", cluster))
    r = rc.virtual_hosts[0].routes.add()
    r.match.safe_regex.CopyFrom(regex_pb2.RegexMatcher(regex="/broken(["))
    r.route.cluster = cluster
    return rc
