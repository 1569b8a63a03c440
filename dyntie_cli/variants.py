"""The variants a run can train, in one table: what each one needs, starts from, fixes and resolves.

A variant's policy is built by the factory registered under its name in core/policies.py. Everything else that
treats variants differently reads this table: the settings schema (the ``variant`` choices, what a variant fixes,
which variants take ``ties.initial_state``), ``dyntie ablate``, ``dyntie study``, ``dyntie bench``, the Python API,
the runner (which variants have an agent) and the memory plan. Adding a variant is one entry here, its factory
and its test.

No torch here: the settings schema imports this module.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

#: a run's settings (``settings.RunSettings``, not imported: the settings import this module)
RunSettings = Any
#: the variant the others are measured against and taken from: a study trains it first for each seed, and the
#: variants that need a source run take theirs from a run of it
METHOD = "dynamic"
#: conventional training, the baseline of `dyntie bench`'s ratios
BASELINE = "no-tying"
#: the dynamic run again, in a bench in turns: the variants made from the dynamic run need its end, so they train
#: in a later set of turns, beside this second run of it, and their speed is compared through it
RERUN = f"{METHOD} (rerun)"

#: the most blocks a variant can have independent at once for a run of ``blocks`` blocks, and why (memory plan)
Bound = Callable[[RunSettings, int], tuple[int, str]]


def _every_block(cfg: RunSettings, blocks: int) -> tuple[int, str]:
    return blocks, "every block independent"


def _budget(cfg: RunSettings, blocks: int, cap: int | None = None) -> tuple[int, str]:
    cap = cfg.agent.max_independent if cap is None else cap
    if cap:
        return min(blocks, cap), f"the budget (--max-independent {cap})"
    return blocks, "no budget (--max-independent 0): it may untie every block"


def _no_budget(cfg: RunSettings, blocks: int) -> tuple[int, str]:
    return _budget(cfg, blocks, cap=0)


def _grow_target(cfg: RunSettings, blocks: int) -> tuple[int, str]:
    if cfg.ties.independent:
        return min(blocks, cfg.ties.independent), "the grow target (ties.independent)"
    return _budget(cfg, blocks)


def _scheme(cfg: RunSettings, blocks: int) -> tuple[int, str]:
    return min(blocks, cfg.ties.independent or max(1, blocks // 4)), "the scheme's independent blocks"


def _one_block(cfg: RunSettings, blocks: int) -> tuple[int, str]:
    return 1, "the scheme's independent blocks"


def _source_schedule(cfg: RunSettings, blocks: int) -> tuple[int, str]:
    return blocks, "a schedule from another run: planned at every block independent"


def _independent(state: list[int]) -> int:
    return sum(root == i for i, root in enumerate(state))


def source_mean_count(source: dict[str, Any]) -> int:
    """The source run's mean number of independent blocks, rounded half up (2.5 on average is matched by 3, not by
    Python's banker's 2), at least one and at most every block."""
    return min(len(source["final_state"]), max(1, int(source["mean_independent"] + 0.5)))


def source_final_count(source: dict[str, Any]) -> int:
    """The number of independent blocks the source run ended with."""
    return _independent(source["final_state"])


@dataclass(frozen=True)
class VariantSpec:
    """What one variant is, for every part of dyntie that treats variants differently."""

    name: str
    #: its tie states come from another run (``--from-run``): a fixed final state, a replayed schedule
    needs_source: bool = False
    #: its policy starts from ``ties.initial_state``; the others hold their own state from the first step
    starts_from_initial_state: bool = False
    #: its policy is the Q-agent (and so can start from earlier runs' knowledge, ``agent.warm_from``)
    has_agent: bool = False
    #: it ties blocks at all (conventional training does not)
    ties: bool = True
    #: ``--independent`` (``ties.independent``) sets its number of independent blocks
    takes_independent: bool = False
    #: the number of independent blocks it takes from a source run when ``--independent`` does not give one
    count_from_source: Callable[[dict[str, Any]], int] | None = None
    #: settings the variant fixes, whatever else a run asks for (recorded with the run)
    fixed: tuple[tuple[str, Any], ...] = ()
    #: trained by `dyntie study` when ``--variants`` is not given
    in_default_study: bool = False
    #: the most blocks it can have independent at once (the memory plan)
    most_independent: Bound = _source_schedule

    def fixed_in(self, section: str) -> dict[str, Any]:
        """The settings it fixes in one section (``agent``), by field name."""
        return {key.split(".", 1)[1]: value for key, value in self.fixed if key.startswith(f"{section}.")}

    def reads_source(self, independent_given: bool) -> bool:
        """Whether a run of it is trained from a source run's tie history."""
        return self.needs_source or (self.count_from_source is not None and not independent_given)


