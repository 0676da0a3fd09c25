"""Files mode: every YAML/JSON document under a directory is an input object.

`FilesSource` polls file stamps (no new dependency) and resyncs the store on create, change and
delete. A file with a problem keeps the objects of its last clean version, whole, and the
problem is reported (log and `/status`), so a typo never drops the last good config; nor does
a file caught while it is being written (see `FilesSource`).
"""

from __future__ import annotations

import asyncio
import codecs
import json
import logging
import os
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import yaml

from nodemesh.controlplane.pipeline import Pipeline
from nodemesh.controlplane.shapes import shape_problems
from nodemesh.controlplane.store import KINDS, ObjectKey, Store, key_of

__all__ = ["FilesSource", "load_objects"]

log = logging.getLogger(__name__)
_SUFFIXES = (".yaml", ".yml", ".json")
# values YAML aliases may repeat in a file: far beyond what anchors save in real objects,
# and quick to copy (the store copies every object)
_MAX_ALIASED_VALUES = 100_000
# Levels of nesting a document may have. Kubernetes objects have about ten, a CRD's schema a
# few dozen. libyaml's composer recurses in C without a limit: a YAML file of 40,000 levels
# (80 KB) crashed the process, at every restart while it was there; 500 levels (2 KB) raised
# RecursionError, which stopped every scan of the directory.
_MAX_DEPTH = 200


class _KubeLoader(getattr(yaml, "CSafeLoader", yaml.SafeLoader)):  # type: ignore[misc]
    """YAML as kubectl reads it: a date stays a string (`value: 2024-01-01` is a header value,
    not a `datetime.date`). libyaml's parser where PyYAML has it (its wheels do): it reads a
    1 MB file (a ConfigMap's limit) seven times faster than PyYAML's own. A key twice in one
    mapping is an error, as the API server's strict decoding makes it ("already set in map"),
    where YAML keeps the last: a `backendRefs:` pasted twice into a rule would drop the first."""

    def construct_document(self, node: yaml.Node) -> Any:
        # before the constructor flattens merge keys (`<<: *base`), whose keys may be repeated
        _refuse_repeated_keys(node)
        return super().construct_document(node)

    _merged = 0  # pairs merge keys copied in the stream (a loader reads one file)

    def flatten_mapping(self, node: yaml.MappingNode) -> None:
        # Merge keys copy the merged mappings' pairs into each mapping before any value is
        # made, so _MAX_ALIASED_VALUES would count them too late: ten merges of ten merges,
        # eight deep, in 633 bytes, took 80 s and 0.9 GB (and each level ten times more).
        # The pairs are counted here first; a merged mapping is flattened once, then has no
        # merge key left.
        for key, value in node.value:
            if key.tag != "tag:yaml.org,2002:merge":
                continue
            merged = value.value if isinstance(value, yaml.SequenceNode) else [value]
            for sub in merged:
                if isinstance(sub, yaml.MappingNode):
                    self.flatten_mapping(sub)
                    self._merged += len(sub.value)
            if self._merged > _MAX_ALIASED_VALUES:
                raise yaml.constructor.ConstructorError(
                    None,
                    None,
                    f"merge keys (<<) copy more than {_MAX_ALIASED_VALUES} values",
                    key.start_mark,
                )
        super().flatten_mapping(node)


def _refuse_repeated_keys(root: yaml.Node) -> None:
    seen: set[int] = set()  # nodes, once each: aliases share them
    stack = [root]
    while stack:
        node = stack.pop()
        if id(node) in seen or not isinstance(node, yaml.CollectionNode):
            continue
        seen.add(id(node))
        if isinstance(node, yaml.SequenceNode):
            stack.extend(node.value)
            continue
        keys: set[tuple[str, str]] = set()
        for key, value in node.value:
            stack.extend((key, value))
            if not isinstance(key, yaml.ScalarNode) or key.tag == "tag:yaml.org,2002:merge":
                continue
            if (key.tag, key.value) in keys:
                raise yaml.constructor.ConstructorError(
                    "while reading a mapping",
                    node.start_mark,
                    f"found key {key.value!r} a second time",
                    key.start_mark,
                )
            keys.add((key.tag, key.value))


