"""`nodemesh <command> --help` names the defaults that the docs quote."""

from __future__ import annotations

import argparse
import re

import pytest

from nodemesh.cli import main
from nodemesh.controlplane import cli as controlplane
from nodemesh.controlplane.pipeline import Pipeline
from nodemesh.controlplane.store import Store
from nodemesh.ebpf import cli as agent
from nodemesh.xds.cache import SnapshotCache

# The defaults as README.md and docs/ give them
DEFAULTS = {
    "bootstrap": {"--cluster": "nodemesh", "--admin-port": "15000"},
    "controlplane": {
        "--source": "files",
        "--xds-listen": "127.0.0.1:18000",
        "--http-listen": "127.0.0.1:18080",
        "--outbound-listen": "0.0.0.0:15001",
        "--poll-interval": "0.2",
        "--drain-seconds": "5.0",
        "--cluster-domain": "cluster.local",
        "--lease-name": "nodemesh-controlplane",
        "--status-interval": "1.0",
    },
    "status": {"--controlplane": "http://127.0.0.1:18080"},
    "agent": {
        "--pin-root": "/sys/fs/bpf/nodemesh",
        "--socket-redirect": "auto",
        "--envoy-guard": "on",
        "--metrics-listen": "none",
    },
}


def help_of(
    command: str, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> dict[str, str]:
    """Each option's entry in the help, by option name, on one line."""
    monkeypatch.setenv("COLUMNS", "400")  # argparse wraps at hyphens too
    with pytest.raises(SystemExit) as exited:
        main([command, "--help"])
    assert exited.value.code == 0
    out = capsys.readouterr().out
    entries = re.split(r"\n(?=  -)", out.split("options:", 1)[1])
    return {e.split()[0]: " ".join(e.split()) for e in entries if e.strip().startswith("-")}


@pytest.mark.parametrize("command", sorted(DEFAULTS))
def test_help_names_the_defaults(
    command: str, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    entries = help_of(command, capsys, monkeypatch)
    for option, default in DEFAULTS[command].items():
        assert f"(default: {default})" in entries[option], entries[option]


def test_a_switch_gets_no_default_in_its_help(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    entries = help_of("controlplane", capsys, monkeypatch)
    assert "default" not in entries["--no-leader-election"]
    assert entries["--access-log"].count("default") == 1  # its own "(default: none)"


def test_the_lease_namespace_default_is_told_whole(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """As the operator picks it, and docs/operator.md says: outside a pod there is no service
    account, and the kubeconfig context's namespace is taken."""
    entries = help_of("controlplane", capsys, monkeypatch)
    assert "kubeconfig context's" in entries["--lease-namespace"]
    assert "else 'default'" in entries["--lease-namespace"]


def test_the_command_line_reaches_the_pipeline() -> None:
    """What `nodemesh controlplane` gives its Pipeline: the outbound listener, the Nodes,
    the access log and the cluster domain (as written by a user: normalized)."""
    parser = argparse.ArgumentParser()
    controlplane.configure(parser)
    args = parser.parse_args(
        ["--outbound-listen", "127.0.0.1:15009", "--node-selector", "mesh=on",
         "--access-log", "stdout", "--cluster-domain", "Corp.Example."]
    )  # fmt: skip
    options = controlplane.pipeline_options(args)
    pipeline = Pipeline(Store(), SnapshotCache(), **options)
    assert (pipeline.outbound_address, pipeline.outbound_port) == ("127.0.0.1", 15009)
    assert pipeline.access_log == "stdout" and pipeline.cluster_domain == "corp.example"
    assert pipeline.node_selector is not None
    assert pipeline.node_selector.matches({"mesh": "on"})
    assert not pipeline.node_selector.matches({"mesh": "off"})


@pytest.mark.parametrize("guard", ["on", "off"])
def test_the_agents_envoy_guard_switch_reaches_its_data_plane(guard: str) -> None:
    parser = argparse.ArgumentParser()
    agent.configure(parser)
    args = parser.parse_args(["--cgroup", "/sys/fs/cgroup/mesh", "--envoy-guard", guard])
    programs = {w.program for w in agent.dataplane_of(args).wanted}
    assert ("nm_envoy_guard" in programs) == (guard == "on")
    assert "nm_sock4_connect" in programs
