"""Every setting of a run, in one typed schema, validated once when it is built.

A run's settings have sections: ``train`` (optimisation and bookkeeping), ``ties`` (the tie manager and the
fixed policies), ``agent`` (the Q-agent) -- shared by every backbone -- and ``model`` and ``data``, whose keys a
backbone declares (its own ``Section`` subclasses). ``RunSettings`` adds the run's identity (backbone, preset,
dataset, variant, seed, device, data folder).

They resolve in one order: the schema's defaults < the backbone's preset < a recipe file < command-line flags
< ``--set key=value``. Each source is a list of ``(dotted key, value)`` pairs applied to a plain tree, which is
validated once at the end (:func:`resolve`): an unknown key, a value of the wrong type or outside its choices or
range is refused with one sentence naming the key and what it accepts, before any data is read.

A field is declared with :func:`setting`: its default, its help text (shown by ``dyntie config show --help``
and in the settings reference), its range, and -- for a field added after runs were first recorded -- the
value that reproduces how such an older run behaved (``legacy``), so a resume or an ablation of it keeps its
policy.
"""

from __future__ import annotations

import copy
import json
import re
import sys
from collections.abc import Iterable, Sequence
from functools import cache
from pathlib import Path
from typing import Any, ClassVar, Literal, get_args

from pydantic import BaseModel, ConfigDict, Field, ValidationError, create_model, field_validator
from pydantic.fields import FieldInfo

from .errors import DyntieError, UsageError
from .variants import NAMES, SPECS, named

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

_NO_LEGACY = object()
#: the registry's INTEGER columns (a step, a decision, a seed) hold 32-bit numbers: the settings that reach them stop
#: there
INT32_MAX = 2**31 - 1
#: the most rows of one batch: far past what any device holds, and refused before data loads, not by a MemoryError
MAX_BATCH = 2**16
#: the widest layer a setting may ask for (a Q-network's, a model's): past it, the allocation fails outright
MAX_WIDTH = 2**16
#: the most transformer blocks (the paper's deepest model has 48): the agent's Q-network scores L(L+1)/2 entries
MAX_BLOCKS = 1024


def setting(default: Any, help: str, *, flag: str | None = None, legacy: Any = _NO_LEGACY,
            **constraints: Any) -> Any:
    """A schema field: ``default``, ``help`` (one line for people), range constraints (``ge``, ``gt``, ``le``,
    ``lt``), ``flag``: the command-line flag that sets it, if any (an error names it), and ``legacy``: the value
    for a run recorded before the field existed."""
    extra = {} if legacy is _NO_LEGACY else {"legacy": legacy}
    if flag is not None:
        extra["flag"] = flag
    return Field(default, description=help, json_schema_extra=extra or None, **constraints)


class Section(BaseModel):
    """A group of settings. Strict: a number is never a bool, a whole number never a fraction, and never infinite
    or NaN; unknown keys are refused. Frozen: settings are validated once and never written to afterwards (a value resolved later makes new
    settings, :func:`revised`). Mapping-style reads (``cfg.data["batch_size"]``) work too, for backbones written
    against dicts."""

    model_config = ConfigDict(extra="forbid", frozen=True, strict=True, protected_namespaces=(), allow_inf_nan=False)

    def __getitem__(self, key: str) -> Any:
        if key not in type(self).model_fields:
            raise KeyError(key)
        return getattr(self, key)

    def get(self, key: str, default: Any = None) -> Any:
        return getattr(self, key) if key in type(self).model_fields else default

    def keys(self) -> list[str]:
        return list(type(self).model_fields)

    @classmethod
    def legacy_values(cls) -> dict[str, Any]:
        """Fields added after runs were first recorded, with the value that reproduces such a run."""
        return {name: f.json_schema_extra["legacy"] for name, f in cls.model_fields.items()
                if isinstance(f.json_schema_extra, dict) and "legacy" in f.json_schema_extra}


# --------------------------------------------------------------------------------------------------
# The shared sections
# --------------------------------------------------------------------------------------------------

Precision = Literal["fp32", "bf16", "fp16"]
TiedGrad = Literal["follow", "sum"]
UntieOptim = Literal["fresh", "copy"]
#: the names of the table of variants (variants.py)
Variant = Literal[NAMES]  # type: ignore[valid-type]
VARIANTS: tuple[str, ...] = get_args(Variant)


ReleaseMemory = Literal["auto", "on", "off"]
#: the trackers ``train.report_to`` may name (results/trackers.py)
REPORT_TO = ("tensorboard", "mlflow")


def tracker_list(value: str) -> list[str]:
    """The trackers a ``report_to`` value names, in order ("none": none), or a ValueError naming the choices."""
    names = [n.strip() for n in value.split(",") if n.strip()]
    if not names or any(n not in ("none", *REPORT_TO) for n in names):
        raise ValueError(f"train.report_to (--set train.report_to=..., export-metrics --to) must be none, "
                         f"{', '.join(REPORT_TO)} or several joined by commas, not {value!r}")
    return list(dict.fromkeys(n for n in names if n != "none"))