_KubeLoader.yaml_implicit_resolvers = {
    first: [(tag, regexp) for tag, regexp in resolvers if tag != "tag:yaml.org,2002:timestamp"]
    for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()
}
# A number with an exponent and no dot (`percent: 1e-3`) is a float to kubectl's YAML reader
# (go-yaml's pattern, below); YAML 1.1's needs a dot, so PyYAML read a string, and the builder
# refused a policy the API server takes. After the int resolver: `80` stays an int.
for _first in "-+.0123456789":
    _KubeLoader.add_implicit_resolver(
        "tag:yaml.org,2002:float",
        re.compile(r"^[-+]?(\.[0-9]+|[0-9]+(\.[0-9]*)?)([eE][-+]?[0-9]+)?$"),
        [_first],
    )


# For `_may_nest_too_deep`: a line indented by a quarter of _MAX_DEPTH (YAML indents with
# spaces only), a run of an eighth of it of compact sequence entries (`- - - x`; the pattern
# written out: a repeated group is 25 times slower on a 1.6 MB file)
_DEEP_INDENT = " " * (_MAX_DEPTH // 4)
_BREAKS = ("\n", "\r", "\x85", "\u2028", "\u2029")  # YAML 1.1's line breaks, libyaml's too
_LONG_DASHES = re.compile(r"-[ \t]+" * (_MAX_DEPTH // 8))
_SURROGATE_ESCAPE = re.compile(r"\\u[dD][89a-fA-F]")
_SURROGATE = re.compile("[\ud800-\udfff]")


def _may_nest_too_deep(text: str) -> bool:
    """Whether the YAML `text` may nest deeper than _MAX_DEPTH, from scans at C speed: a block
    collection nests only at a deeper indentation (two levels a step: a mapping's value may be
    a sequence at the key's indentation), in compact sequences (`- - x`) and one mapping per
    entry line (`- a: b`); flow collections and complex keys at their indicators. Without a
    deep line or a long run, that is at most 2 * _MAX_DEPTH / 4 + _MAX_DEPTH / 8 + 2 levels,
    plus the indicators."""
    if text.startswith(_DEEP_INDENT) or any(f"{b}{_DEEP_INDENT}" in text for b in _BREAKS):
        return True
    if _LONG_DASHES.search(text):
        return True
    flow = text.count("[") + text.count("{") + text.count("?")
    return _MAX_DEPTH // 2 + _MAX_DEPTH // 8 + 2 + flow > _MAX_DEPTH


def _yaml_depth_problem(text: str) -> str:
    """Why `text` must not be composed ("" if it may): deeper than _MAX_DEPTH, by the C
    parser's events (a loop, no recursion), looked at only if `_may_nest_too_deep`."""
    if not _may_nest_too_deep(text):
        return ""
    depth = 0
    try:
        for event in yaml.parse(text, Loader=_KubeLoader):
            if isinstance(event, yaml.CollectionStartEvent):
                depth += 1
                if depth > _MAX_DEPTH:
                    line = event.start_mark.line + 1 if event.start_mark else 0
                    return f"invalid YAML at line {line}: nested deeper than {_MAX_DEPTH} levels"
            elif isinstance(event, yaml.CollectionEndEvent):
                depth -= 1
    except yaml.YAMLError:
        return ""  # composing reports it, and the documents before it
    return ""


def _replace_lone_surrogates(docs: list[Any]) -> list[Any]:
    """JSON documents with each lone UTF-16 surrogate in a string (`"\\ud83d"`, half an emoji,
    which a cut JavaScript string leaves) replaced by U+FFFD, as the API server's decoder
    does: kept, one made every build fail when it was encoded, holding back every change."""

    def fix(value: Any) -> Any:
        return _SURROGATE.sub("\ufffd", value) if isinstance(value, str) else value

    out = []
    for doc in docs:
        doc = fix(doc)
        stack = [doc]
        while stack:
            item = stack.pop()
            if isinstance(item, dict):
                fixed = {fix(k): fix(v) for k, v in item.items()}
                item.clear()
                item.update(fixed)
                stack.extend(v for v in item.values() if isinstance(v, dict | list))
            elif isinstance(item, list):
                item[:] = [fix(v) for v in item]
                stack.extend(v for v in item if isinstance(v, dict | list))
        out.append(doc)
    return out


def _without_nulls(value: Any) -> Any:
    """`value` without null fields, at any depth: the API server prunes them, so `timeouts: ~`
    is no timeouts, not an empty section."""
    if isinstance(value, dict):
        return {k: _without_nulls(v) for k, v in value.items() if v is not None}
    if isinstance(value, list):
        return [_without_nulls(v) for v in value]
    return value


def _after_space(text: str, i: int) -> int:
    while i < len(text) and text[i] in " \t\r\n":  # JSON's whitespace
        i += 1
    return i


def _object_once(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    """A JSON object whose keys are each there once (the API server's strict decoding)."""
    obj = dict(pairs)
    if len(obj) < len(pairs):
        twice = next(k for i, (k, _) in enumerate(pairs) if k in dict(pairs[:i]))
        raise ValueError(f"found key {twice!r} a second time in an object")
    return obj


def _documents(text: str) -> tuple[list[Any], str]:
    """The documents of a YAML stream, or of a JSON stream where `text` starts with `{` (as
    kubectl tells them apart), and "" or why the stream is not read to its end: then the
    documents are those before the error (kubectl applies those too)."""
    text = text.removeprefix("\ufeff")
    json_problem = ""
    json_docs: list[Any] = []
    if text.lstrip(" \t\r\n").startswith("{"):
        # JSON's own parser: `\ud83d\ude00` (how json.dump writes an emoji) is one character,
        # which YAML reads as two lone surrogates, and objects may follow one another, as
        # `kubectl get -o json` of several names writes them
        decoder = json.JSONDecoder(object_pairs_hook=_object_once)
        i = _after_space(text, 0)
        try:
            while i < len(text):
                doc, i = decoder.raw_decode(text, i)
                json_docs.append(doc)
                i = _after_space(text, i)
        except ValueError as exc:  # (a JSONDecodeError, or _object_once's)
            json_problem = f"invalid JSON: {exc}"
        except RecursionError:
            json_problem = f"invalid JSON: nested deeper than {_MAX_DEPTH} levels"
        # (those before an error are applied too)
        if json_docs and _SURROGATE_ESCAPE.search(text):
            json_docs = _replace_lone_surrogates(json_docs)
        if not json_problem:
            return json_docs, ""
    docs: list[Any] = []
    depth_problem = _yaml_depth_problem(text)
    if depth_problem:
        return json_docs, json_problem or depth_problem
    try:
        # (a `{` that is not JSON may be YAML's flow style: `{kind: Service, ...}`)
        for doc in yaml.load_all(text, Loader=_KubeLoader):  # a SafeLoader
            docs.append(doc)
        return docs, ""
    except yaml.YAMLError as exc:
        if json_problem:
            return json_docs, json_problem
        return docs, _yaml_problem(exc)


def _yaml_problem(exc: yaml.YAMLError) -> str:
    """`exc` on one line, where it is (PyYAML's own text names the file `<unicode string>`)."""
    if isinstance(exc, yaml.MarkedYAMLError) and exc.problem_mark is not None:
        mark = exc.problem_mark
        text = f"invalid YAML at line {mark.line + 1}, column {mark.column + 1}: {exc.problem}"
        if exc.context and exc.context_mark is not None:
            text += f" ({exc.context}, line {exc.context_mark.line + 1})"
        return text
    return f"invalid YAML: {exc}".replace("\n", " ")


def _blank(text: str) -> bool:
    """Whether `text` is empty but for whitespace and document markers: a file being written
    (a shell's `>` truncates it first) looks like that. A file of comments, of other kinds'
    objects (a Deployment) or an empty `kind: List` is not blank: it holds none of nodemesh's
    objects, and that is what it says (its objects once kept, the error said "the file is
    empty" and held an object moved to another file back as a duplicate)."""
    return all(line.strip() in ("", "---", "...") for line in text.splitlines())


def load_objects(text: str, where: str) -> tuple[list[dict[str, Any]], list[str]]:
    """Objects from a YAML or JSON stream (and `kind: List` items), plus per-document errors."""
    objs: list[dict[str, Any]] = []
    errors: list[str] = []
    docs, problem = _documents(text)
    if problem:
        errors.append(f"{where}: {problem}")
    repeated = 0  # values repeated through aliases in the documents taken so far
    for i, doc in enumerate(docs):
        if doc is None:
            continue
        more = _repeated_values(doc)
        if more is None:
            # `a: &x {b: *x}` is valid YAML; no Kubernetes object is (JSON has no references)
            errors.append(f"{where}: document {i + 1} refers to itself through a YAML alias")
            continue
        if more < 0:
            errors.append(f"{where}: document {i + 1} is nested deeper than {_MAX_DEPTH} levels")
            continue
        if repeated + more > _MAX_ALIASED_VALUES:
            before = f", {repeated} more before it" if repeated else ""
            errors.append(
                f"{where}: document {i + 1} repeats {more} values through YAML aliases{before} "
                f"(at most {_MAX_ALIASED_VALUES} in a file)"
            )
            continue
        repeated += more
        doc = _without_nulls(doc)
        items = doc.get("items") if isinstance(doc, dict) and doc.get("kind") == "List" else [doc]
        if items is not None and not isinstance(items, list):
            errors.append(f"{where}: document {i + 1}: a List's items must be a list")
            continue
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
                mistaken = _mistaken_kind(key.kind, group)
                if mistaken:
                    errors.append(f"{where}: {key}: {mistaken}")
                continue  # another controller's object (a Deployment, a Gateway): not ours
            if group != want:
                errors.append(
                    f"{where}: {key}: apiVersion {api!r} is not in group {want or 'core'!r}"
                )
                continue
            shape = shape_problems(item)  # what the API server would check against the CRD
            if shape:
                errors.append(f"{where}: {key}: " + "; ".join(shape))
                continue
            objs.append(item)
    return objs, errors


_OWN_GROUP = "nodemesh.io"
_KINDS_FOLDED = {k.lower(): k for k in KINDS}


def _mistaken_kind(kind: str, group: str) -> str:
    """Why a kind nodemesh does not read looks like a mistake for one it does ("" if it does
    not): any kind of nodemesh's own API group, a kind that differs from one of nodemesh's only
    in case or a plural `s`. Any other kind is another controller's (a Deployment, a Gateway,
    a ConfigMap), which a directory of an application's manifests holds too: skipped."""
    if group == _OWN_GROUP and kind == "AccessPolicy":
        # Read and ignored, a deny policy would allow everything without a word.
        return (
            "kind 'AccessPolicy' is not built yet (it comes with the mesh's identities): "
            "nothing would enforce it, so it is refused"
        )
    if group == _OWN_GROUP:
        own = ", ".join(k for k, g in KINDS.items() if g == _OWN_GROUP)
        return f"kind {kind!r} is not one of {_OWN_GROUP}'s ({own})"
    folded = kind.lower()
    meant = _KINDS_FOLDED.get(folded) or _KINDS_FOLDED.get(folded.removesuffix("s"))
    if meant:
        return f"kind {kind!r} is not read by nodemesh; did you mean {meant!r}?"
    return ""


def _repeated_values(value: Any) -> int | None:
    """How many values YAML aliases repeat in `value`: what expanding it (copying it, as the
    store does) costs beyond the values written; None if it contains itself (copying or
    comparing it would not end), -1 if it nests deeper than _MAX_DEPTH (aliases of aliases
    nest deeper than the text does; so may JSON, whose parser stops at a thousand levels).
    A few hundred bytes of nested anchors repeat billions (a "billion laughs"). Counts each
    shared container once, depth first with the ones on the current path, so nothing is
    expanded."""
    sizes: dict[int, int] = {}  # container id -> values in it, expanded, itself included
    own = 0  # values with every shared container counted once
    on_path: set[int] = set()
    stack: list[tuple[Any, bool]] = [(value, False)]
    while stack:
        item, leaving = stack.pop()
        children = item.values() if isinstance(item, dict) else item
        if leaving:
            on_path.discard(id(item))
            size = 1
            for c in children:
                size += sizes[id(c)] if isinstance(c, dict | list) else 1
                own += 0 if isinstance(c, dict | list) else 1
            sizes[id(item)] = size
            own += 1
            continue
        if not isinstance(item, dict | list) or id(item) in sizes:
            continue
        if id(item) in on_path:
            return None
        on_path.add(id(item))
        if len(on_path) > _MAX_DEPTH:
            return -1
        stack.append((item, True))
        stack.extend((c, False) for c in children if isinstance(c, dict | list))
    return sizes.get(id(value), 1) - (own or 1)


def _text(data: bytes) -> str:
    """A file's text: UTF-8, or UTF-16 after its byte order mark (what Windows PowerShell's `>`
    writes), as kubectl reads files."""
    if data.startswith((codecs.BOM_UTF16_LE, codecs.BOM_UTF16_BE)):
        return data.decode("utf-16")
    return data.decode("utf-8")


Stamp = tuple[int, int, int, int]  # mtime, size, inode, ctime: a rename-in is a new inode


def _config_files(
    directory: Path,
) -> tuple[dict[Path, Path], dict[Path, str], dict[Path, str]]:
    """Every `*.yaml`/`*.yml`/`*.json` file under `directory`, following symlinked directories
    (once each), skipping names that start with "." at any depth (editors' hidden files): its
    path under `directory`, and the path to read it at. Also the directories that could not be
    listed, with why, and the symbolic links to nothing, with their targets.

    A directory with a `..data` symlink is a volume the kubelet writes (a ConfigMap, a Secret,
    a projected volume): its files are read in the directory `..data` links to, whose swap is
    the kubelet's one atomic step. The links to them beside `..data` are made after that swap
    and removed after it, so a poll in between would see an update half done: a key changed
    but the new key an object moved to not there yet."""
    found: dict[Path, Path] = {}
    unlisted: dict[Path, str] = {}
    dangling: dict[Path, str] = {}
    visited: set[str] = set()

    def walk(shown: Path, at: Path) -> None:
        data = at / "..data"
        volume = data.is_symlink() and data.is_dir()
        # (the kubelet removes a volume's old directory right after the swap: one read
        # between resolving `..data` and listing it found no directory, and said so)
        for attempt in range(3 if volume else 1):
            where = Path(os.path.realpath(data)) if volume else at
            try:
                with os.scandir(where) as it:
                    entries = sorted(it, key=lambda e: e.name)
                break
            except FileNotFoundError as exc:
                if attempt < 2 and volume and Path(os.path.realpath(data)) != where:
                    continue  # swapped meanwhile: list the new one
                unlisted[shown] = exc.strerror or str(exc)
                return
            except OSError as exc:
                unlisted[shown] = exc.strerror or str(exc)
                return
        at = where
        real = os.path.realpath(at)
        if real in visited:  # a symlink loop, or the same directory linked twice
            return
        visited.add(real)
        for entry in entries:
            if entry.name.startswith("."):
                continue
            try:
                if entry.is_dir():  # (through a symlink too)
                    walk(shown / entry.name, at / entry.name)
                elif Path(entry.name).suffix in _SUFFIXES and entry.is_file():
                    found[shown / entry.name] = at / entry.name
                elif entry.is_symlink() and not os.path.exists(entry.path):
                    dangling[shown / entry.name] = os.readlink(entry.path)
            except OSError:  # gone since the listing
                continue

    walk(directory, directory)
    return dict(sorted(found.items())), unlisted, dangling


class FilesSource:
    """Polls `directory` every `interval` seconds (`start()`), or when asked (`scan()`).

    What a file contributes, so that no write in progress and no mistake drops config:
    - a file that reads and parses without a problem: its objects;
    - a file with a problem in any document (invalid YAML, a document without a name, an
      unknown kind, bytes that are not UTF-8): the objects of its last clean version, whole,
      and the problem in `/status` and the log (a file that never was clean: its good
      documents);
    - a file that is empty (or only `---`) but had objects: the same, until it has content
      again or is deleted: a file being rewritten in place (`>` in a shell, some editors) is
      empty for a moment, and deleting a file is how its objects go;
    - the polling loop reads a changed file once it stayed the same for one interval (its
      mtime, size, inode and ctime), not while it is being written (so a file replaced at
      every poll is read only once it pauses for one: neither its stamps nor a new inode tell
      a complete file from one being written), and drops a vanished
      file's objects one interval later (it may have been moved, and its new path settles).
      Writing to a temporary name and renaming it in is still the way to change a file at
      once.
    If the directory itself is missing, nothing changes and the error is reported; so for a
    directory, the top one or below, that cannot be listed (permissions, an I/O error), and a
    symbolic link to nothing: the files read from it before keep their objects.
    """

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
        self._stamps: dict[Path, Stamp] = {}  # of the version each file's objects come from
        self._last_good: dict[Path, list[dict[str, Any]]] = {}  # of each file's last clean version
        self._contributes: dict[Path, list[dict[str, Any]]] = {}
        self._task: asyncio.Task[None] | None = None
        self._file_errors: dict[Path, str] = {}
        self._seen_at_last_poll: dict[Path, Stamp] = {}
        # directories the last scan could not list, links to nothing: why
        self._unlisted: dict[Path, str] = {}

    def scan(self, settled_only: bool = False) -> bool:
        """Read the directory if anything changed; returns whether the store changed.
        `settled_only` (the polling loop): read a changed file only if it has not changed since
        the previous call; until then it keeps contributing what it did."""
        if not self.directory.is_dir():
            self._report(
                {
                    str(self.directory): f"config directory {self.directory} does not exist; "
                    "keeping its objects"
                }
            )
            return False
        stamps: dict[Path, Stamp] = {}
        files, cannot_list, dangling = _config_files(self.directory)
        # what is hidden from us, not deleted, and why: the files read there keep their objects
        unlisted = {
            d: f"cannot list the directory: {why}; its files keep their objects"
            for d, why in cannot_list.items()
        }
        for link, target in dangling.items():
            # a volume not mounted, a target moved; a link of another name counts if it was a
            # directory files were read in
            if link.suffix in _SUFFIXES or any(p.is_relative_to(link) for p in self._stamps):
                unlisted[link] = (
                    f"a symbolic link to {target}, which does not exist; "
                    "keeping the objects read through it"
                )
        for p, at in files.items():
            try:
                st = at.stat()
            except OSError:
                continue
            stamps[p] = (st.st_mtime_ns, st.st_size, st.st_ino, st.st_ctime_ns)
        if unlisted:
            hidden = {
                p: stamp
                for p, stamp in self._stamps.items()
                if p not in stamps and any(p.is_relative_to(d) for d in unlisted)
            }
            stamps = dict(sorted({**stamps, **hidden}.items()))
        previous_poll, self._seen_at_last_poll = self._seen_at_last_poll, stamps
        was_unlisted, self._unlisted = self._unlisted, unlisted
        if (
            stamps == self._stamps
            and self._stamps
            and not self._missing_reported
            and unlisted == was_unlisted
        ):
            return False
        gone = [p for p in self._stamps if p not in stamps]
        if settled_only:
            # A file that just vanished may have been moved or renamed, and its new path
            # settles for a poll: it keeps contributing until then, so its objects never go
            # missing for a poll. (A new path is not read at once: it may be half written.)
            gone = [p for p in gone if p not in previous_poll]
        for p in gone:  # deleted: its objects go
            del self._stamps[p]
            self._last_good.pop(p, None)
            self._contributes.pop(p, None)
            self._file_errors.pop(p, None)
        errors: dict[str, str] = {}
        for d, why in unlisted.items():
            where = str(d.relative_to(self.directory)) if d != self.directory else str(d)
            errors[where] = f"{where}: {why}"
        seen: dict[ObjectKey, Path] = {}
        objects: list[Mapping[str, Any]] = []
        vanished = [(p, None) for p in self._stamps if p not in stamps]
        # in path order, vanished files too: of two files defining an object the first path's
        # counts, also while it is kept for a poll
        for p, stamp in sorted([*stamps.items(), *vanished], key=lambda item: item[0]):
            rel = str(p.relative_to(self.directory))
            settling = settled_only and previous_poll.get(p) != stamp
            if stamp is not None and stamp != self._stamps.get(p) and not settling:
                objs, problem = self._read(p, files[p], rel)
                self._stamps[p], self._file_errors[p] = stamp, problem
            else:  # this version was read already, or it may still be being written
                objs = self._contributes.get(p, [])
            if self._file_errors.get(p):  # (after a link's problem, if it is one)
                problem = self._file_errors[p]
                errors[rel] = f"{errors[rel]}; {problem}" if rel in errors else problem
            for obj in objs:
                key = key_of(obj)
                if key in seen:
                    other = seen[key].relative_to(self.directory)
                    # added to the file's other problems, not dropped behind them
                    problem = f"{rel}: {key} is already defined in {other}"
                    errors[rel] = f"{errors[rel]}; {problem}" if rel in errors else problem
                    continue
                seen[key] = p
                objects.append(obj)
        self._report(errors)
        return self.store.replace_all(objects, kinds=KINDS.keys())

    def _read(self, p: Path, at: Path, rel: str) -> tuple[list[dict[str, Any]], str]:
        """What file `p`, read at `at`, contributes now, and its problem ("" if none); see the
        class doc."""
        last = self._last_good.get(p)
        text = ""
        try:
            text = _text(at.read_bytes())
            objs, problems = load_objects(text, rel)
        except OSError as exc:
            objs, problems = [], [f"{rel}: cannot read: {exc.strerror or exc}"]
        except UnicodeDecodeError as exc:
            objs, problems = [], [f"{rel}: not {exc.encoding.upper()} text: {exc}"]
        except RecursionError:  # (load_objects refuses what nests deeper than _MAX_DEPTH)
            objs, problems = [], [f"{rel}: nested too deeply to read"]
        if not problems and not objs and last and _blank(text):
            problems = [f"{rel}: the file is empty"]
        if not problems:
            self._last_good[p] = objs
        elif last is not None:
            problems.append(f"{rel}: keeping the objects from its last good version")
            objs = last
        self._contributes[p] = objs
        return objs, "; ".join(problems)

    @property
    def _missing_reported(self) -> bool:
        return str(self.directory) in self.errors

    def _report(self, errors: dict[str, str]) -> None:
        # each problem once, when it appears or changes, and when it is gone: an ERROR line is
        # what alerts watch for, and one file's new problem is no news about the others
        for where, message in errors.items():
            if self.errors.get(where) != message:
                log.error("%s", message)
        for where in self.errors.keys() - errors.keys():
            log.info("%s: no problem any more", where)
        self.errors = errors
        if self.pipeline is not None:
            self.pipeline.set_source_errors("files", errors)

    async def start(self) -> None:
        await asyncio.to_thread(self.scan)
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
            # In a thread: reading a large file takes a second or more, and this loop serves
            # xDS and /status. (The store and the pipeline take writes from other threads.)
            polling = asyncio.ensure_future(asyncio.to_thread(self._poll))
            try:
                await asyncio.shield(polling)
            except asyncio.CancelledError:
                await asyncio.wait({polling})  # stopped: no store write after `stop()`
                raise

    def _poll(self) -> None:
        try:
            self.scan(settled_only=True)
        except Exception as exc:  # a bug: report it where users look, keep polling
            log.exception("scanning %s failed", self.directory)
            self._report({str(self.directory): f"scanning {self.directory} failed: {exc!r}"})
