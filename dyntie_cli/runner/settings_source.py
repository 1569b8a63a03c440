"""The settings of a new run from what a command gives, as plain values (a preset, a recipe, flag and ``--set``
pairs), and the settings of a recorded run; the dataset checked against the backbone in both."""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any

from ..core.optimizers import check_optimizer
from ..errors import UsageError
from ..plugins import get_backbone
from ..settings import RunSettings, from_saved, load_recipe, recipe_pairs, resolve, revised

Pair = tuple[str, Any]


@dataclass(frozen=True)
class SettingsSource:
    """Where a new run's settings come from besides the backbone's defaults: a preset and a recipe (a file or a
    packaged name), then flag pairs and ``--set`` pairs, (dotted key, value), applied in that order."""

    preset: str | None = None
    recipe: str | None = None
    flags: tuple[Pair, ...] = ()
    sets: tuple[Pair, ...] = ()

    def with_flags(self, *pairs: Pair) -> SettingsSource:
        """These settings with ``pairs`` after the flags (what a command sets from its own options)."""
        return replace(self, flags=(*self.flags, *pairs))


def new_settings(backbone_name: str, source: SettingsSource | None = None, *,
                 expect: str | None = None) -> tuple[Any, RunSettings]:
    """The backbone and the validated settings of a new run. ``expect``: the command the backbone must belong to
    (train or finetune); None accepts any."""
    source = source or SettingsSource()
    backbone = get_backbone(backbone_name)
    if expect is not None and backbone.command != expect:
        raise UsageError(f"Backbone {backbone_name!r} is run with `dyntie {backbone.command} {backbone_name}`, "
                         f"not `dyntie {expect}`.")
    recipe = load_recipe(source.recipe) if source.recipe else {}
    if recipe.get("backbone") not in (None, backbone.name):
        raise UsageError(f"Recipe {source.recipe!r} is for backbone {recipe['backbone']!r}; run it with "
                         f"`dyntie {backbone.command} {recipe['backbone']} --recipe {source.recipe}`.")
    preset_name = source.preset or recipe.get("preset") or backbone.default_preset
    if preset_name not in backbone.presets:
        raise UsageError(f"Unknown preset {preset_name!r} for {backbone.name}; presets: "
                         f"{', '.join(backbone.presets)}.")
    settings = resolve(type(backbone), backbone.presets[preset_name],
                       sources=[recipe_pairs(recipe), list(source.flags), list(source.sets)])
    check_optimizer(settings)  # a library that is not installed is refused before any data loads
    return backbone, checked_dataset(settings, backbone)


def recorded_settings(config: dict[str, Any], sources: list[list[Pair]]) -> tuple[Any, RunSettings]:
    """The backbone and settings of a recorded run's config with ``sources`` applied on top."""
    backbone = get_backbone(config["backbone"])
    return backbone, checked_dataset(from_saved(type(backbone), config, sources), backbone)


def checked_dataset(settings: RunSettings, backbone) -> RunSettings:
    """The dataset must be one the backbone knows; names match loosely (RTE, sst-2, WikiText_103) and are
    stored in their canonical spelling (the settings returned have it)."""
    known = backbone.datasets
    if any(d.endswith(":PATH") and settings.dataset.startswith(d[: -len("PATH")]) for d in known):
        return settings
    canonical = {_loose(d): d for d in known}
    if _loose(settings.dataset) not in canonical:
        raise UsageError(f"Unknown dataset {settings.dataset!r} for {backbone.name}; choose one of "
                         f"{', '.join(known)}.")
    name = canonical[_loose(settings.dataset)]
    return settings if name == settings.dataset else revised(settings, [("dataset", name)])


def _loose(name: str) -> str:
    return name.lower().replace("-", "").replace("_", "")