#: the optimizers a run can train with (core/optimizers.py: which library, what state each keeps)
Optimizer = Literal["adamw", "adafactor", "adamw8bit", "galore", "apollo"]
#: train.checkpointing: off, every block (all), or every n-th block
Checkpointing = Literal["off", "all"] | int


class TrainSettings(Section):
    """Optimisation and bookkeeping. Defaults suit the CPU presets; presets and recipes override them."""

    max_steps: int = setting(1000, "Training steps.", flag="--max-steps", ge=1, le=INT32_MAX)
    lr: float = setting(1e-3, "Peak learning rate (AdamW).", gt=0)
    min_lr_ratio: float = setting(0.1, "Cosine decay ends at lr x this.", ge=0, le=1)
    warmup_steps: int = setting(100, "Linear warm-up steps.", ge=0)
    weight_decay: float = setting(0.1, "AdamW weight decay of matrices (biases, norms: none).", ge=0)
    beta1: float = setting(0.9, "AdamW beta1.", ge=0, lt=1)
    beta2: float = setting(0.95, "AdamW beta2.", ge=0, lt=1)
    grad_clip: float = setting(1.0, "Gradient-norm clipping (0: off).", ge=0)
    log_every: int = setting(10, "Train metrics and a memory row every N steps.", ge=1)
    eval_every: int = setting(250, "Validation every N steps, and at the end (0: at the end only).", ge=0)
    eval_items: int = setting(0, "Validation budget in tokens or examples (0: the whole split).", ge=0)
    test_items: int = setting(0, "Test budget in tokens or examples (0: the whole split).", ge=0)
    checkpoint_every: int = setting(0, "A checkpoint every N steps (0: at every validation).", ge=0)
    select_best: bool = setting(True, "Score the test split once, at the end, on the model of the best validation "
                                      "figure (the run's headline metric), kept in the run's best/ folder; false: on "
                                      "the last model.", legacy=False)
    patience: int = setting(0, "Early stopping: end the run after this many validations in a row without a better "
                               "validation figure (0: never).", ge=0)
    eval_at_start: bool = setting(False, "Validate once before the first step (logged at step 0): the score of "
                                         "the starting model, such as --init weights.")
    precision: Precision = setting("fp32", "Autocast precision: fp32, bf16 or fp16 (bf16/fp16 for GPUs).")
    flush_every_s: float = setting(10.0, "Registry writes are buffered this many seconds at most.", ge=0)
    registry_wait_s: float = setting(
        600.0, "How long a run waits for a registry another process holds where it must write (its start, its end, "
               "a full buffer of unwritten rows) before it fails, every row kept; other writes wait for a later "
               "flush and training goes on.", ge=0)
    max_bad_steps: int = setting(
        3, "A run stops as diverged at a non-finite training loss, or after this many steps in a row whose gradient "
           "norm is not finite (each such step is skipped: the weights stay as they were).", ge=1, le=INT32_MAX)
    release_memory: ReleaseMemory = setting(
        "auto", "CPU, glibc: hand every freed tensor of 128 KiB or more back to the OS at once, so the process "
                "peak is the live peak (7-10% lower on gpt2-wide-cpu; the main job's steps about 20% slower): on, off, "
                "or auto (on for a run near the machine's memory, docs/memory.md).")
    report_to: str = setting("none", "Trackers that get the run's metrics besides the registry: none, tensorboard, "
                                     "mlflow, or several joined by commas (docs/trackers.md).")
    tracker_dir: str = setting("", "Where the trackers write: TensorBoard under DIR/tensorboard, MLflow's store "
                                   "DIR/mlruns unless MLFLOW_TRACKING_URI is set (empty: the --out folder).")
    checkpointing: Checkpointing = setting(
        "off", "Activation checkpointing: off, all (every block keeps only its input and recomputes the rest in the "
               "backward pass) or N (every N-th block, from block 0); a tied block recomputes with its root's "
               "tensors.")
    optimizer: Optimizer = setting(
        "adamw", "adamw (torch), adafactor (torch: factored second moments; train.lr is its relative step, about "
                 "1e-2), adamw8bit (bitsandbytes: 8-bit moments), galore or apollo (galore-torch, apollo-torch: "
                 "moments of the blocks' matrices in a low-rank projection); all but the torch ones need "
                 "pip install 'dyntie[lowmem]'.")
    low_rank: int = setting(128, "galore, apollo: rank of the projection of the blocks' matrices.", ge=1, le=65_536)
    low_rank_gap: int = setting(200, "galore, apollo: steps between new projections of a matrix.", ge=1,
                               le=INT32_MAX)
    low_rank_scale: float = setting(0.0, "galore, apollo: scale of the projected update (0: the library's "
                                         "default, galore 0.25, apollo 1.0).", ge=0)

    @field_validator("report_to")
    @classmethod
    def _trackers(cls, value: str) -> str:
        return ",".join(tracker_list(value)) or "none"

    @field_validator("checkpointing", mode="before")
    @classmethod
    def _checkpointing_form(cls, value: Any) -> Any:
        if isinstance(value, str) and value.strip().isdigit():
            value = int(value)
        if value in ("off", "all") or (isinstance(value, int) and not isinstance(value, bool) and value >= 1):
            return value
        raise ValueError(f"train.checkpointing must be off, all, or a whole number N >= 1 (every N-th block), "
                         f"not {value!r}")


