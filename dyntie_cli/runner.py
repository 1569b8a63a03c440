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
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

from .core.distributed import Group
from .core.loop import Event, RunResult, Trainer, resolve_device
from .core.threads import ThreadWatch, plan_threads
from .errors import DyntieError, UsageError
from .plugins import get_backbone
from .results.db import resolve_db_path
from .results.lineage import load_run, load_source_run
from .results.writer import RankWriter, RunWriter
from .settings import RunSettings, from_saved, load_recipe, recipe_pairs, resolve, revised
from .variants import spec

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
    return backbone, checked_dataset(settings, backbone)


def recorded_settings(config: dict[str, Any], sources: list[list[tuple[str, Any]]]) -> tuple[Any, RunSettings]:
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
    threads: int | None = None  # CPU threads (--threads); None: the cores left free (core.threads)

    @classmethod
    def from_options(cls, opts: Any) -> Launch:
        if opts.threads is not None and opts.threads < 1:
            raise UsageError(f"--threads must be at least 1, not {opts.threads}.")
        return cls(resolve_db_path(opts.db), default_out_dir(opts.out), bool(opts.quiet), bool(opts.force),
                   opts.threads)


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
    job = with_initial_state(with_agent_knowledge(job, launch.db), launch.db)
    settings = job.settings
    return _run_trainer(
        backbone, settings, launch,
        lambda: RunWriter(launch.db, flush_every_s=settings.train.flush_every_s, backbone=settings.backbone),
        print_summary=print_summary, listen=listen, command=job.command, out_dir=launch.out, source=job.source,
        parent_run_id=job.parent_run_id, labels=job.labels, check_memory=not launch.force,
    )


def with_initial_state(job: Job, db: Path) -> Job:
    """``--initial-state final-arch-of:RUN``: ``job`` with that run's final tie state read from the registry into
    its source, and the run id in full in its settings (so the record names it whatever prefix was given)."""
    spec = job.settings.ties.initial_state
    if not spec.startswith("final-arch-of:"):
        return job
    run = load_source_run(db, spec.split(":", 1)[1])
    if run["final_state"] is None:
        raise UsageError(f"Run {run['run_id']} has no tie history, so --initial-state final-arch-of has no state "
                         "to take: name a run that made tie decisions.")
    settings = revised(job.settings, [("ties.initial_state", f"final-arch-of:{run['run_id']}")])
    return Job(settings, job.command, job.parent_run_id, {**(job.source or {}), "initial_state": run["final_state"]},
               job.labels)


def with_agent_knowledge(job: Job, db: Path) -> Job:
    """``job`` with what its agent starts from (``agent.warm_from``, ``agent.warm_weights``) read from the registry
    into its source, and recorded in its labels (``runs.config`` ``agent_sources``: the run ids whose transitions
    it learned from, how many, and the run whose network it started from). Unchanged for a policy without an
    agent or an agent that starts cold."""
    a = job.settings.agent
    if not spec(job.settings.variant).has_agent or not (a.warm_from or a.warm_weights):
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
    launch = Launch.from_options(opts)
    return resume_recorded(launch.db, run_id, max_steps=opts.max_steps, quiet=launch.quiet, force=launch.force,
                           threads=launch.threads)


def resume_recorded(db: Path, run_id: str, *, max_steps: int | None = None, quiet: bool = False,
                    print_summary: bool = True, listen: Callable[[Event], None] | None = None,
                    force: bool = False, threads: int | None = None) -> RunResult:
    """Continue the killed run ``run_id`` of registry ``db`` from its last checkpoint, with its recorded settings
    (``max_steps`` may extend it)."""
    run = load_run(db, run_id)
    launch = Launch(db, Path(run.out_dir).parent, quiet, force, threads)
    extend = [("train.max_steps", max_steps)] if max_steps is not None else []
    backbone, settings = recorded_settings(run.config, [extend])
    return _run_trainer(backbone, settings, launch,
                        lambda: RunWriter(db, run_id=run.run_id, flush_every_s=settings.train.flush_every_s),
                        print_summary=print_summary, listen=listen, command=run.command, out_dir=launch.out,
                        parent_run_id=run.parent_run_id, resume=True, check_memory=not force)


