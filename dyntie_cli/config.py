"""Run configuration: defaults < backbone preset < recipe file < command-line options < ``--set``.

A run's config has sections. ``train``, ``ties`` and ``agent`` are dataclasses shared by every backbone;
``model`` and ``data`` hold the backbone's own keys (from its preset). ``--set section.key=value`` reaches any
of them; a bare ``key=value`` works when the key names exactly one field.
"""

from __future__ import annotations

import json
import sys
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

from .core.agent import AGENT_FIELDS_BEFORE_THEY_EXISTED, AGENT_PRESETS, AgentConfig, agent_config
from .errors import DyntieError, UsageError

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

VARIANTS = (
    "dynamic", "no-tying", "random", "final-arch", "replay",
    "static-all", "static-sequence", "static-cycle", "static-cycle-rev",
)


@dataclass
class TrainSettings:
    """Optimisation and bookkeeping. Defaults suit the CPU presets; presets and recipes override them."""

    max_steps: int = 1000
    lr: float = 1e-3
    min_lr_ratio: float = 0.1  # cosine decay to lr * min_lr_ratio
    warmup_steps: int = 100
    weight_decay: float = 0.1  # on matrices only; biases, norms and embeddings of size 1-d are not decayed
    beta1: float = 0.9
    beta2: float = 0.95
    grad_clip: float = 1.0
    log_every: int = 10  # train metrics and a memory row every N steps
    eval_every: int = 250  # validation every N steps (and at the end)
    eval_items: int = 0  # validation budget in tokens/examples (0: the whole split)
    test_items: int = 0  # test budget (0: the whole split)
    checkpoint_every: int = 0  # 0: a checkpoint at every validation
    precision: str = "fp32"  # fp32 | bf16 | fp16 (autocast; GPU)
    flush_every_s: float = 10.0  # registry writes are buffered this long at most


@dataclass
class TieSettings:
    decide_every: int = 10  # k: a tie decision every k training steps
    tied_grad: str = "follow"  # follow (paper: tied blocks get no weight gradient) | sum (ALBERT-style)
    untie_optim: str = "fresh"  # optimizer state of an untied block: fresh | copy (from its source)
    independent: int = 0  # static schemes: number of independent blocks (0: from --from-run, else L/4)
    perm_seed: int = 0  # replay: seed of the permutation of block indices


@dataclass
class RunConfig:
    backbone: str
    preset: str
    dataset: str
    variant: str = "dynamic"
    seed: int = 0
    device: str = "auto"
    data_dir: str | None = None
    model: dict[str, Any] = field(default_factory=dict)
    data: dict[str, Any] = field(default_factory=dict)
    train: TrainSettings = field(default_factory=TrainSettings)
    ties: TieSettings = field(default_factory=TieSettings)
    agent: AgentConfig = field(default_factory=AgentConfig)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> RunConfig:
        """A config as saved in the registry. Agent fields added after a run was recorded take the value that
        reproduces how that run behaved (a resume or an ablation of an older run must not switch policy)."""
        d = dict(d)
        for label in RUN_LABELS:  # facts about how the run was launched, not settings to inherit or resume with
            d.pop(label, None)
        train = TrainSettings(**d.pop("train", {}))
        ties = TieSettings(**d.pop("ties", {}))
        saved = d.pop("agent", None)
        agent = agent_config(**({**AGENT_FIELDS_BEFORE_THEY_EXISTED, **saved} if saved else {"preset": "default"}))
        return cls(train=train, ties=ties, agent=agent, **d)


# what a run's stored config says besides its settings: the round of a repeated bench, the number of processes
RUN_LABELS = ("bench", "world_size")
TOP_LEVEL = ("backbone", "preset", "dataset", "variant", "seed", "device", "data_dir")
SECTIONS = {"train": TrainSettings, "ties": TieSettings, "agent": AgentConfig}


def parse_value(raw: str) -> Any:
    """``--set`` values: JSON scalars and lists (3, 1e-3, true, null, [1,2]); anything else is a string."""
    try:
        return json.loads(raw)
    except json.JSONDecodeError:
        return raw