#: what ``ties.initial_state`` accepts (its meaning: core/policies.py ``initial_tie_state``)
INITIAL_STATE_FORM = re.compile(
    r"auto|all-tied|independent|static-all|final-arch-of:\S+|static-(sequence|cycle|cycle-rev):[1-9]\d*"
    r"|\d+(\s*,\s*\d+)*")
INITIAL_STATE_HELP = ("auto, all-tied, independent, final-arch-of:RUN, static-all, static-sequence:N, "
                      "static-cycle:N, static-cycle-rev:N or a state such as 0,0,2,2")


class TieSettings(Section):
    """The tie manager and the fixed policies."""

    decide_every: int = setting(10, "k: a tie decision every k training steps.", flag="--decide-every", ge=1)
    tied_grad: TiedGrad = setting("follow", "follow: tied blocks get no weight gradient (the paper); sum: "
                                            "every position's gradient is added to its root (ALBERT).",
                                  flag="--tied-grad")
    untie_optim: UntieOptim = setting("fresh", "Optimizer state of an untied block: fresh, or a copy of its "
                                               "source's.")
    independent: int = setting(0, "Independent blocks of a static scheme (0: the source run's mean, else L/4), "
                                  "or grow's target (0: the source run's final count, else agent.max_independent, "
                                  "else L/4).", flag="--independent", ge=0)
    perm_seed: int = setting(0, "Replay: seed of the permutation of block indices.", ge=0, le=INT32_MAX)
    initial_state: str = setting(
        "auto", "Tie state at step 0 of a dynamic or random run: auto (all tied from scratch, independent from "
                "--init weights), all-tied, independent, final-arch-of:RUN, static-all, static-sequence:N, "
                "static-cycle:N, static-cycle-rev:N, or a state such as 0,0,2,2.", flag="--initial-state")

    grow_until: float = setting(0.2, "grow: the share of training by which it has untied its target number of "
                                     "blocks (ties.independent), one block at a steady pace (0: all at the "
                                     "first decision).", ge=0, le=1)

    @field_validator("initial_state")
    @classmethod
    def _initial_state_form(cls, value: str) -> str:
        value = value.strip()
        if not INITIAL_STATE_FORM.fullmatch(value):
            raise ValueError(f"ties.initial_state (--initial-state) must be {INITIAL_STATE_HELP}, not {value!r}")
        return value


Encoding = Literal["normalized", "onehot"]
Explore = Literal["row", "vector"]
EpsilonSchedule = Literal["per-decision", "run"]
KeepScope = Literal["all", "independent"]
KeepTarget = Literal["root", "previous"]
ExploreMoves = Literal["any", "local"]
TdTarget = Literal["max", "greedy"]
Reward = Literal["relative", "neg-log-ppl", "neg-ppl"]
RewardBatch = Literal["interval", "next", "fresh", "heldout"]
AgentPreset = Literal["default", "paper", "lean", "shared", "advantage"]
QNet = Literal["matrix", "shared", "advantage"]


