"""`Resource`: one xDS resource, serialized once, with a version that is a hash of its bytes."""

from __future__ import annotations

import hashlib
from collections.abc import Callable

from google.protobuf.message import Message

from nodemesh.xds import _wire
from nodemesh.xds.types import resource_name, type_url_of

__all__ = ["Resource", "content_version"]


def content_version(*parts: bytes) -> str:
    """An opaque version: the first 16 hex digits of a BLAKE2b hash of the given bytes."""
    h = hashlib.blake2b(digest_size=8)
    for part in parts:
        h.update(part)
    return h.hexdigest()


class Resource:
    """An immutable, pre-serialized xDS resource.

    Build it once per version and put the same object in every node's snapshot: its bytes are
    spliced into every response without re-serializing. The wrapped message must not be
    altered after construction.

    >>> from envoy.config.cluster.v3.cluster_pb2 import Cluster
    >>> r = Resource.from_message(Cluster(name="web"))
    >>> r.name, len(r.version)
    ('web', 16)
    """

    __slots__ = (
        "_delta",
        "_sotw",
        "message",
        "name",
        "payload",
        "references",
        "type_url",
        "version",
    )
    # The names of other resources this one needs (a Cluster's EDS name, a Listener's route
    # configurations), for `Snapshot.consistent()`; None until first computed there. A pure
    # function of the bytes, so a Resource shared between snapshots computes it once.
    references: tuple[str, ...] | None
    _sotw: bytes | None
    _delta: bytes | None

    def __init__(self, type_url: str, name: str, message: Message, payload: bytes) -> None:
        self.references = None
        self.type_url = type_url
        self.name = name
        self.message = message
        self.payload = payload
        # content_version(payload), one call shorter (made for every resource of every build)
        self.version = hashlib.blake2b(payload, digest_size=8).hexdigest()
        self._sotw = self._delta = None

    # The resource framed for each protocol, made on first send and kept: a node speaks one
    # of them, so the other is usually never made (a cold build makes 20,000 resources).
    @property
    def sotw_entry(self) -> bytes:
        """This resource as one `DiscoveryResponse.resources` entry (an Any)."""
        entry = self._sotw
        if entry is None:
            entry = self._sotw = _wire.sotw_entry(_wire.any_bytes(self.type_url, self.payload))
        return entry

    @property
    def delta_entry(self) -> bytes:
        """This resource as one `DeltaDiscoveryResponse.resources` entry (name, version, Any)."""
        entry = self._delta
        if entry is None:
            entry = self._delta = _wire.delta_entry(
                self.name, self.version, _wire.any_bytes(self.type_url, self.payload)
            )
        return entry

    @classmethod
    def from_message(
        cls, message: Message, *, name: str | None = None, type_url: str | None = None
    ) -> Resource:
        # deterministic=True: map fields serialize in a stable order, so equal
        # messages hash to equal versions across processes and restarts.
        payload = message.SerializeToString(deterministic=True)
        return cls(
            type_url or type_url_of(message),
            name if name is not None else resource_name(message),
            message,
            payload,
        )

    @classmethod
    def from_payload(
        cls,
        type_url: str,
        name: str,
        payload: bytes,
        decode: Callable[[bytes], Message],
        references: tuple[str, ...] | None = None,
    ) -> Resource:
        """A resource from bytes encoded elsewhere; `message` is `decode(payload)`, made on
        first read. The bytes must be what `SerializeToString(deterministic=True)` gives for
        that message, so that versions match those of `from_message`. `references`, when the
        encoder knows them, spares `Snapshot.consistent()` the decoding."""
        resource = _Encoded(type_url, name, payload, decode)
        resource.references = references
        return resource

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Resource):
            return NotImplemented
        return (self.type_url, self.name, self.payload) == (
            other.type_url,
            other.name,
            other.payload,
        )

    def __hash__(self) -> int:
        return hash((self.type_url, self.name, self.version))

    def __repr__(self) -> str:
        return f"Resource({self.type_url.rsplit('.', 1)[-1]}/{self.name}@{self.version})"


class _Encoded(Resource):
    """A `Resource` whose message is decoded from its payload when first read."""

    __slots__ = ("_decode", "_message")
    _message: Message | None

    def __init__(
        self,
        type_url: str,
        name: str,
        payload: bytes,
        decode: Callable[[bytes], Message],
    ) -> None:
        # Resource.__init__ spelled out: no super() call and no trip through the message
        # setter (made for every encoded resource of every build).
        self._decode = decode
        self._message = None
        self.references = None
        self.type_url = type_url
        self.name = name
        self.payload = payload
        self.version = hashlib.blake2b(payload, digest_size=8).hexdigest()
        self._sotw = self._delta = None

    @property
    def message(self) -> Message:
        message = self._message
        if message is None:
            message = self._decode(self.payload)
            self._message = message
        return message

    @message.setter
    def message(self, value: Message) -> None:
        self._message = value