def parse_sets(items: list[str] | None) -> list[tuple[str, Any]]:
    out = []
    for item in items or []:
        key, sep, raw = item.partition("=")
        if not sep or not key.strip():
            raise UsageError(f"--set expects key=value (for example --set train.lr=3e-4), got {item!r}.")
        out.append((key.strip(), parse_value(raw.strip())))
    return out


def _field_types(section: str) -> dict[str, type]:
    return {f.name: f.type for f in fields(SECTIONS[section])}


def _coerce(section: str, key: str, value: Any, current: Any) -> Any:
    if isinstance(value, bool) and not isinstance(current, bool) and isinstance(current, (int, float)):
        raise UsageError(f"{section}.{key} takes a number, not {value!r}.")
    if current is None or isinstance(value, type(current)):
        return value
    if isinstance(current, bool):
        raise UsageError(f"{section}.{key} takes true or false, not {value!r}.")
    if isinstance(current, float) and isinstance(value, int):
        return float(value)
    if isinstance(current, (int, float)):
        raise UsageError(f"{section}.{key} takes a number, not {value!r}.")
    return value if not isinstance(current, str) else str(value)


def apply_set(cfg: RunConfig, key: str, value: Any) -> None:
    """Set one dotted key on ``cfg``; unknown keys and wrong types are usage errors that list the options."""
    section, dot, name = key.partition(".")
    if not dot and section in TOP_LEVEL:
        setattr(cfg, section, value)
        return
    if not dot:  # a bare key: find the one section that has it
        owners = [s for s in SECTIONS if key in _field_types(s)]
        owners += [s for s in ("model", "data") if key in getattr(cfg, s)]
        if len(owners) != 1:
            hint = "it matches several sections" if owners else "no section has it"
            raise UsageError(f"Cannot --set {key!r}: {hint}; use section.key (sections: train, ties, agent, "
                             "model, data).")
        section, name = owners[0], key
    if section in ("model", "data"):
        target: dict = getattr(cfg, section)
        if name not in target:
            known = ", ".join(sorted(target)) or "none"
            raise UsageError(f"Unknown key {section}.{name} for this preset; known {section} keys: {known}.")
        target[name] = _coerce(section, name, value, target[name])
        return
    if section not in SECTIONS:
        raise UsageError(f"Unknown config section {section!r}; use train, ties, agent, model or data.")
    obj = getattr(cfg, section)
    if name not in _field_types(section):
        known = ", ".join(sorted(_field_types(section)))
        raise UsageError(f"Unknown key {section}.{name}; known {section} keys: {known}.")
    if section == "agent" and name == "preset":
        if value not in AGENT_PRESETS:
            raise UsageError(f"Unknown agent setting {value!r}; choose one of {', '.join(AGENT_PRESETS)}.")
        cfg.agent = agent_config(value, seed=cfg.agent.seed)
        return
    setattr(obj, name, _coerce(section, name, value, getattr(obj, name)))


def load_recipe(path: str | Path) -> dict[str, Any]:
    """A recipe is a TOML file: top-level backbone/preset/dataset/variant/seed and [train]/[ties]/[agent]/
    [model]/[data] tables of overrides. Packaged recipes can be named without a path (``gpt2-cpu``)."""
    p = Path(path)
    if not p.exists():
        from importlib import resources

        packaged = resources.files("dyntie_cli.recipes") / f"{path}.toml"
        if not packaged.is_file():
            raise DyntieError(f"Recipe {str(path)!r} not found: pass a TOML file path or a packaged recipe name "
                              f"({', '.join(list_recipes())}).")
        text = packaged.read_text()
    else:
        text = p.read_text()
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        raise DyntieError(f"Recipe {str(path)!r} is not valid TOML ({e}); fix the file.") from None
    return data


def list_recipes() -> list[str]:
    from importlib import resources

    return sorted(p.name[:-5] for p in resources.files("dyntie_cli.recipes").iterdir() if p.name.endswith(".toml"))


def apply_recipe(cfg: RunConfig, recipe: dict[str, Any]) -> None:
    for key, value in recipe.items():
        if key == "meta":
            continue  # launch command and expected figure: documentation only
        if isinstance(value, dict):
            for k, v in value.items():
                apply_set(cfg, f"{key}.{k}", v)
        else:
            apply_set(cfg, key, value)
