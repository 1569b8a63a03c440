"""From command-line options to a finished run: config resolution, the registry writer, the progress bar.

Shared by ``train``, ``finetune``, ``ablate`` and ``bench``; the training itself is ``core.loop.Trainer``.
"""

from __future__ import annotations

import json
import math
import os
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

from .backbones.registry import get_backbone
from .config import VARIANTS, RunConfig, apply_recipe, apply_set, load_recipe, parse_sets
from .core.agent import agent_config, validate_agent_config
from .core.distributed import Group
from .core.loop import RunResult, Trainer, resolve_device
from .errors import UsageError
from .registry.db import resolve_db_path
from .registry.writer import RankWriter, RunWriter

err_console = Console(stderr=True)


@dataclass
class RunOptions:
    """The options every command that trains accepts (DESIGN.md section 6)."""

    backbone: str
    dataset: str | None = None
    preset: str | None = None
    recipe: str | None = None
    sets: list[str] = field(default_factory=list)
    db: str | None = None
    out: str | None = None
    seed: int | None = None
    device: str | None = None
    max_steps: int | None = None
    decide_every: int | None = None
    variant: str | None = None
    agent: str | None = None
    reward: str | None = None
    max_independent: int | None = None
    param_penalty: float | None = None
    tied_grad: str | None = None
    data_dir: str | None = None
    quiet: bool = False


def build_config(opts: RunOptions, *, expect: str | None = None) -> tuple[Any, RunConfig]:
    """``expect``: the command the backbone must belong to (train or finetune); None accepts any."""
    backbone = get_backbone(opts.backbone)
    if expect is not None and backbone.command != expect:
        command = expect
        raise UsageError(f"Backbone {opts.backbone!r} is run with `dyntie {backbone.command} {opts.backbone}`, "
                         f"not `dyntie {command}`.")
    recipe = load_recipe(opts.recipe) if opts.recipe else {}
    preset_name = opts.preset or recipe.get("preset") or backbone.default_preset
    if preset_name not in backbone.presets:
        raise UsageError(f"Unknown preset {preset_name!r} for {backbone.name}; presets: "
                         f"{', '.join(backbone.presets)}.")
    preset = backbone.presets[preset_name]
    cfg = RunConfig(backbone=backbone.name, preset=preset_name, dataset=backbone.default_dataset,
                    model=dict(preset.model), data=dict(preset.data), agent=agent_config("default"))
    for section in ("train", "ties"):
        for k, v in getattr(preset, section).items():
            apply_set(cfg, f"{section}.{k}", v)
    apply_recipe(cfg, {k: v for k, v in recipe.items() if k != "preset"})
    cli = {
        "dataset": opts.dataset, "seed": opts.seed, "device": opts.device, "variant": opts.variant,
        "data_dir": opts.data_dir, "train.max_steps": opts.max_steps, "ties.decide_every": opts.decide_every,
        "ties.tied_grad": opts.tied_grad, "agent.reward": opts.reward, "agent.max_independent": opts.max_independent,
        "agent.param_penalty": opts.param_penalty,
    }
    if opts.agent:
        apply_set(cfg, "agent.preset", opts.agent)
    for k, v in cli.items():
        if v is not None:
            apply_set(cfg, k, v)
    for k, v in parse_sets(opts.sets):
        apply_set(cfg, k, v)
    cfg.agent.seed = cfg.seed
    validate_config(cfg, backbone)
    return backbone, cfg


def validate_config(cfg: RunConfig, backbone) -> None:
    if cfg.variant not in VARIANTS:
        raise UsageError(f"Unknown variant {cfg.variant!r}; choose one of {', '.join(VARIANTS)}.")
    if cfg.train.max_steps < 1:
        raise UsageError("--max-steps must be a positive number of training steps.")
    if cfg.ties.decide_every < 1:
        raise UsageError("--decide-every must be a positive number of steps.")
    if cfg.ties.tied_grad not in ("follow", "sum"):
        raise UsageError(f"--tied-grad must be follow or sum, not {cfg.ties.tied_grad!r}.")
    validate_agent_config(cfg.agent)
    known = backbone.datasets
    if any(d.endswith(":PATH") and cfg.dataset.startswith(d[: -len("PATH")]) for d in known):
        return
    # names are matched loosely (RTE, sst-2, WikiText_103) and stored in their canonical spelling
    canonical = {_loose(d): d for d in known}
    if _loose(cfg.dataset) not in canonical:
        raise UsageError(f"Unknown dataset {cfg.dataset!r} for {backbone.name}; choose one of {', '.join(known)}.")
    cfg.dataset = canonical[_loose(cfg.dataset)]


def _loose(name: str) -> str:
    return name.lower().replace("-", "").replace("_", "")


def default_out_dir(out: str | None) -> Path:
    return Path(out or os.environ.get("DYNTIE_OUT", "runs"))