class AgentSettings(Section):
    """The Q-agent. ``preset`` names a starting point (``default``, ``paper``, ``lean``, ``shared``,
    ``advantage``); explicit fields override it. The method page of the docs explains each choice; its agent section
    the shared and advantage networks."""

    preset: AgentPreset = setting("default", "The named agent these settings started from.", flag="--agent")
    hidden: int = setting(128, "Width of the Q-network's two hidden layers.", ge=1, le=MAX_WIDTH)
    lr: float = setting(1e-3, "Adam learning rate of the Q-network.", gt=0)
    gamma: float = setting(0.9, "Discount of the TD target.", ge=0, le=1)
    encoding: Encoding = setting("normalized", "State input: normalized (s[i] / (L-1)) or onehot (lower "
                                               "triangle).")
    progress_input: bool = setting(True, "Feed training progress (0..1) as an extra input.")
    epsilon: float = setting(1.0, "Initial exploration rate.", ge=0, le=1)
    epsilon_min: float = setting(0.02, "Exploration floor.", ge=0, le=1)
    epsilon_decay: float = setting(0.95, "Per-decision decay factor (epsilon_schedule=per-decision).", gt=0,
                                   le=1)
    epsilon_schedule: EpsilonSchedule = setting("run", "per-decision (the paper: x epsilon_decay each "
                                                       "decision) or run (epsilon_min at explore_fraction).")
    explore_fraction: float = setting(0.3, "Share of the run over which epsilon decays (schedule run).", gt=0,
                                      le=1)
    explore: Explore = setting("row", "row: each row explores on its own; vector: the whole action at once.")
    keep_bias: float = setting(0.95, "When a row explores, the chance it keeps its current tie.", ge=0, le=1)
    keep_bonus: float = setting(2.0, "Added to a row's keep entry when acting greedily: it moves only for a "
                                     "clear gain in Q.", ge=0, legacy=0.0)
    keep_trained: bool = setting(True, "The greedy choice never ties an independent block (only exploration "
                                       "or the budget can).", legacy=False)
    keep_scope: KeepScope = setting("all", "Rows keep_bias and keep_bonus protect: all, or only independent "
                                           "blocks.", legacy="all")
    keep_target: KeepTarget = setting("previous", "What keeping means for a tied row: root (point at its "
                                                  "root) or previous (follow the block before: groups stay "
                                                  "consecutive).", legacy="root")
    explore_moves: ExploreMoves = setting("local", "An exploring row that moves: any (uniform over its "
                                                   "choices, the paper) or local (untie, or join the group "
                                                   "before).", legacy="any")
    greedy_scope: ExploreMoves = setting("any", "The entries a row's greedy choice ranges over: any (all of its "
                                                "choices, the paper) or local (keep its tie, untie, or join the "
                                                "group before: the moves exploration makes).", legacy="any")
    rows_per_decision: int = setting(0, "0: every row is re-decided; n: only n random rows.", ge=0)
    replay_size: int = setting(512, "Replay buffer size (1: the newest transition only).", ge=1, le=INT32_MAX)
    batch_size: int = setting(32, "Transitions per Q update.", ge=1, le=MAX_BATCH)
    updates_per_decision: int = setting(8, "Q updates per decision.", ge=1)
    target_sync: int = setting(5, "Decisions between target-network syncs (0: no target network).", ge=0)
    td_target: TdTarget = setting("greedy", "Value of the next state: max (each row's best entry, the paper) "
                                            "or greedy (the entry the agent would choose).", legacy="max")
    td_budget: bool = setting(True, "The greedy TD target applies the max_independent budget as acting "
                                    "does.", legacy=False)
    reward: Reward = setting("relative", "relative (log-PPL against a running reference), neg-log-ppl, or "
                                         "neg-ppl (the paper's -PPL).",
                             flag="--reward")
    reward_batch: RewardBatch = setting("interval", "Batches that score a decision: interval (the k training "
                                                    "batches that follow), next (the first), fresh (one extra "
                                                    "batch, the paper), heldout (a fixed slice carved from the end "
                                                    "of train and never trained on, scored at the end of the "
                                                    "decision's interval: the same tokens every time).",
                                        legacy="fresh")
    reward_probes: list[RewardBatch] = setting(
        [], "Rewards a rewarded policy also scores at every decision without acting on them, recorded as "
            "metrics reward/ppl_<kind> for report --table evidence: a list of interval, next, fresh, heldout "
            "(fresh and heldout cost forward passes; off by default).", legacy=[])
    reward_ema: float = setting(0.9, "Smoothing of the relative reward's running reference.", ge=0, le=1)
    max_independent: int = setting(8, "At most N independent blocks, by masking actions (0: no cap).",
                                   flag="--max-independent", ge=0)
    param_penalty: float = setting(0.0, "Subtracted from the reward times the fraction of independent "
                                        "blocks.", flag="--param-penalty", ge=0)
    use_q: bool = setting(True, "Act on the Q-network. false: the greedy choice of every row keeps its tie and "
                                "only exploration and the budget move rows (the network still trains, so every "
                                "random draw is the default's); the variant q-off sets it.", legacy=True)
    qnet: QNet = setting("matrix", "The Q-network: matrix (the whole state to all L(L+1)/2 entries, one "
                                   "training row per decision), shared (one small network scores each entry "
                                   "from depth-free features, the same weights for every row and any depth; "
                                   "every row regressed toward the target) or advantage (the shared network as "
                                   "a state value plus each entry's advantage over keeping, zero until learned, "
                                   "trained through Q(s, a) as matrix).", legacy="matrix")
    heads: int = setting(6, "qnet=advantage: estimates of Q, each trained on its own bootstrap draw of the "
                            "transitions; the agent acts on their mean advantage less confidence times its "
                            "spread.", ge=1, le=64, legacy=6)
    confidence: float = setting(2.0, "qnet=advantage with heads > 1: standard deviations over the heads a move's "
                                     "mean advantage must clear before a row moves greedily.", ge=0,
                                legacy=1.0)
    prior_scale: float = setting(1.0, "qnet=advantage with heads > 1: scale of the fixed random prior added to "
                                      "(and subtracted from) each pair of heads, their spread where no transition "
                                      "has taught them.", ge=0, legacy=1.0)
    warm_from: str = setting("", "Warm-start the agent from earlier runs' recorded transitions: run ids (or "
                                 "unique prefixes), comma-separated, or all (every finished dynamic run of this "
                                 "backbone in the registry, except runs of the same study); the ids used are "
                                 "recorded in runs.config agent_sources.", flag="--agent-from", legacy="")
    warm_weights: str = setting("", "Start the Q-network from the agent in this run's checkpoint (a run id or "
                                    "unique prefix); a shared network applies at any depth.", flag="--agent-weights",
                                legacy="")
    warm_updates: int = setting(200, "Minibatch updates on the warm_from transitions before the first "
                                     "decision.", ge=0, legacy=200)
    seed: int = setting(0, "The agent's seed (the run's --seed).", ge=0, le=INT32_MAX)

    #: the named starting points; ``default`` is the schema's own defaults
    PRESETS: ClassVar[dict[str, dict[str, Any]]] = {
        "paper": dict(
            hidden=128, lr=1e-3, gamma=0.9, encoding="normalized", progress_input=False, epsilon=1.0,
            epsilon_min=0.1, epsilon_decay=0.95, epsilon_schedule="per-decision", explore="row", keep_bias=0.0,
            keep_bonus=0.0, keep_target="root", explore_moves="any", rows_per_decision=0, replay_size=1,
            batch_size=1, updates_per_decision=1, target_sync=0, reward="neg-ppl", reward_batch="fresh",
            max_independent=0, keep_trained=False, td_target="max",
        ),
        "default": {},
        # the first default: about 3 independent blocks of 48 instead of about 6.6: the most memory and speed
        # saved, at a worse perplexity on the 48-block study (docs/studies.md)
        "lean": dict(keep_bias=0.9, keep_target="root", explore_moves="any", max_independent=0,
                     keep_trained=False, td_target="max"),
        # the default with the shared per-block Q-network, choosing greedily among the local moves with no keep
        # bonus: its entries of a row differ by tenths of a reward unit, so any bonus on the default's scale keeps
        # it from ever acting; the local scope keeps its greedy moves from scattering groups (docs/studies.md)
        "shared": dict(qnet="shared", greedy_scope="local", keep_bonus=0.0),
        # the shared network as a state value and advantages over keeping, in bootstrap heads: untrained it keeps
        # like q-off, and a row moves only where the heads agree the move is better (docs/studies.md)
        "advantage": dict(qnet="advantage", greedy_scope="local", keep_bonus=0.0),
    }

    @field_validator("reward_probes", mode="before")
    @classmethod
    def _probes_from_text(cls, value: Any) -> Any:
        """``fresh,heldout`` as well as ``["fresh", "heldout"]``; each kind once."""
        if isinstance(value, str):
            value = [part.strip() for part in value.split(",") if part.strip()]
        return list(dict.fromkeys(value)) if isinstance(value, list) else value

    def scores(self, kind: str) -> bool:
        """Whether a run of these settings scores reward ``kind`` (acts on it, or probes it)."""
        return self.reward_batch == kind or kind in self.reward_probes

    @classmethod
    def from_preset(cls, preset: str = "default", **overrides: Any) -> AgentSettings:
        """The named agent with ``overrides``; an unknown name or key is refused."""
        if preset not in cls.PRESETS:
            raise UsageError(f"Unknown agent setting {preset!r}; choose one of {', '.join(cls.PRESETS)}.")
        return validated(cls, {**cls.PRESETS[preset], **overrides, "preset": preset}, "agent")


