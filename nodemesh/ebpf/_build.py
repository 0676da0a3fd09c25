"""Compile the BPF objects with clang at run time, cached by a hash of the sources and clang.

The cache lives in $NODEMESH_BPF_CACHE, else ~/.cache/nodemesh/bpf; a rebuild writes to a
temporary file and renames it, so concurrent builders never see a half-written object.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sysconfig
import tempfile
from pathlib import Path

from nodemesh.ebpf.errors import BuildError

__all__ = ["OBJECTS", "PROBE_OBJECT", "SOURCE_DIR", "build_objects"]

SOURCE_DIR = Path(__file__).parent / "bpf"
OBJECTS = ("connect", "sockops", "redir", "sockopt", "backlog", "guard")  # the data plane
PROBE_OBJECT = "probe"  # the kernel probe's program (nodemesh.ebpf.probe)


# -mcpu=v3: atomic fetch-and-add and compare-and-swap (redir.bpf.c, backlog.bpf.c, sockops.bpf.c);
# kernels >= 5.12 run v3 code.
_FLAGS = ("-O2", "-g", "-target", "bpf", "-mcpu=v3", "-Wall", "-Werror")


def _cache_dir() -> Path:
    env = os.environ.get("NODEMESH_BPF_CACHE")
    return Path(env) if env else Path.home() / ".cache" / "nodemesh" / "bpf"


def _include_flags() -> list[str]:
    # <linux/bpf.h> pulls <asm/types.h>, which Debian keeps under the multiarch directory.
    multiarch = sysconfig.get_config_var("MULTIARCH") or "x86_64-linux-gnu"
    return [f"-I/usr/include/{multiarch}", f"-I{SOURCE_DIR}"]


def build_objects(clang: str = "clang", names: tuple[str, ...] = OBJECTS) -> dict[str, Path]:
    """Return {object name: path of the compiled .o} for `names` (the data plane's by
    default), compiling only what is not cached."""
    exe = shutil.which(clang)
    if exe is None:
        raise BuildError(f"{clang} not found: install clang (make setup) to build the BPF programs")
    version = subprocess.run([exe, "--version"], capture_output=True, text=True).stdout
    h = hashlib.blake2b(version.encode() + " ".join(_FLAGS).encode(), digest_size=10)
    for src in sorted(SOURCE_DIR.glob("*.[ch]")):
        h.update(src.name.encode() + b"\0" + src.read_bytes())
    out_dir = _cache_dir() / h.hexdigest()
    out_dir.mkdir(parents=True, exist_ok=True)
    result: dict[str, Path] = {}
    for name in names:
        out = out_dir / f"{name}.bpf.o"
        if not out.exists():
            _compile(exe, SOURCE_DIR / f"{name}.bpf.c", out)
        result[name] = out
    return result


def _compile(exe: str, src: Path, out: Path) -> None:
    fd, tmp = tempfile.mkstemp(dir=out.parent, suffix=".o.tmp")
    os.close(fd)
    cmd = [exe, *_FLAGS, *_include_flags()]
    proc = subprocess.run([*cmd, "-c", str(src), "-o", tmp], capture_output=True, text=True)
    if proc.returncode != 0:
        os.unlink(tmp)
        raise BuildError(f"clang {src.name} failed:\n{proc.stderr.strip()}")
    os.replace(tmp, out)
