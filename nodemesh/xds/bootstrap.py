"""Bootstrap configuration for a node Envoy: ADS over gRPC to the control plane, admin on loopback.

Also the `nodemesh bootstrap` subcommand, which prints it as JSON (valid YAML too).
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

from envoy.config.bootstrap.v3 import bootstrap_pb2
from envoy.extensions.upstreams.http.v3 import http_protocol_options_pb2
from google.protobuf import json_format

__all__ = ["RE2_MAX_PROGRAM_SIZE", "RUNTIME", "XDS_CLUSTER", "bootstrap", "configure", "run"]

XDS_CLUSTER = "nodemesh-xds"


# Envoy refuses a regular expression whose compiled RE2 program is larger than 100 by default:
# `/api/v[0-9]+/(users|orders)/[0-9a-f-]{36}` is 135. A refused expression NACKs the outbound
# RouteConfiguration that every Service's routes share, so no route in the mesh could change
# until it was fixed. 32768 (Istio's value) takes what users write; RE2 stays linear-time. The
# builder refuses a larger one (`builder/httproute.py`), so Envoy never has to.
RE2_MAX_PROGRAM_SIZE = 32768
RUNTIME: dict[str, int] = {"re2.max_program_size.error_level": RE2_MAX_PROGRAM_SIZE}


def _split(hostport: str) -> tuple[str, int]:
    """The control plane's address as a node reaches it. What Envoy would refuse, or take
    and never connect with (`http://host`: a DNS name with `//` in it), is a ValueError."""
    host, sep, port = hostport.rpartition(":")
    host = host.strip("[]")
    if not sep or not port.isdigit() or not 0 < int(port) < 65536 or not host or "/" in host:
        raise ValueError(
            f"expected HOST:PORT (the control plane's address as the node reaches it, a port "
            f"from 1 to 65535, no scheme), got {hostport!r}"
        )
    return host, int(port)


def bootstrap(
    node: str,
    xds: str,
    *,
    cluster: str = "nodemesh",
    admin_port: int = 15000,
    delta: bool = True,
    retry_base_ms: int = 250,
    retry_max_ms: int = 5000,
) -> dict[str, Any]:
    """The bootstrap for a node Envoy, as a dict that Envoy accepts as JSON or YAML.

    It is validated against Envoy's Bootstrap proto before it is returned, so a typo in a field
    name fails here rather than in Envoy.
    """
    host, port = _split(xds)
    # Envoy refuses an empty node id or cluster ("node 'id' and 'cluster' are required"): a
    # DaemonSet's --node "$NODE_NAME" with the variable unset printed a bootstrap Envoy
    # crash-looped on.
    for what, value in (("node id (the Node's name)", node), ("cluster", cluster)):
        if not value.strip():
            raise ValueError(f"expected a {what}, got {value!r}")
    config: dict[str, Any] = {
        "node": {"id": node, "cluster": cluster},
        "admin": {
            "address": {"socket_address": {"address": "127.0.0.1", "port_value": admin_port}}
        },
        "dynamic_resources": {
            "ads_config": {
                "api_type": "DELTA_GRPC" if delta else "GRPC",
                "transport_api_version": "V3",
                "set_node_on_first_message_only": True,
                "grpc_services": [
                    {
                        "envoy_grpc": {
                            "cluster_name": XDS_CLUSTER,
                            # Reconnect quickly after a control-plane restart, with a cap.
                            "retry_policy": {
                                "retry_back_off": {
                                    "base_interval": f"{retry_base_ms / 1000:.3f}s",
                                    "max_interval": f"{retry_max_ms / 1000:.3f}s",
                                }
                            },
                        }
                    }
                ],
            },
            "cds_config": {"ads": {}, "resource_api_version": "V3"},
            "lds_config": {"ads": {}, "resource_api_version": "V3"},
        },
        "static_resources": {
            "clusters": [
                {
                    "name": XDS_CLUSTER,
                    "type": "STRICT_DNS" if not _is_ip(host) else "STATIC",
                    # A name's IPv4 address first (its IPv6 one if it has none): Envoy's
                    # resolver answers `localhost` with ::1, and an Envoy told
                    # `localhost:18000` never reached a control plane on 127.0.0.1.
                    **({} if _is_ip(host) else {"dns_lookup_family": "V4_PREFERRED"}),
                    "connect_timeout": "1s",
                    "typed_extension_protocol_options": {
                        "envoy.extensions.upstreams.http.v3.HttpProtocolOptions": {
                            "@type": "type.googleapis.com/"
                            "envoy.extensions.upstreams.http.v3.HttpProtocolOptions",
                            "explicit_http_config": {
                                "http2_protocol_options": {
                                    "connection_keepalive": {
                                        "interval": "30s",
                                        "timeout": "10s",
                                    }
                                }
                            },
                        }
                    },
                    "load_assignment": {
                        "cluster_name": XDS_CLUSTER,
                        "endpoints": [
                            {
                                "lb_endpoints": [
                                    {
                                        "endpoint": {
                                            "address": {
                                                "socket_address": {
                                                    "address": host,
                                                    "port_value": port,
                                                }
                                            }
                                        }
                                    }
                                ]
                            }
                        ],
                    },
                }
            ]
        },
        # A node Envoy holds a cluster for every Service port in the mesh, and most carry no
        # traffic from a given node: their traffic stats (`upstream_rq_*`, `upstream_cx_*`,
        # 66 of a cluster's 112) are made when they first do. bench/envoy_scale.py, 10,000
        # Services: 957 -> 753 MB, and Clusters accepted 2-4x sooner (making stats is most of
        # what Envoy does with a new cluster). Istio does the same since 1.24.
        "deferred_stat_options": {"enable_deferred_creation_stats": True},
        "layered_runtime": {
            "layers": [
                {"name": "static", "static_layer": dict(RUNTIME)},
                {"name": "admin", "admin_layer": {}},
            ]
        },
    }
    # Parsing validates every field name; the import above registers the typed extension.
    assert http_protocol_options_pb2.HttpProtocolOptions.DESCRIPTOR is not None
    json_format.ParseDict(config, bootstrap_pb2.Bootstrap())
    return config


def _is_ip(host: str) -> bool:
    import ipaddress

    try:
        ipaddress.ip_address(host)
    except ValueError:
        return False
    return True


def _port(value: str) -> int:
    if not value.isdigit() or int(value) > 65535:
        raise argparse.ArgumentTypeError(f"expected a port from 0 to 65535, got {value!r}")
    return int(value)


def configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--node", required=True, help="node id (the Kubernetes node name)")
    parser.add_argument("--xds", required=True, help="control plane xDS address, HOST:PORT")
    parser.add_argument("--cluster", default="nodemesh", help="Envoy node cluster")
    parser.add_argument(
        "--admin-port", type=_port, default=15000, help="admin port on 127.0.0.1 (0: any free one)"
    )
    parser.add_argument(
        "--sotw", action="store_true", help="state-of-the-world ADS instead of delta"
    )


def run(args: argparse.Namespace) -> int:
    try:
        config = bootstrap(
            args.node,
            args.xds,
            cluster=args.cluster,
            admin_port=args.admin_port,
            delta=not args.sotw,
        )
    except ValueError as exc:
        print(f"nodemesh bootstrap: {exc}", file=sys.stderr)
        return 2
    json.dump(config, sys.stdout, indent=2)
    sys.stdout.write("\n")
    return 0