SHARED_SECTIONS: dict[str, type[Section]] = {"train": TrainSettings, "ties": TieSettings, "agent": AgentSettings}
BACKBONE_SECTIONS = ("model", "data")
SECTION_NAMES = (*SHARED_SECTIONS, *BACKBONE_SECTIONS)


class RunSettings(Section):
    """A run's identity and its sections. ``model`` and ``data`` are the backbone's own section types
    (``settings_type(backbone)`` makes the typed class of one backbone)."""

    backbone: str = setting("gpt2", "The backbone (dyntie backbones lists them).")
    preset: str = setting("", "The backbone preset the settings started from.")
    dataset: str = setting("", "Dataset name, GLUE task, or kind:PATH.", flag="--dataset")
    variant: Variant = setting("dynamic", "dynamic, or a baseline: " + ", ".join(VARIANTS[1:]) + ".",
                               flag="--variant")
    seed: int = setting(0, "Random seed (data order, initialisation, agent).", flag="--seed", ge=0, le=INT32_MAX)
    device: str = setting("auto", "cpu, cuda, cuda:N or auto.", flag="--device", pattern=r"^(auto|cpu|cuda(:\d+)?)$")
    data_dir: str | None = setting(None, "Local copy of the dataset (offline use).", flag="--data-dir")
    init: str = setting("", "Start from these weights: a local transformers folder (GPT-2, BERT; a dyntie full "
                            "export too), a timm folder or checkpoint file (ViT), or a GPT-2 or timm hub id when "
                            "the hub is reachable (empty: from scratch).", flag="--init")
    model: Section = Field(default_factory=Section)
    data: Section = Field(default_factory=Section)
    train: TrainSettings = Field(default_factory=TrainSettings)
    ties: TieSettings = Field(default_factory=TieSettings)
    agent: AgentSettings = Field(default_factory=AgentSettings)

    TOP_LEVEL: ClassVar[tuple[str, ...]] = ("backbone", "preset", "dataset", "variant", "seed", "device",
                                            "data_dir", "init")

    def to_dict(self) -> dict[str, Any]:
        """A plain, JSON-ready tree (what the registry stores in ``runs.config``)."""
        return self.model_dump(mode="json")


