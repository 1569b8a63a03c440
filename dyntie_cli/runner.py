"""From a command line to a finished run: settings, the results writer, the progress view, the printed summary.

Shared by ``train``, ``finetune``, ``ablate``, ``bench`` (whose variants run as child processes, each handed a
``Job`` file) and ``study``; the training itself is ``core.loop.Trainer``.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import signal
import subprocess
import sys
import tempfile
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

from .core.distributed import Group
from .core.loop import Event, RunResult, Trainer, resolve_device
from .errors import DyntieError, UsageError
from .plugins import get_backbone
from .results.db import resolve_db_path
from .results.lineage import load_run
from .results.writer import RankWriter, RunWriter
from .settings import RunSettings, from_saved, load_recipe, recipe_pairs, resolve

err_console = Console(stderr=True)


# --------------------------------------------------------------------------------------------------
# Settings of a new run, of a recorded one
# --------------------------------------------------------------------------------------------------


def new_settings(backbone_name: str, opts: Any, *, expect: str | None = None) -> tuple[Any, RunSettings]:
    """The backbone and the validated settings of a command line (``opts``: ``TrainingOptions``). ``expect``:
    the command the backbone must belong to (train or finetune); None accepts any."""
    backbone = get_backbone(backbone_name)
    if expect is not None and backbone.command != expect:
        raise UsageError(f"Backbone {backbone_name!r} is run with `dyntie {backbone.command} {backbone_name}`, "
                         f"not `dyntie {expect}`.")
    recipe = load_recipe(opts.recipe) if opts.recipe else {}
    if recipe.get("backbone") not in (None, backbone.name):
        raise UsageError(f"Recipe {opts.recipe!r} is for backbone {recipe['backbone']!r}; run it with "
                         f"`dyntie {backbone.command} {recipe['backbone']} --recipe {opts.recipe}`.")
    preset_name = opts.preset or recipe.get("preset") or backbone.default_preset
    if preset_name not in backbone.presets:
        raise UsageError(f"Unknown preset {preset_name!r} for {backbone.name}; presets: "
                         f"{', '.join(backbone.presets)}.")
    settings = resolve(type(backbone), backbone.presets[preset_name],
                       sources=[recipe_pairs(recipe), opts.flag_pairs(), opts.set_pairs()])
    check_dataset(settings, backbone)
    return backbone, settings


def recorded_settings(config: dict[str, Any], sources: list[list[tuple[str, Any]]]) -> tuple[Any, RunSettings]:
    """The backbone and settings of a recorded run's config with ``sources`` applied on top."""
    backbone = get_backbone(config["backbone"])
    settings = from_saved(type(backbone), config, sources)
    check_dataset(settings, backbone)
    return backbone, settings


def check_dataset(settings: RunSettings, backbone) -> None:
    """The dataset must be one the backbone knows; names match loosely (RTE, sst-2, WikiText_103) and are
    stored in their canonical spelling."""
    known = backbone.datasets
    if any(d.endswith(":PATH") and settings.dataset.startswith(d[: -len("PATH")]) for d in known):
        return
    canonical = {_loose(d): d for d in known}
    if _loose(settings.dataset) not in canonical:
        raise UsageError(f"Unknown dataset {settings.dataset!r} for {backbone.name}; choose one of "
                         f"{', '.join(known)}.")
    settings.dataset = canonical[_loose(settings.dataset)]


def _loose(name: str) -> str:
    return name.lower().replace("-", "").replace("_", "")


# --------------------------------------------------------------------------------------------------
# Jobs: one run to do
# --------------------------------------------------------------------------------------------------


@dataclass
class Launch:
    """Where a run's results go and how it is shown; none of it changes what is trained."""

    db: Path
    out: Path
    quiet: bool = False
    force: bool = False  # train even when the memory plan predicts the run does not fit

    @classmethod
    def from_options(cls, opts: Any) -> Launch:
        return cls(resolve_db_path(opts.db), default_out_dir(opts.out), bool(opts.quiet), bool(opts.force))


