"""The node agent across a control-plane restart, everything real and in its own process: the
`nodemesh controlplane` command in files mode, the `nodemesh agent` command, the kernel maps.
While the control plane is down the node keeps balancing from its maps; when it is back on the
same address the agent resumes its stream and follows the next change."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from nodemesh.ebpf import NodeMaps
from nodemesh.ebpf.maps import addr_text
from nodemesh.ebpf.testing import NodeLab
from tests.ebpf.conftest import VIP
from tests.ebpf.test_controlplane_feed import NODE, mesh_yaml
from tests.support import free_port


class ControlPlaneProcess:
    """`nodemesh controlplane --source files` on fixed ports, started and stopped by PID."""

    def __init__(self, config_dir: Path, log: Path) -> None:
        self.config_dir, self.log = config_dir, log
        self.xds, self.http = free_port(), free_port()
        self.popen: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        with open(self.log, "ab") as log:
            self.popen = subprocess.Popen(
                [
                    sys.executable, "-m", "nodemesh", "controlplane", "--source", "files",
                    "--config-dir", str(self.config_dir), "--poll-interval", "0.05",
                    "--xds-listen", f"127.0.0.1:{self.xds}",
                    "--http-listen", f"127.0.0.1:{self.http}", "--drain-seconds", "0",
                ],
                stdout=subprocess.DEVNULL,
                stderr=log,
            )  # fmt: skip

    def stop(self) -> None:
        if self.popen is not None and self.popen.poll() is None:
            self.popen.send_signal(signal.SIGTERM)
            try:
                self.popen.wait(10)
            except subprocess.TimeoutExpired:
                self.popen.kill()
                self.popen.wait(5)
        self.popen = None

    def status(self) -> dict[str, Any] | None:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{self.http}/status", timeout=2) as r:
                result: dict[str, Any] = json.load(r)
                return result
        except OSError:
            return None


def until(cond: Callable[[], object], what: str, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.05)


@pytest.fixture
def controlplane(node: NodeLab, tmp_path: Path) -> Iterator[ControlPlaneProcess]:
    config = tmp_path / "mesh"
    config.mkdir()
    (config / "mesh.yaml").write_text(mesh_yaml(node))
    cp = ControlPlaneProcess(config, tmp_path / "controlplane.log")
    try:
        yield cp
    finally:
        cp.stop()


def api_backends(lab: NodeLab) -> set[str]:
    """The backend addresses of the L4 Service api in the kernel map."""
    with NodeMaps(lab.pin_root) as maps:
        svc = maps.services().get((VIP, 80))
    if svc is None:
        return set()
    return {addr_text(b.addr) for b in svc.backends[: svc.n_backends]}


def test_the_agent_keeps_the_node_working_through_a_control_plane_restart_and_resumes(
    node: NodeLab, controlplane: ControlPlaneProcess
) -> None:
    a, b, c = node.pods["a"], node.pods["b"], node.pods["c"]
    c.serve(8080, http=True)
    b.serve(8080, http=True)
    controlplane.start()
    agent = node.spawn(
        [
            sys.executable, "-m", "nodemesh", "agent", "--node", NODE,
            "--controlplane", f"127.0.0.1:{controlplane.xds}", "--cgroup", str(node.cgroup),
            "--envoy-cgroup", str(node.envoy_cgroup), "--pin-root", str(node.pin_root),
        ],
        "agent",
    )  # fmt: skip
    until(lambda: api_backends(node) == {c.ip}, "the agent to program api -> c")
    assert a.tool("get", "--to", f"{VIP}:80", "--path", "/before")["status"] == 200

    controlplane.stop()
    # the control plane is gone: the node goes on balancing from its maps
    for i in range(3):
        reply = a.tool("get", "--to", f"{VIP}:80", "--path", f"/down-{i}")
        assert reply["status"] == 200 and json.loads(reply["body"])["pod"] == "c", reply
    assert agent.popen.poll() is None, agent.stderr()

    # back on the same address, with a change made while it was down: api -> b
    mesh = controlplane.config_dir / "mesh.yaml"
    mesh.write_text(
        mesh.read_text().replace(
            f"endpoints: [{{addresses: [{c.ip}], conditions: {{ready: true}}, nodeName: {NODE}}}]",
            f"endpoints: [{{addresses: [{b.ip}], conditions: {{ready: true}}, nodeName: {NODE}}}]",
        )
    )
    controlplane.start()
    until(lambda: api_backends(node) == {b.ip}, "the agent to resume and program api -> b")
    reply = a.tool("get", "--to", f"{VIP}:80", "--path", "/after")
    assert reply["status"] == 200 and json.loads(reply["body"])["pod"] == "b", reply

    # The agent resumed with the versions it holds (initial_resource_versions): the restarted
    # control plane sent it the one Service that changed, and nothing else.
    def agent_types() -> dict[str, Any] | None:
        status = controlplane.status() or {}
        types: dict[str, Any] = status.get("nodes", {}).get(NODE, {}).get("types", {})
        want = status.get("snapshot", {}).get("MeshService")
        acked = types.get("MeshService", {}).get("version_acked")
        return types if want and acked == want else None

    until(agent_types, "the restarted control plane to see the agent's ACK")
    types = agent_types()
    assert types is not None
    assert types["MeshService"]["resources_sent"] == 1, types  # api; web was not resent
    assert types["NodeServiceMap"]["responses_sent"] == 0, types  # unchanged: nothing sent
    assert agent.popen.poll() is None, agent.stderr()