def _static(name: str, bound: Bound = _scheme, *, matched: bool = True) -> VariantSpec:
    """A static scheme of the literature: one fixed layout of ``ties.independent`` groups for the whole run."""
    return VariantSpec(name, takes_independent=True, count_from_source=source_mean_count if matched else None,
                       most_independent=bound)


#: every variant, in the order the settings list them and reports sort them
SPECS: dict[str, VariantSpec] = {spec.name: spec for spec in (
    VariantSpec("dynamic", starts_from_initial_state=True, has_agent=True, in_default_study=True,
                most_independent=_budget),
    VariantSpec("no-tying", ties=False, in_default_study=True, most_independent=_every_block),
    VariantSpec("random", starts_from_initial_state=True, in_default_study=True, most_independent=_no_budget),
    VariantSpec("final-arch", needs_source=True, in_default_study=True),
    VariantSpec("replay", needs_source=True, in_default_study=True),
    _static("static-all", _one_block, matched=False),  # all shared: exactly one group, nothing to match
    _static("static-sequence"),
    _static("static-cycle"),
    _static("static-cycle-rev"),
    VariantSpec("grow", takes_independent=True, count_from_source=source_final_count, in_default_study=True,
                most_independent=_grow_target),
    VariantSpec("q-off", has_agent=True, fixed=(("agent.use_q", False),), in_default_study=True,
                most_independent=_budget),
)}

NAMES: tuple[str, ...] = tuple(SPECS)
#: what `dyntie ablate --variant` accepts: every variant but the method, those that need a source run first
ABLATIONS: tuple[str, ...] = tuple(sorted((n for n in NAMES if n != METHOD), key=lambda n: not SPECS[n].needs_source))
#: what `dyntie study` trains unless ``--variants`` says otherwise
DEFAULT_STUDY: tuple[str, ...] = tuple(n for n in NAMES if SPECS[n].in_default_study)


#: the memory savers a bench variant can add to a variant, each the settings it sets (``dyntie bench --variants
#: no-tying+checkpointing,dynamic+checkpointing+adamw8bit``): a saver is a setting any run can take, named here once
#: so a comparison of tying with and against it is one word. adafactor's step is relative (torch's default 1e-2);
#: galore's projected update gets AdamW's step size (scale 1) at the run's learning rate
SAVERS: dict[str, tuple[tuple[str, Any], ...]] = {
    "checkpointing": (("train.checkpointing", "all"),),
    "adamw8bit": (("train.optimizer", "adamw8bit"),),
    "adafactor": (("train.optimizer", "adafactor"), ("train.lr", 1e-2)),
    "galore": (("train.optimizer", "galore"), ("train.low_rank_scale", 1.0)),
    "apollo": (("train.optimizer", "apollo"),),
}


def with_savers(name: str) -> tuple[str, tuple[tuple[str, Any], ...]]:
    """A bench variant ``variant+saver+...`` as its variant and the settings its savers set, in order; a name the
    table does not know raises ValueError with the sentence to show."""
    variant, *savers = [part.strip() for part in name.split("+")]
    if variant not in SPECS:
        raise ValueError(f"Unknown variant {variant!r} in {name!r}; variants: {', '.join(NAMES)}.")
    unknown = [s for s in savers if s not in SAVERS]
    if unknown:
        raise ValueError(f"Unknown memory saver {unknown[0]!r} in {name!r}; add any of {', '.join(SAVERS)} to a "
                         "variant with + (dynamic+checkpointing+adamw8bit).")
    if savers and SPECS[variant].needs_source:
        raise ValueError(f"{variant} takes its settings from its source run; add savers to the run it comes from "
                         f"instead of {name!r}.")
    return variant, tuple(pair for s in savers for pair in SAVERS[s])


def spec(name: str) -> VariantSpec:
    """The table entry of ``name``; a name the table does not know (a variant recorded by another version) gets the
    defaults: a schedule from elsewhere, planned at every block independent."""
    return SPECS.get(name) or VariantSpec(name)


def named(names: Iterable[str]) -> str:
    """Variants in words for a sentence, the static schemes as one family when all of them are there:
    'the static-* variants and grow'."""
    names = list(names)
    statics = [n for n in NAMES if n.startswith("static-")]
    if statics and all(n in names for n in statics):
        names = ["the static-* variants", *(n for n in names if n not in statics)]
    return names[0] if len(names) == 1 else f"{', '.join(names[:-1])} and {names[-1]}"