@dataclass
class Job:
    """A run to train: its settings and what the registry records beside them."""

    settings: RunSettings
    command: str  # how the registry records it: train, finetune, ablate, bench, study
    parent_run_id: str | None = None
    source: dict[str, Any] | None = None  # what a run-dependent variant takes from its source run
    labels: dict[str, Any] = field(default_factory=dict)  # kept in runs.config: a bench round, a study

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready: how a job is handed to another process."""
        return {"settings": self.settings.to_dict(), "command": self.command, "parent_run_id": self.parent_run_id,
                "source": self.source, "labels": self.labels}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> tuple[Any, Job]:
        """The backbone and the job of ``to_dict``'s output, its settings validated again."""
        backbone, settings = recorded_settings(data["settings"], [])
        return backbone, cls(settings, data["command"], data["parent_run_id"], data["source"], data["labels"])


def default_out_dir(out: str | None) -> Path:
    return Path(out or os.environ.get("DYNTIE_OUT", "runs"))


def run_job(backbone, job: Job, launch: Launch, *, print_summary: bool = True,
            listen: Callable[[Event], None] | None = None) -> RunResult:
    """Train ``job``, recorded in ``launch.db``; prints the summary on stdout unless told not to. ``listen``
    hears the trainer's events (start, log, eval, end) besides the progress view."""
    settings = job.settings
    job = with_agent_knowledge(job, launch.db)
    return _run_trainer(
        backbone, settings, launch.quiet,
        lambda: RunWriter(launch.db, flush_every_s=settings.train.flush_every_s, backbone=settings.backbone),
        print_summary=print_summary, listen=listen, command=job.command, out_dir=launch.out, source=job.source,
        parent_run_id=job.parent_run_id, labels=job.labels, check_memory=not launch.force,
    )


#: the variants whose policy is the Q-agent (and so can start from earlier runs' knowledge)
AGENT_VARIANTS = ("dynamic", "q-off")


def with_agent_knowledge(job: Job, db: Path) -> Job:
    """``job`` with what its agent starts from (``agent.warm_from``, ``agent.warm_weights``) read from the registry
    into its source, and recorded in its labels (``runs.config`` ``agent_sources``: the run ids whose transitions
    it learned from, how many, and the run whose network it started from). Unchanged for a policy without an
    agent or an agent that starts cold."""
    a = job.settings.agent
    if job.settings.variant not in AGENT_VARIANTS or not (a.warm_from or a.warm_weights):
        return job
    from .results.lineage import agent_knowledge

    study = (job.labels.get("study") or {}).get("name")
    knowledge = agent_knowledge(db, a.warm_from, a.warm_weights, job.settings.backbone, study=study)
    sources = {"runs": knowledge["runs"], "transitions": len(knowledge["transitions"]),
               "updates": a.warm_updates if knowledge["transitions"] else 0, "weights_run": knowledge["weights_run"]}
    return Job(job.settings, job.command, job.parent_run_id, {**(job.source or {}), "agent": knowledge},
               {**job.labels, "agent_sources": sources})


def resume_run(run_id: str, opts: Any) -> RunResult:
    """Continue a killed run from its last checkpoint (``--max-steps`` may extend it)."""
    return resume_recorded(resolve_db_path(opts.db), run_id, max_steps=opts.max_steps, quiet=bool(opts.quiet),
                           force=bool(opts.force))


def resume_recorded(db: Path, run_id: str, *, max_steps: int | None = None, quiet: bool = False,
                    print_summary: bool = True, listen: Callable[[Event], None] | None = None,
                    force: bool = False) -> RunResult:
    """Continue the killed run ``run_id`` of registry ``db`` from its last checkpoint, with its recorded settings
    (``max_steps`` may extend it)."""
    run = load_run(db, run_id)
    extend = [("train.max_steps", max_steps)] if max_steps is not None else []
    backbone, settings = recorded_settings(run.config, [extend])
    return _run_trainer(backbone, settings, quiet,
                        lambda: RunWriter(db, run_id=run.run_id, flush_every_s=settings.train.flush_every_s),
                        print_summary=print_summary, listen=listen, command=run.command,
                        out_dir=Path(run.out_dir).parent, resume=True, check_memory=not force)