def _flags() -> dict[str, str]:
    fields = {**RunSettings.model_fields, **{f"{section}.{name}": info for section, cls in SHARED_SECTIONS.items()
                                            for name, info in cls.model_fields.items()}}
    return {key: info.json_schema_extra["flag"] for key, info in fields.items()
            if isinstance(info.json_schema_extra, dict) and "flag" in info.json_schema_extra}


#: the command-line flag of each setting that has one (``train.max_steps``: ``--max-steps``), so an error names
#: what the user typed
FLAG_OF: dict[str, str] = _flags()


# --------------------------------------------------------------------------------------------------
# Typed settings of one backbone
# --------------------------------------------------------------------------------------------------


def _section_from_values(name: str, values: Iterable[dict[str, Any]]) -> type[Section]:
    """A section class for a backbone that declares none: one field per key its presets use, typed by the
    first value given (``None``: any type)."""
    fields: dict[str, Any] = {}
    for preset_values in values:
        for key, value in preset_values.items():
            if key not in fields:
                kind = Any if value is None else float if isinstance(value, float) else type(value)
                fields[key] = (kind, value)
    return create_model(name, __base__=Section, **fields)


@cache
def settings_type(backbone_cls: type) -> type[RunSettings]:
    """``RunSettings`` with ``model`` and ``data`` typed by ``backbone_cls`` (its ``model_settings`` and
    ``data_settings``, or sections inferred from its presets)."""
    presets = getattr(backbone_cls, "presets", {}).values()
    model = getattr(backbone_cls, "model_settings", None) or _section_from_values(
        f"{backbone_cls.__name__}Model", (dict(p.model) for p in presets))
    data = getattr(backbone_cls, "data_settings", None) or _section_from_values(
        f"{backbone_cls.__name__}Data", (dict(p.data) for p in presets))
    return create_model(f"{backbone_cls.__name__}Settings", __base__=RunSettings,
                        model=(model, Field(default_factory=model)), data=(data, Field(default_factory=data)))


def section_fields(cls: type[RunSettings]) -> dict[str, dict[str, FieldInfo]]:
    """Section name -> its fields, for the sections of a typed settings class."""
    return {name: cls.model_fields[name].annotation.model_fields for name in SECTION_NAMES}


# --------------------------------------------------------------------------------------------------
# Resolution: pairs of (dotted key, value) onto a tree, validated once
# --------------------------------------------------------------------------------------------------

Pairs = Sequence[tuple[str, Any]]


def parse_value(raw: str) -> Any:
    """``--set`` values: JSON scalars and lists (3, 1e-3, true, null, [1,2]); anything else is a string."""
    try:
        return json.loads(raw)
    except json.JSONDecodeError:
        return raw


def parse_sets(items: Iterable[str] | None) -> list[tuple[str, Any]]:
    out = []
    for item in items or []:
        key, sep, raw = item.partition("=")
        if not sep or not key.strip():
            raise UsageError(f"--set expects key=value (for example --set train.lr=3e-4), got {item!r}.")
        out.append((key.strip(), parse_value(raw.strip())))
    return out


def _known(fields: Iterable[str]) -> str:
    return ", ".join(sorted(fields))


def _locate(cls: type[RunSettings], key: str) -> tuple[str | None, str]:
    """(section or None for a top-level key, field name) of a dotted or bare key; unknown keys refused."""
    sections = section_fields(cls)
    head, dot, name = key.partition(".")
    if not dot:
        if key in RunSettings.TOP_LEVEL:
            return None, key
        owners = [s for s, fields in sections.items() if key in fields]
        if len(owners) != 1:
            hint = f"it is in {' and '.join(owners)}" if owners else "no section has it"
            raise UsageError(f"Cannot set {key!r}: {hint}; use section.key (sections: {', '.join(SECTION_NAMES)}; "
                             f"top-level keys: {', '.join(RunSettings.TOP_LEVEL)}).")
        return owners[0], key
    if head not in sections:
        raise UsageError(f"Unknown settings section {head!r} in {key!r}; sections: {', '.join(SECTION_NAMES)}.")
    if name not in sections[head]:
        raise UsageError(f"Unknown setting {key}; {head} keys: {_known(sections[head])}.")
    return head, name


def assign(cls: type[RunSettings], tree: dict[str, Any], key: str, value: Any) -> None:
    """Set one dotted key on a plain settings tree. ``agent.preset`` starts the agent section afresh from that
    preset (keeping its seed); every other key sets one field. Values are checked when the tree is validated."""
    section, name = _locate(cls, key)
    if section is None:
        tree[name] = value
        return
    if section == "agent" and name == "preset":
        if value not in AgentSettings.PRESETS:
            raise UsageError(f"Unknown agent setting {value!r}; choose one of {', '.join(AgentSettings.PRESETS)}.")
        seed = tree.get("agent", {}).get("seed", 0)
        tree["agent"] = {**AgentSettings.PRESETS[value], "preset": value, "seed": seed}
        return
    tree.setdefault(section, {})[name] = value


