"""A faster `__init__` for frozen, slotted dataclasses that are made in bulk (the mesh IR and the
build's per-Service models)."""

from __future__ import annotations

from dataclasses import MISSING, fields
from typing import Any, TypeVar

__all__ = ["fast_init"]

_T = TypeVar("_T")


def fast_init(cls: type[_T]) -> type[_T]:
    """Give a frozen, slotted dataclass an `__init__` that stores each field through its slot's
    descriptor: the generated one goes through `object.__setattr__` per field (frozen), which
    costs about twice as much, and a build makes some of them 10,000s of times. Same parameters
    and defaults; instances stay frozen (assignment still raises)."""
    params, lines, env = [], [], {}
    for f in fields(cls):  # type: ignore[arg-type]
        assert f.init and f.default_factory is MISSING and not hasattr(cls, "__post_init__")
        env[f"_set_{f.name}"] = getattr(cls, f.name).__set__
        if f.default is MISSING:
            params.append(f.name)
        else:
            env[f"_default_{f.name}"] = f.default
            params.append(f"{f.name}=_default_{f.name}")
        lines.append(f"\n    _set_{f.name}(self, {f.name})")
    exec(f"def __init__(self, {', '.join(params)}):{''.join(lines)}", env)  # as dataclass does
    init: Any = env["__init__"]
    init.__qualname__ = f"{cls.__qualname__}.__init__"
    cls.__init__ = init  # type: ignore[method-assign]
    return cls