def _run_trainer(backbone, settings: RunSettings, quiet: bool, new_writer: Callable[[], RunWriter], *,
                 print_summary: bool = True, listen: Callable[[Event], None] | None = None,
                 **trainer_kwargs: Any) -> RunResult:
    """Run a Trainer in every process of a torchrun launch (one process without torchrun) and print the result.
    Rank 0 records the run with ``new_writer()``; the other ranks only learn its id."""
    group = Group.from_env()
    group.start(resolve_device(settings.device))
    try:
        writer = new_writer() if group.is_main else None
        rid = group.broadcast(writer.run_id if writer else None)
        view = ProgressView(quiet or not group.is_main)

        def events(e: Event) -> None:
            view(e)
            if listen is not None:
                listen(e)

        try:
            trainer = Trainer(backbone, settings, writer or RankWriter(rid), events=events, group=group,
                              **trainer_kwargs)
            result = trainer.run()
        finally:
            view.close()
    finally:
        group.close()
    if group.is_main and print_summary:
        print_result(result)
    return result


# --------------------------------------------------------------------------------------------------
# A job in a process of its own
# --------------------------------------------------------------------------------------------------

#: exit statuses of a child whose run was stopped by a signal at a step boundary (checkpointed, marked killed)
STOPPED_EXIT = (128 + signal.SIGINT, 128 + signal.SIGTERM)


class ChildRun:
    """One job trained by ``dyntie job`` in a fresh interpreter (its peak memory is its own): the child reads the
    job from a file and writes what it did to another, nothing is parsed from its output. ``payload`` is
    ``{"job": Job.to_dict(), "db", "out"}`` for a new run or ``{"resume": run id, "db"}`` to continue a killed one.
    ``own_session``: the child does not get the terminal's Ctrl-C; the parent stops it with ``stop()``."""

    def __init__(self, payload: dict[str, Any], label: str, *, own_session: bool = False) -> None:
        self.label = label
        self._tmp = Path(tempfile.mkdtemp(prefix="dyntie-job-"))
        job_file, self._result_file, self._log = (self._tmp / n for n in ("job.json", "result.json", "log.txt"))
        job_file.write_text(json.dumps(payload))
        cmd = [sys.executable, "-m", "dyntie_cli", "job", str(job_file), "--result", str(self._result_file)]
        with open(self._log, "w") as log:
            self.proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=os.environ.copy(),
                                         start_new_session=own_session)

    def poll(self) -> int | None:
        return self.proc.poll()

    def wait(self) -> int:
        return self.proc.wait()

    def stop(self) -> None:
        """Ask the child to stop at its next step boundary (it checkpoints and marks its run killed)."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)

    @property
    def stopped(self) -> bool:
        """Stopped by a signal: at a step boundary (its exit status says so), or before training began."""
        code = self.proc.returncode
        return code in STOPPED_EXIT or code in (-signal.SIGTERM, -signal.SIGINT)

    def result(self) -> dict[str, Any]:
        """The finished run's result (``RunResult`` as a dict); a ``DyntieError`` naming the child's last line if
        it did not finish. Removes the child's files."""
        try:
            if self.proc.returncode == 0 and self._result_file.exists():
                return json.loads(self._result_file.read_text())
            last = (self._log.read_text().strip().splitlines() or ["(no output)"])[-1]
            raise DyntieError(f"{self.label} failed: {last}")
        finally:
            shutil.rmtree(self._tmp, ignore_errors=True)


def run_in_child(payload: dict[str, Any], label: str) -> dict[str, Any]:
    """Train one job in a child process and wait for its result."""
    child = ChildRun(payload, label)
    child.wait()
    return child.result()


# --------------------------------------------------------------------------------------------------
# What a person sees
# --------------------------------------------------------------------------------------------------


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


def print_result(result: RunResult) -> None:
    """The run's outcome on stdout (data), one line per fact, easy to grep."""
    out = sys.stdout
    split = "test" if result.test_split == "test" else f"{result.test_split} (no labelled test split)"
    metrics = " ".join(f"{k}={v:.4f}" if not math.isnan(v) else f"{k}=nan" for k, v in result.final.items())
    print(f"run_id: {result.run_id}", file=out)
    print(f"final {split}: {metrics}", file=out)
    print(f"independent layers: mean {result.mean_independent:.2f}, end {result.end_independent}", file=out)
    print(f"trainable params: mean {result.mean_trainable:,.0f}, end {result.end_trainable:,}", file=out)
    print(f"checkpoint: {result.checkpoint}", file=out)
