"""The backbone registry: names -> Backbone classes, filled from the ``dyntie.backbones`` entry points.

The built-ins (gpt2, bert, vit) are declared as entry points in dyntie's own pyproject.toml, so they take the
same path as a third-party package's backbone. ``register_backbone`` adds one in-process (tests, notebooks).
"""

from __future__ import annotations

import fnmatch
from dataclasses import dataclass
from importlib.metadata import entry_points

from ..errors import UsageError
from .base import Backbone

GROUP = "dyntie.backbones"


@dataclass
class Registered:
    name: str
    cls: type[Backbone]
    source: str  # the distribution that provides it ("dyntie" for the built-ins)


_extra: dict[str, Registered] = {}


def register_backbone(cls: type[Backbone], source: str = "local") -> type[Backbone]:
    """Register a backbone class by its ``name`` (usable as a decorator)."""
    if not cls.name:
        raise UsageError(f"Backbone class {cls.__name__} has no name; set its `name` attribute.")
    _extra[cls.name] = Registered(cls.name, cls, source)
    return cls


def _from_entry_points() -> dict[str, Registered]:
    found: dict[str, Registered] = {}
    for ep in entry_points(group=GROUP):
        cls = ep.load()
        dist = getattr(ep, "dist", None)
        found[ep.name] = Registered(ep.name, cls, dist.name if dist is not None else "unknown")
    return found


def all_backbones() -> dict[str, Registered]:
    return {**_from_entry_points(), **_extra}


def list_backbones(pattern: str = "*") -> list[Registered]:
    return [r for name, r in sorted(all_backbones().items()) if fnmatch.fnmatch(name, pattern)]


def get_backbone(name: str) -> Backbone:
    found = all_backbones()
    if name not in found:
        known = ", ".join(sorted(found)) or "none"
        raise UsageError(f"Unknown backbone {name!r}; known backbones: {known} (`dyntie backbones` lists them).")
    return found[name].cls()