_TYPE_WORDS = {"int_type": "a whole number", "float_type": "a number", "bool_type": "true or false",
               "string_type": "text", "int_from_float": "a whole number", "int_parsing": "a whole number",
               "float_parsing": "a number", "list_type": "a list"}
_BOUNDS = {"greater_than_equal": ("ge", "at least"), "greater_than": ("gt", "greater than"),
           "less_than_equal": ("le", "at most"), "less_than": ("lt", "less than")}


def _sentence(error: dict[str, Any], cls: type[BaseModel], where: str) -> str:
    """One sentence for one pydantic error, naming the key and what it accepts."""
    loc = [str(part) for part in error["loc"]]
    key = ".".join([where, *loc] if where else loc)
    value = error.get("input")
    if key in FLAG_OF:
        key = f"{key} ({FLAG_OF[key]})"
    kind = error["type"]
    if kind == "extra_forbidden":
        owner = cls
        for part in loc[:-1]:
            owner = owner.model_fields[part].annotation
        return f"Unknown setting {key}; known keys here: {_known(owner.model_fields)}."
    if kind == "literal_error":
        choices = error["ctx"]["expected"].replace("'", "")
        return f"{key} must be one of {choices.replace(' or ', ', ')}, not {value!r}."
    if kind in _BOUNDS:
        ctx_key, words = _BOUNDS[kind]
        return f"{key} must be {words} {error['ctx'][ctx_key]}, not {value!r}."
    if kind in _TYPE_WORDS:
        return f"{key} takes {_TYPE_WORDS[kind]}, not {value!r}."
    if kind == "finite_number":
        return f"{key} must be a finite number, not {value!r}."
    if kind == "value_error":  # a field's own check, which words its sentence itself
        return f"{error['ctx']['error']}."
    if kind == "string_pattern_mismatch":
        return f"{key} does not accept {value!r}; see `dyntie config show --help` for its form."
    return f"{key}: {error['msg']} (got {value!r})."


def validated(cls: type[BaseModel], tree: dict[str, Any], where: str = "") -> Any:
    """``cls`` (the run's settings or one section of them, named ``where``) validated from a plain tree, or one
    sentence about its first fault."""
    try:
        return cls.model_validate(tree)
    except ValidationError as e:
        raise UsageError(_sentence(e.errors()[0], cls, where)) from None


def _starts_from_initial_state(variant: Any) -> bool:
    return isinstance(variant, str) and variant in SPECS and SPECS[variant].starts_from_initial_state


def _with_derived(cls: type[RunSettings], tree: dict[str, Any]) -> dict[str, Any]:
    """``tree`` with what follows from the rest of it: the agent draws from the run's seed, and a variant's fixed
    settings win over any other source (q-off: the agent that never acts on its Q-network, recorded as such)."""
    tree = copy.deepcopy(tree)
    tree.setdefault("agent", {})["seed"] = tree.get("seed", RunSettings.model_fields["seed"].default)
    variant = tree.get("variant", RunSettings.model_fields["variant"].default)
    if isinstance(variant, str) and variant in SPECS:
        for key, value in SPECS[variant].fixed:
            assign(cls, tree, key, value)
    return tree


def validate_tree(cls: type[RunSettings], tree: dict[str, Any]) -> RunSettings:
    """The typed settings of a tree, or one sentence about its first fault."""
    settings = validated(cls, _with_derived(cls, tree))
    if settings.ties.initial_state != "auto" and not _starts_from_initial_state(settings.variant):
        starting = named(n for n in VARIANTS if _starts_from_initial_state(n))
        raise UsageError(f"--initial-state applies to the {starting} variants; {settings.variant} holds its own tie "
                         "state from the first step, so drop it.")
    return settings


def revised(settings: RunSettings, pairs: Pairs) -> RunSettings:
    """New settings: ``settings`` with ``pairs`` applied, validated as any settings are. For a value a run resolves
    once it knows more (the full id of the run it starts from, the number of blocks a static scheme settled on)."""
    cls = type(settings)
    tree = settings.to_dict()
    for key, value in pairs:
        assign(cls, tree, key, value)
    return validate_tree(cls, tree)


def resolve(backbone_cls: type, preset: Any, *, dataset: str | None = None,
            sources: Sequence[Pairs] = ()) -> RunSettings:
    """The settings of a new run: the schema's defaults < ``preset`` (a backbone ``Preset``) < what the
    ``--init`` weights fix (their shape and tokenizer: the backbone's ``init_settings``) < each of ``sources``
    in order (recipe pairs, flag pairs, ``--set`` pairs), validated once."""
    cls = settings_type(backbone_cls)
    tree: dict[str, Any] = {
        "backbone": backbone_cls.name, "preset": preset.name, "dataset": dataset or backbone_cls.default_dataset,
        "model": dict(preset.model), "data": dict(preset.data), "train": dict(preset.train),
        "ties": dict(preset.ties), "agent": {},
    }
    init = next((value for pairs in reversed(sources) for key, value in reversed(pairs) if key == "init"), None)
    if isinstance(init, str) and init.strip():
        for key, value in backbone_cls().init_settings(init.strip()).items():
            assign(cls, tree, key, value)
    for pairs in sources:
        for key, value in pairs:
            assign(cls, tree, key, value)
    if isinstance(tree.get("init"), str) and tree["init"].strip() and Path(tree["init"]).expanduser().exists():
        tree["init"] = str(Path(tree["init"]).expanduser().resolve())  # the record works from any folder
    return validate_tree(cls, tree)


