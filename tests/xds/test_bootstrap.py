"""`nodemesh bootstrap` prints a config that Envoy itself accepts."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from tests.support import need


def cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "nodemesh", "bootstrap", *args],
        capture_output=True,
        text=True,
        check=False,
    )


@pytest.mark.parametrize("flags,api_type", [((), "DELTA_GRPC"), (("--sotw",), "GRPC")])
def test_bootstrap_is_valid_for_envoy(
    tmp_path: Path, envoy_binary: str, flags: tuple[str, ...], api_type: str
) -> None:
    out = cli("--node", "worker-1", "--xds", "10.0.0.5:18000", "--admin-port", "15900", *flags)
    assert out.returncode == 0, out.stderr
    config = json.loads(out.stdout)
    assert config["node"] == {"id": "worker-1", "cluster": "nodemesh"}
    assert config["dynamic_resources"]["ads_config"]["api_type"] == api_type
    assert config["admin"]["address"]["socket_address"] == {
        "address": "127.0.0.1",
        "port_value": 15900,
    }
    path = tmp_path / "bootstrap.json"
    path.write_text(out.stdout)
    need(Path(envoy_binary).exists(), "envoy binary")
    check = subprocess.run(
        [envoy_binary, "--mode", "validate", "-c", str(path)],
        capture_output=True,
        text=True,
        check=False,
    )
    assert check.returncode == 0, check.stderr[-2000:]


def test_bootstrap_rejects_a_malformed_address() -> None:
    out = cli("--node", "n", "--xds", "no-port-here")
    assert out.returncode == 2
    assert "expected HOST:PORT" in out.stderr
