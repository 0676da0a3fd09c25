"""Regenerate servicemap_pb2.py/.pyi from servicemap.proto: `python -m nodemesh.api._generate`.

protoc (from grpcio-tools) writes the code, then ruff formats it, so the committed files pass
`make lint` unchanged. A test runs this into a temporary directory and compares.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

__all__ = ["generate"]

_API = Path(__file__).parent
_ROOT = _API.parent.parent
_HEADER = {
    ".py": "# ruff: noqa: E501  (generated from servicemap.proto by nodemesh.api._generate)\n",
    # protoc's stubs use bare Mapping, which strict mypy rejects
    ".pyi": '# mypy: disable-error-code="type-arg"\n',
}


def generate(out_dir: Path) -> list[Path]:
    """Write servicemap_pb2.py and .pyi into `out_dir`; return their paths."""
    from grpc_tools import protoc  # type: ignore[import-untyped]  # dev dependency

    with tempfile.TemporaryDirectory() as tmp:
        args = ["protoc", f"-I{_ROOT}", f"--python_out={tmp}", f"--pyi_out={tmp}"]
        if protoc.main([*args, str(_API / "servicemap.proto")]) != 0:
            raise RuntimeError("protoc failed on servicemap.proto")
        out: list[Path] = []
        for suffix in (".py", ".pyi"):
            src = Path(tmp) / "nodemesh" / "api" / f"servicemap_pb2{suffix}"
            dst = out_dir / src.name
            dst.write_text(_HEADER[suffix] + src.read_text())
            out.append(dst)
    ruff = shutil.which("ruff") or str(Path(sys.executable).parent / "ruff")
    paths = [str(p) for p in out]
    config = ["--config", str(_ROOT / "pyproject.toml")]
    subprocess.run([ruff, "format", "-q", *config, *paths], check=True)
    subprocess.run([ruff, "check", "-q", "--fix", *config, *paths], check=True)
    subprocess.run([ruff, "format", "-q", *config, *paths], check=True)
    return out


if __name__ == "__main__":
    for p in generate(_API):
        print(p)