def _run_trainer(backbone, settings: RunSettings, launch: Launch, new_writer: Callable[[], RunWriter], *,
                 print_summary: bool = True, labels: dict[str, Any] | None = None,
                 listen: Callable[[Event], None] | None = None,
                 **trainer_kwargs: Any) -> RunResult:
    """Run a Trainer in every process of a torchrun launch (one process without torchrun) and print the result.
    Rank 0 records the run with ``new_writer()``; the other ranks only learn its id."""
    started = time.perf_counter()
    group = Group.from_env()
    device = resolve_device(settings.device)
    group.start(device)
    view = ProgressView(launch.quiet or not group.is_main)
    # the thread count is the process's, not the run's: every device trains with the CPU's threads set, but
    # only a CPU run is slowed down by threads that wait for busy cores
    plan = plan_threads(launch.threads)
    watch = ThreadWatch(plan, view.warn if device.type == "cpu" and group.is_main else _ignore)
    try:
        writer = new_writer() if group.is_main else None
        rid = group.broadcast(writer.run_id if writer else None)

        def events(e: Event) -> None:
            watch(e)
            view(e)
            if listen is not None:
                listen(e)

        try:
            with watch:
                trainer = Trainer(backbone, settings, writer or RankWriter(rid), group=group, events=events,
                                  labels={**(labels or {}), "threads": plan.threads}, **trainer_kwargs)
                result = trainer.run()
        finally:
            view.close()
    finally:
        group.close()
    if group.is_main and print_summary:
        print_result(result, launch.db, time.perf_counter() - started)
    return result


def _ignore(text: str) -> None:
    return None


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


#: what the end of a run is doing, as the progress view says it
PHASE_TEXT = {"validation": "final validation", "test": "computing the final score (on the {split} split)",
              "checkpoint": "writing the checkpoint"}
#: the widths the progress line keeps for its fixed parts: elapsed and ETA (h:mm:ss, one spare) and the gaps
_TIME_WIDTH = 8
_MIN_BAR = 5


def run_kind(command: str, variant: str, parent_run_id: str | None) -> str:
    """What a run is, in a few words: 'ablation final-arch of RUN', 'variant no-tying', '' for dynamic tying."""
    if parent_run_id:
        return f"ablation {variant} of {parent_run_id}"
    if command == "ablate":
        return f"ablation {variant} (no source run)"
    return f"variant {variant}" if variant != "dynamic" else ""


def progress_info(ppl: float, independent: int, blocks: int, peak_bytes: int, width: int) -> str:
    """The progress line's figures, as many as fit in ``width`` characters: perplexity, independent blocks,
    peak memory (dropped first)."""
    parts = [f"ppl {ppl:.1f}", f"indep {independent}/{blocks}", f"mem {peak_bytes / 2**30:.2f} GiB"
             if peak_bytes >= 2**30 else f"mem {peak_bytes / 2**20:.0f} MiB"]
    while parts and len(" ".join(parts)) > width:
        parts.pop()
    return " ".join(parts)


