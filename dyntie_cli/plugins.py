"""The plugins: backbone names -> ``Backbone`` classes, found through the ``dyntie.backbones`` entry points.

The built-ins (gpt2, glue, vit) are declared as entry points in dyntie's own pyproject.toml, so they take the
same path as a third-party package's backbone. ``register_backbone`` adds one in-process (tests, notebooks).
The contract a backbone implements is ``dyntie_cli.backbone``.
"""

from __future__ import annotations

import fnmatch
from dataclasses import dataclass
from importlib.metadata import entry_points

from .backbone import Backbone
from .errors import DyntieError, UsageError

GROUP = "dyntie.backbones"


@dataclass
class Registered:
    name: str
    cls: type[Backbone] | None  # None when the plugin failed to import
    source: str  # the distribution that provides it ("dyntie" for the built-ins)
    error: str | None = None


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
        dist = getattr(ep, "dist", None)
        source = dist.name if dist is not None else "unknown"
        try:
            found[ep.name] = Registered(ep.name, ep.load(), source)
        except Exception as e:  # noqa: BLE001 -- one broken plugin must not take the other backbones down
            found[ep.name] = Registered(ep.name, None, source, error=f"{type(e).__name__}: {e}")
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
    entry = found[name]
    if entry.cls is None:
        raise DyntieError(f"Backbone {name!r} from package {entry.source} failed to load ({entry.error}); "
                          "reinstall or fix that package.")
    return entry.cls()
