"""A node Envoy for the tests: an outbound listener that routes by original destination.

Hand-built here; in production the mesh translator produces the same shape from HTTPRoutes.
The Envoy joins the node's envoy cgroup through a wrapper that execs it, so its sockets are
seen by sockops/getsockopt and its own connections are exempt from connect4.
"""

from __future__ import annotations

import stat
from pathlib import Path
from typing import Any

from nodemesh.ebpf.testing import NodeLab
from nodemesh.envoy import EnvoyProcess, find_envoy

OUTBOUND_PORT = 15001


def l7_service_config(
    vip: str, port: int, backends: list[tuple[str, int]], name: str = "web"
) -> dict[str, Any]:
    hcm = {
        "@type": "type.googleapis.com/envoy.extensions.filters.network.http_connection_manager"
        ".v3.HttpConnectionManager",
        "stat_prefix": f"outbound_{name}",
        "route_config": {
            "name": name,
            "virtual_hosts": [
                {
                    "name": name,
                    "domains": ["*"],
                    "routes": [
                        {
                            "match": {"prefix": "/"},
                            "route": {
                                "cluster": name,
                                "retry_policy": {"retry_on": "5xx", "num_retries": 3},
                            },
                            "response_headers_to_add": [
                                {"header": {"key": "x-nodemesh-route", "value": name}}
                            ],
                        }
                    ],
                }
            ],
        },
        "http_filters": [
            {
                "name": "envoy.filters.http.router",
                "typed_config": {
                    "@type": "type.googleapis.com/envoy.extensions.filters.http.router.v3.Router"
                },
            }
        ],
    }
    return {
        "chain": {
            "filter_chain_match": {
                "prefix_ranges": [{"address_prefix": vip, "prefix_len": 32}],
                "destination_port": port,
            },
            "filters": [
                {"name": "envoy.filters.network.http_connection_manager", "typed_config": hcm}
            ],
        },
        "cluster": {
            "name": name,
            "type": "STATIC",
            "connect_timeout": "2s",
            "load_assignment": {
                "cluster_name": name,
                "endpoints": [
                    {
                        "lb_endpoints": [
                            {
                                "endpoint": {
                                    "address": {"socket_address": {"address": a, "port_value": p}}
                                }
                            }
                            for a, p in backends
                        ]
                    }
                ],
            },
        },
    }


def bootstrap(lab: NodeLab, services: list[dict[str, Any]]) -> dict[str, Any]:
    return {
        "node": {"id": f"node-{lab.suffix}", "cluster": "nodemesh"},
        "static_resources": {
            "listeners": [
                {
                    "name": "outbound",
                    "address": {
                        "socket_address": {"address": lab.gateway, "port_value": OUTBOUND_PORT}
                    },
                    "listener_filters": [
                        {
                            "name": "envoy.filters.listener.original_dst",
                            "typed_config": {
                                "@type": "type.googleapis.com/envoy.extensions.filters"
                                ".listener.original_dst.v3.OriginalDst"
                            },
                        }
                    ],
                    "filter_chains": [s["chain"] for s in services],
                }
            ],
            "clusters": [s["cluster"] for s in services],
        },
    }


def start_node_envoy(lab: NodeLab, config: dict[str, Any], tmp: Path) -> EnvoyProcess:
    """Start Envoy inside the node's envoy cgroup; the caller stops it once it is returned
    (one that does not get ready is stopped here: the caller never holds it)."""
    binary = find_envoy()
    assert binary is not None
    wrapper = tmp / "envoy-in-cgroup"
    wrapper.write_text(
        f'#!/bin/sh\necho $$ > "{lab.envoy_cgroup}/cgroup.procs" && exec "{binary}" "$@"\n'
    )
    wrapper.chmod(wrapper.stat().st_mode | stat.S_IXUSR)
    envoy = EnvoyProcess(config, binary=str(wrapper))
    try:
        envoy.start()
        envoy.wait_ready()
        assert envoy.pid is not None
        assert str(envoy.pid) in (lab.envoy_cgroup / "cgroup.procs").read_text().split()
    except BaseException:
        envoy.stop()
        raise
    return envoy