class ProgressView:
    """A Rich progress bar on stderr (step, loss, ppl, independent blocks, memory, ETA); silent when stderr
    is not a terminal or --quiet, in which case a line per validation goes to stderr unless --quiet."""

    def __init__(self, quiet: bool) -> None:
        self.quiet = quiet
        self.live = not quiet and err_console.is_terminal
        self.progress: Progress | None = None
        self.task = None

    def __call__(self, e: dict[str, Any]) -> None:
        kind = e["type"]
        if kind == "start":
            if not self.quiet:
                err_console.print(f"run [bold]{e['run_id']}[/] - {e['blocks']} blocks - data: {e['source']}")
            if self.live:
                self.progress = Progress(
                    TextColumn("step {task.completed}/{task.total}"), BarColumn(),
                    TextColumn("{task.fields[info]}"), TimeElapsedColumn(), TextColumn("ETA"),
                    TimeRemainingColumn(), console=err_console, transient=False,
                )
                self.progress.start()
                self.task = self.progress.add_task("train", total=e["total"], completed=e["step"], info="")
        elif kind == "log" and self.progress is not None:
            info = (f"loss {e['loss']:.3f} ppl {e['ppl']:.1f} indep {e['independent']}/{e['blocks']} "
                    f"mem {e['peak_bytes'] / 2**20:.0f} MiB")
            self.progress.update(self.task, completed=e["step"], info=info)
        elif kind == "eval" and not self.quiet:
            shown = " ".join(f"{k} {v:.4g}" for k, v in e["metrics"].items())
            err_console.print(f"step {e['step']}: validation {shown}")
        elif kind == "end":
            self.close()

    def close(self) -> None:
        if self.progress is not None:
            self.progress.stop()
            self.progress = None


def parse_bench_round(text: str | None) -> dict[str, Any] | None:
    if not text:
        return None
    group, _, rest = text.partition(":")
    round_, _, rounds = rest.partition(":")
    try:
        return {"group": group, "round": int(round_), "rounds": int(rounds)}
    except ValueError:
        raise UsageError(f"--bench-round expects GROUP:ROUND:ROUNDS, got {text!r}.") from None


def run_training(opts: RunOptions, *, record_as: str, expect: str | None = None,
                 source: dict[str, Any] | None = None, parent_run_id: str | None = None,
                 cfg_override: RunConfig | None = None, backbone=None, bench_round: str | None = None) -> RunResult:
    """Train; the run is recorded in the registry with command ``record_as`` (train, finetune, ablate,
    bench). ``expect`` checks the backbone belongs to that command (``train gpt2``, ``finetune glue``).
    ``bench_round``: ``GROUP:ROUND:ROUNDS``, set by `dyntie bench --repeat`; kept in the run's config."""
    if cfg_override is None:
        backbone, cfg = build_config(opts, expect=expect)
    else:
        cfg = cfg_override
    db = resolve_db_path(opts.db)
    return _run_trainer(backbone, cfg, opts.quiet,
                        lambda: RunWriter(db, flush_every_s=cfg.train.flush_every_s, backbone=cfg.backbone),
                        command=record_as, out_dir=default_out_dir(opts.out), source=source,
                        parent_run_id=parent_run_id, bench_round=parse_bench_round(bench_round))


def _run_trainer(backbone, cfg: RunConfig, quiet: bool, new_writer: Callable[[], RunWriter],
                 **trainer_kwargs: Any) -> RunResult:
    """Run a Trainer in every process of a torchrun launch (one process without torchrun) and print the result.
    Rank 0 records the run with ``new_writer()``; the other ranks only learn its id."""
    group = Group.from_env()
    group.start(resolve_device(cfg.device))
    try:
        writer = new_writer() if group.is_main else None
        rid = group.broadcast(writer.run_id if writer else None)
        view = ProgressView(quiet or not group.is_main)
        try:
            trainer = Trainer(backbone, cfg, writer or RankWriter(rid), events=view, group=group, **trainer_kwargs)
            result = trainer.run()
        finally:
            view.close()
    finally:
        group.close()
    if group.is_main:
        print_result(result, backbone)
    return result


def resume_training(run_id: str, opts: RunOptions) -> RunResult:
    from .registry.db import connect, resolve_run_id

    db = resolve_db_path(opts.db)
    with connect(db, read_only=True) as con:
        rid = resolve_run_id(con, run_id, db)
        row = con.execute("SELECT config, out_dir, command FROM runs WHERE run_id = ?", [rid]).fetchone()
    config, out_dir, command = row
    cfg = RunConfig.from_dict(json.loads(config) if isinstance(config, str) else config)
    if opts.max_steps is not None:
        cfg.train.max_steps = opts.max_steps
    return _run_trainer(get_backbone(cfg.backbone), cfg, opts.quiet,
                        lambda: RunWriter(db, run_id=rid, flush_every_s=cfg.train.flush_every_s),
                        command=command, out_dir=Path(out_dir).parent, resume=True)


def print_result(result: RunResult, backbone) -> None:
    """The run's outcome on stdout (data), one line per fact, easy to grep."""
    out = sys.stdout
    split = "test" if result.test_split == "test" else f"{result.test_split} (no labelled test split)"
    metrics = " ".join(f"{k}={v:.4f}" if not math.isnan(v) else f"{k}=nan" for k, v in result.final.items())
    print(f"run_id: {result.run_id}", file=out)
    print(f"final {split}: {metrics}", file=out)
    print(f"independent layers: mean {result.mean_independent:.2f}, end {result.end_independent}", file=out)
    print(f"trainable params: mean {result.mean_trainable:,.0f}, end {result.end_trainable:,}", file=out)
    print(f"checkpoint: {result.checkpoint}", file=out)

