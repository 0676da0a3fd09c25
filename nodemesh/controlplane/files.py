"""Files mode: every YAML/JSON document under a directory is an input object.

`FilesSource` polls mtimes (no new dependency) and resyncs the store on create, change and
delete. A file that does not parse keeps the objects it had last time it parsed, and its error
is reported (log and `/status`), so a typo never drops the last good config.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import yaml

from nodemesh.controlplane.pipeline import Pipeline
from nodemesh.controlplane.store import KINDS, ObjectKey, Store, key_of

__all__ = ["FilesSource", "load_objects"]

log = logging.getLogger(__name__)
_SUFFIXES = (".yaml", ".yml", ".json")


def load_objects(text: str, where: str) -> tuple[list[dict[str, Any]], list[str]]:
    """Objects from a YAML stream (and `kind: List` items), plus per-document errors."""
    objs: list[dict[str, Any]] = []
    errors: list[str] = []
    try:
        docs = list(yaml.safe_load_all(text))
    except yaml.YAMLError as exc:
        return [], [f"{where}: invalid YAML: {exc}".replace("\n", " ")]
    for i, doc in enumerate(docs):
        if doc is None:
            continue
        items = doc.get("items") if isinstance(doc, dict) and doc.get("kind") == "List" else [doc]
        for item in items or []:
            if not isinstance(item, dict):
                errors.append(f"{where}: document {i + 1} is not a mapping")
                continue
            try:
                key = key_of(item)
            except ValueError as exc:
                errors.append(f"{where}: document {i + 1}: {exc}")
                continue
            want = KINDS.get(key.kind)
            api = str(item.get("apiVersion", ""))
            group = api.rsplit("/", 1)[0] if "/" in api else ""
            if want is None:
                errors.append(f"{where}: {key}: kind {key.kind!r} is not read by nodemesh")
                continue
            if group != want:
                errors.append(
                    f"{where}: {key}: apiVersion {api!r} is not in group {want or 'core'!r}"
                )
                continue
            objs.append(item)
    return objs, errors


class FilesSource:
    def __init__(
        self,
        directory: str | Path,
        store: Store,
        pipeline: Pipeline | None = None,
        *,
        interval: float = 0.2,
    ) -> None:
        self.directory = Path(directory)
        self.store = store
        self.pipeline = pipeline
        self.interval = interval
        self.errors: dict[str, str] = {}
        self._stamps: dict[Path, tuple[int, int]] = {}
        self._last_good: dict[Path, list[dict[str, Any]]] = {}
        self._task: asyncio.Task[None] | None = None

    def scan(self) -> bool:
        """Read the directory if anything changed; returns whether the store changed."""
        paths = sorted(
            p for p in self.directory.rglob("*") if p.suffix in _SUFFIXES and p.is_file()
        ) if self.directory.is_dir() else []  # fmt: skip
        stamps: dict[Path, tuple[int, int]] = {}
        for p in paths:
            try:
                st = p.stat()
            except OSError:
                continue
            stamps[p] = (st.st_mtime_ns, st.st_size)
        if stamps == self._stamps and self._stamps:
            return False
        errors: dict[str, str] = {}
        if not self.directory.is_dir():
            errors[str(self.directory)] = "config directory does not exist"
        seen: dict[ObjectKey, Path] = {}
        objects: list[Mapping[str, Any]] = []
        for p in stamps:
            rel = str(p.relative_to(self.directory))
            if (
                stamps.get(p) == self._stamps.get(p)
                and p in self._last_good
                and rel not in self.errors
            ):
                objs = self._last_good[p]
            else:
                try:
                    text = p.read_text()
                except OSError as exc:
                    errors[rel] = f"cannot read: {exc}"
                    objs = self._last_good.get(p, [])
                else:
                    objs, problems = load_objects(text, rel)
                    if problems and not objs and p in self._last_good:
                        objs = self._last_good[p]  # keep what the file said last time it parsed
                        problems.append(f"{rel}: keeping the objects from its last good version")
                    if problems:
                        errors[rel] = "; ".join(problems)
                    self._last_good[p] = objs
            for obj in objs:
                key = key_of(obj)
                if key in seen:
                    errors.setdefault(rel, f"{rel}: {key} is already defined in {seen[key].name}")
                    continue
                seen[key] = p
                objects.append(obj)
        for p in list(self._last_good):
            if p not in stamps:
                del self._last_good[p]
        self._stamps = stamps
        if errors != self.errors:
            for message in errors.values():
                log.error("%s", message)
        self.errors = errors
        if self.pipeline is not None:
            self.pipeline.set_source_errors("files", errors)
        return self.store.replace_all(objects, kinds=KINDS.keys())

    async def start(self) -> None:
        self.scan()
        self._task = asyncio.create_task(self._run(), name="nodemesh-files")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            try:
                await self._task
            except asyncio.CancelledError:
                pass
            self._task = None

    async def _run(self) -> None:
        while True:
            await asyncio.sleep(self.interval)
            try:
                self.scan()
            except Exception:
                log.exception("scanning %s failed", self.directory)
