"""Envoy accepts the route configuration that weighs an invalid backendRef's share to
`INVALID_BACKEND`, a cluster that does not exist, when it arrives as by RDS."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path
from typing import Any

from google.protobuf import json_format

from nodemesh.xds.translate import ir
from nodemesh.xds.translate.route import INVALID_BACKEND, route_configuration, virtual_host

_HCM = "type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3."
_ROUTER = "type.googleapis.com/envoy.extensions.filters.http.router.v3.Router"


def _bootstrap(validate_clusters: bool) -> dict[str, Any]:
    split = ir.Route("r", backends=(ir.Backend("shop/v1:80", 50),), invalid_weight=50)
    config = route_configuration("outbound", [virtual_host(ir.VirtualHost("v", ("*",), (split,)))])
    rcfg = json_format.MessageToDict(config, preserving_proto_field_name=True)
    # What RDS gives by default; an inline route_config would check its cluster names.
    rcfg["validate_clusters"] = validate_clusters
    hcm = {
        "@type": _HCM + "HttpConnectionManager",
        "stat_prefix": "t",
        "route_config": rcfg,
        "http_filters": [{"name": "router", "typed_config": {"@type": _ROUTER}}],
    }
    return {
        "static_resources": {
            "listeners": [
                {
                    "name": "l",
                    "address": {"socket_address": {"address": "127.0.0.1", "port_value": 10000}},
                    "filter_chains": [{"filters": [{"name": "hcm", "typed_config": hcm}]}],
                }
            ],
            "clusters": [
                {
                    "name": "shop/v1:80",
                    "type": "STATIC",
                    "load_assignment": {"cluster_name": "shop/v1:80"},
                }
            ],
        }
    }


def _validate(envoy: str, path: Path, config: dict[str, Any]) -> subprocess.CompletedProcess[str]:
    path.write_text(json.dumps(config))
    return subprocess.run(
        [envoy, "--mode", "validate", "-c", str(path)], capture_output=True, text=True, check=False
    )


def test_envoy_accepts_a_split_with_an_invalid_share(tmp_path: Path, envoy_binary: str) -> None:
    check = _validate(envoy_binary, tmp_path / "rds.json", _bootstrap(validate_clusters=False))
    assert check.returncode == 0, check.stderr[-2000:]
    # The check is real: asked to, Envoy does look the names up.
    check = _validate(envoy_binary, tmp_path / "checked.json", _bootstrap(validate_clusters=True))
    assert check.returncode != 0 and INVALID_BACKEND in check.stderr
