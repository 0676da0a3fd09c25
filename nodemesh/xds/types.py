"""Type URLs of the xDS resources nodemesh serves, and the order Envoy needs them in.

Responses go out Cluster -> ClusterLoadAssignment -> Secret -> Listener -> RouteConfiguration so
that new clusters come before the listeners and routes that point at them (make before break;
the ADS streams also hold listeners and routes back until the client has answered new clusters,
nodemesh/xds/server/_streams.py). Custom types go last.
"""

from __future__ import annotations

from google.protobuf.message import Message

__all__ = [
    "CLUSTER",
    "ENDPOINT",
    "LISTENER",
    "RESPONSE_ORDER",
    "ROUTE",
    "SECRET",
    "TYPE_PREFIX",
    "order_key",
    "resource_name",
    "short_name",
    "type_url_of",
]

TYPE_PREFIX = "type.googleapis.com/"
CLUSTER = TYPE_PREFIX + "envoy.config.cluster.v3.Cluster"
ENDPOINT = TYPE_PREFIX + "envoy.config.endpoint.v3.ClusterLoadAssignment"
LISTENER = TYPE_PREFIX + "envoy.config.listener.v3.Listener"
ROUTE = TYPE_PREFIX + "envoy.config.route.v3.RouteConfiguration"
SECRET = TYPE_PREFIX + "envoy.extensions.transport_sockets.tls.v3.Secret"

RESPONSE_ORDER: tuple[str, ...] = (CLUSTER, ENDPOINT, SECRET, LISTENER, ROUTE)
_ORDER = {t: i for i, t in enumerate(RESPONSE_ORDER)}
_SHORT = {CLUSTER: "cds", ENDPOINT: "eds", SECRET: "sds", LISTENER: "lds", ROUTE: "rds"}


def order_key(type_url: str) -> tuple[int, str]:
    """Sort key that puts the standard types in Envoy's order and custom types after them."""
    return (_ORDER.get(type_url, len(_ORDER)), type_url)


def short_name(type_url: str) -> str:
    """`cds`, `eds`, ... for the standard types; the message name for custom ones."""
    return _SHORT.get(type_url) or type_url.rsplit(".", 1)[-1]


def type_url_of(message: Message) -> str:
    return TYPE_PREFIX + message.DESCRIPTOR.full_name


def resource_name(message: Message) -> str:
    """The xDS name of a resource: `cluster_name` for a ClusterLoadAssignment, `name` otherwise."""
    fields = message.DESCRIPTOR.fields_by_name
    if "cluster_name" in fields and "name" not in fields:
        return str(message.cluster_name)  # type: ignore[attr-defined]
    if "name" in fields:
        return str(message.name)  # type: ignore[attr-defined]
    raise ValueError(f"{message.DESCRIPTOR.full_name} has no name field; pass name= explicitly")