class ProgressView:
    """What a person sees of a run on stderr: a header line; a Rich progress bar (step, perplexity, independent
    blocks, memory, elapsed, ETA) that fits the terminal; what the end of the run is doing (a spinner on a
    terminal, a line otherwise); warnings. Without a terminal a line per validation and per end phase instead
    of the bar; --quiet shows only warnings."""

    def __init__(self, quiet: bool, console: Console | None = None) -> None:
        self.console = console or err_console
        self.quiet = quiet
        self.live = not quiet and self.console.is_terminal
        self.progress: Progress | None = None
        self.bar: BarColumn | None = None
        self.step_text = ""
        self.task = None
        self.status = None
        self.info = ""

    def __call__(self, e: dict[str, Any]) -> None:
        kind = e["type"]
        if kind == "start":
            self._start(e)
        elif kind == "log" and self.progress is not None:
            self._fit(e)
            self.progress.update(self.task, completed=e["step"], info=self.info)
        elif kind == "eval" and not self.quiet:
            shown = " ".join(f"{k} {v:.4g}" for k, v in e["metrics"].items())
            self._say(f"step {e['step']}: validation {shown}")
        elif kind == "phase":
            self._phase(e)
        elif kind == "end":
            self.close()

    def _start(self, e: dict[str, Any]) -> None:
        if self.quiet:
            return
        what = run_kind(e.get("command", ""), e.get("variant", "dynamic"), e.get("parent_run_id"))
        parts = [f"run [bold]{escape(e['run_id'])}[/]", *([escape(what)] if what else []),
                 f"{e['blocks']} blocks", f"data: {escape(str(e['source']))}"]
        self._say(" - ".join(parts), markup=True)
        if not self.live:
            return
        total = e["total"]
        self.step_text = f"step {total}/{total}"
        self.bar = BarColumn(bar_width=_MIN_BAR)
        self.progress = Progress(
            TextColumn("step {task.completed}/{task.total}"), self.bar, TextColumn("{task.fields[info]}"),
            TimeElapsedColumn(), TextColumn("ETA"), TimeRemainingColumn(), console=self.console,
            transient=False,
        )
        self.progress.start()
        self.task = self.progress.add_task("train", total=total, completed=e["step"], info="")

    def _fit(self, e: dict[str, Any]) -> None:
        """Share the terminal's width between the bar and the figures; step, elapsed and ETA always fit."""
        fixed = len(self.step_text) + 2 * _TIME_WIDTH + len("ETA") + 5  # the five gaps between six columns
        room = self.console.width - fixed - 1  # one column spare: a full last column wraps on some terminals
        self.info = progress_info(e["ppl"], e["independent"], e["blocks"], e["peak_bytes"], room - _MIN_BAR - 1)
        assert self.bar is not None
        self.bar.bar_width = max(_MIN_BAR, min(40, room - len(self.info) - 1))

    def _phase(self, e: dict[str, Any]) -> None:
        text = PHASE_TEXT[e["phase"]].format(split=e.get("split", "test"))
        if self.quiet:
            return
        if not e["final"]:  # a validation or checkpoint during training: the bar says so until the next step
            if self.progress is not None:
                self.progress.update(self.task, info=f"{text.replace('final ', '')}...")
            return
        if not self.live:
            self._say(f"step {e['step']}: {text}...")
            return
        self._stop_bar()
        if self.status is None:
            self.status = self.console.status(f"{text}...")
            self.status.start()
        else:
            self.status.update(f"{text}...")

    def warn(self, text: str) -> None:
        """A warning on stderr, above the bar when there is one (shown with --quiet too)."""
        self._say(text, style="yellow" if self.console.is_terminal else None)

    def _say(self, text: str, *, markup: bool = False, style: str | None = None) -> None:
        """One message on stderr: wrapped at words on a terminal, one line per message in a pipe or a log."""
        self.console.print(text, style=style, highlight=False, markup=markup,
                           soft_wrap=not self.console.is_terminal)

    def _stop_bar(self) -> None:
        if self.progress is not None:
            self.progress.stop()
            self.progress = None

    def close(self) -> None:
        self._stop_bar()
        if self.status is not None:
            self.status.stop()
            self.status = None


def duration_text(seconds: float) -> str:
    """42s, 10m 32s, 2h 05m 10s."""
    whole = round(seconds)
    hours, rest = divmod(whole, 3600)
    minutes, secs = divmod(rest, 60)
    if hours:
        return f"{hours}h {minutes:02d}m {secs:02d}s"
    return f"{minutes}m {secs:02d}s" if minutes else f"{secs}s"


def next_commands(result: RunResult, db: Path) -> list[str]:
    """What to run after this run, as it can be pasted: ``--db`` added where the registry is not the default."""
    on_db = "" if db == resolve_db_path(None) else f" --db {_quoted(db)}"
    rid = result.run_id
    commands = [f"dyntie report --run {rid} --table paper{on_db}"]
    if result.parent_run_id:
        commands.append(f"dyntie report --compare {result.parent_run_id} {rid}{on_db}")
    commands += [f"dyntie report --plot ties --run {rid}{on_db}", f"dyntie export {rid} --out DIR{on_db}"]
    return commands


def _quoted(path: Path) -> str:
    import shlex

    return shlex.quote(str(path))


def print_result(result: RunResult, db: Path, elapsed_s: float) -> None:
    """The run's outcome on stdout (data), one line per fact, easy to grep; then the commands to run next."""
    out = sys.stdout
    split = "test" if result.test_split == "test" else f"{result.test_split} (no labelled test split)"
    metrics = " ".join(f"{k}={v:.4f}" if not math.isnan(v) else f"{k}=nan" for k, v in result.final.items())
    print(f"run_id: {result.run_id}", file=out)
    what = run_kind(result.command, result.variant, result.parent_run_id)
    if what:
        print(f"run: {what}", file=out)
    print(f"final {split}: {metrics}", file=out)
    print(f"independent layers: mean {result.mean_independent:.2f}, end {result.end_independent}", file=out)
    full = f" of {result.conventional_params:,} in the full model (every block its own weights)" \
        if result.conventional_params else ""
    print(f"trainable params: mean {result.mean_trainable:,.0f}, end {result.end_trainable:,}{full}", file=out)
    print(f"checkpoint: {result.checkpoint}", file=out)
    print(f"registry: {db}", file=out)
    print(f"wall time: {duration_text(elapsed_s)} (setup, training, evaluation and the checkpoint)", file=out)
    print("next:", file=out)
    for command in next_commands(result, db):
        print(f"  {command}", file=out)