def upgrade_saved(saved: dict[str, Any]) -> dict[str, Any]:
    """A config as the registry stored it, brought to today's schema: launch labels dropped, train and agent
    fields added since it was recorded set to the values that reproduce that run."""
    tree = {k: v for k, v in saved.items() if k not in RUN_LABELS}
    model = tree.get("model")
    if isinstance(model, dict) and "init" in model:  # BERT's start weights were model.init before init
        model = dict(model)
        init = model.pop("init")
        tree["model"] = model
        tree.setdefault("init", init)
        if init and _starts_from_initial_state(tree.get("variant", "dynamic")):
            # such runs started all tied, as every dynamic run did before ties.initial_state
            tree["ties"] = {"initial_state": "all-tied", **tree.get("ties", {})}
    tree["train"] = {**TrainSettings.legacy_values(), **tree.get("train", {})}
    agent = tree.get("agent")
    if agent:  # the preset's values, then the legacy values, then what the run saved
        preset = agent.get("preset", "default")
        tree["agent"] = {**AgentSettings.PRESETS.get(preset, {}), **AgentSettings.legacy_values(), **agent}
    else:
        tree["agent"] = {"preset": "default"}
    return tree


def from_saved(backbone_cls: type, saved: dict[str, Any], sources: Sequence[Pairs] = ()) -> RunSettings:
    """A recorded run's settings (``runs.config``), with ``sources`` applied on top (an ablation's or a
    resume's overrides), validated once."""
    cls = settings_type(backbone_cls)
    tree = upgrade_saved(saved)
    for pairs in sources:
        for key, value in pairs:
            assign(cls, tree, key, value)
    return validate_tree(cls, tree)


#: what a run's stored config says besides its settings: the round of a repeated bench, the number of processes,
#: the study it belongs to, how its model was built, the CPU threads it used, what its agent learned from
RUN_LABELS = ("bench", "world_size", "study", "setup", "threads", "agent_sources")


# --------------------------------------------------------------------------------------------------
# Recipes
# --------------------------------------------------------------------------------------------------

_RECIPE_TOP = (*RunSettings.TOP_LEVEL, "meta", *SECTION_NAMES)


def load_recipe(path: str | Path) -> dict[str, Any]:
    """A recipe is a TOML file: top-level backbone/preset/dataset/variant/seed and [train]/[ties]/[agent]/
    [model]/[data] tables of overrides, and a [meta] table (its launch command and expected figure). Packaged
    recipes can be named without a path (``gpt2-cpu``)."""
    p = Path(path)
    if p.exists():
        text = p.read_text()
    else:
        from importlib import resources

        packaged = resources.files("dyntie_cli.recipes") / f"{path}.toml"
        if not packaged.is_file():
            raise DyntieError(f"Recipe {str(path)!r} not found: pass a TOML file path or a packaged recipe name "
                              f"({', '.join(list_recipes())}).")
        text = packaged.read_text()
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        raise DyntieError(f"Recipe {str(path)!r} is not valid TOML ({e}); fix the file.") from None
    unknown = [k for k in data if k not in _RECIPE_TOP]
    if unknown:
        raise UsageError(f"Recipe {str(path)!r} has an unknown key {unknown[0]!r}; recipes hold "
                         f"{', '.join(RunSettings.TOP_LEVEL)}, [meta] and the tables {', '.join(SECTION_NAMES)}.")
    return data


def recipe_pairs(recipe: dict[str, Any]) -> list[tuple[str, Any]]:
    """A recipe's overrides as (dotted key, value) pairs; ``preset`` and ``backbone`` choose, not override."""
    pairs: list[tuple[str, Any]] = []
    for key, value in recipe.items():
        if key in ("meta", "preset", "backbone"):
            continue
        if isinstance(value, dict):
            if key not in SECTION_NAMES:
                raise UsageError(f"A recipe table [{key}] is not a settings section; use {', '.join(SECTION_NAMES)}.")
            if key == "agent" and "preset" in value:  # the named agent first, then its overrides
                pairs.append(("agent.preset", value["preset"]))
            pairs += [(f"{key}.{k}", v) for k, v in value.items() if not (key == "agent" and k == "preset")]
        else:
            pairs.append((key, value))
    return pairs


def list_recipes() -> list[str]:
    from importlib import resources

    return sorted(p.name[:-5] for p in resources.files("dyntie_cli.recipes").iterdir() if p.name.endswith(".toml"))
