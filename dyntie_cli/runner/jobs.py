"""A job trained in this process: what it takes from the registry (an earlier run's final state, an agent's
knowledge), the trainer in every process of a torchrun launch, the progress view and the printed summary; and a
killed run continued from its checkpoint."""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from ..core.checkpoint import check_checkpoint
from ..core.checkpoint_info import load_run_file
from ..core.distributed import Group
from ..core.loop import Event, Job, RunResult, RunStopped, Trainer, resolve_device
from ..core.threads import ThreadWatch, plan_threads
from ..core.turns import PipeTurns
from ..errors import DyntieError, UsageError
from ..results.lineage import RecordedRun, load_run, load_source_run
from ..results.trackers import for_run
from ..results.writer import RankWriter, RunWriter
from ..settings import revised
from ..variants import spec
from .settings_source import recorded_settings
from .view import ProgressView, print_result, resume_command


@dataclass(frozen=True)
class Launch:
    """Where a run's results go and how it is shown; none of it changes what is trained."""

    db: Path
    out: Path
    quiet: bool = False
    force: bool = False  # train even when the memory plan predicts the run does not fit
    threads: int | None = None  # CPU threads (--threads); None: the cores left free (core.threads)
    turns: tuple[int, int] | None = None  # beside other runs in turns: the referee's pipes (core/turns.py)


def default_out_dir(out: str | None) -> Path:
    return Path(out or os.environ.get("DYNTIE_OUT", "runs"))


def job_from_dict(data: dict[str, Any]) -> tuple[Any, Job]:
    """The backbone and the job of ``Job.to_dict``'s output, its settings validated again."""
    backbone, settings = recorded_settings(data["settings"], [])
    return backbone, Job(settings, data["command"], data["parent_run_id"], data["source"], data["labels"])


def run_job(backbone, job: Job, launch: Launch, *, print_summary: bool = True,
            listen: Callable[[Event], None] | None = None) -> RunResult:
    """Train ``job``, recorded in ``launch.db``; prints the summary on stdout unless told not to. ``listen``
    hears the trainer's events (start, log, eval, end) besides the progress view."""
    check_writable_folder(launch.out, "--out")
    job = with_initial_state(with_agent_knowledge(job, launch.db), launch.db)
    settings = job.settings
    return _run_trainer(
        backbone, job, launch,
        lambda on_wait: RunWriter(launch.db, flush_every_s=settings.train.flush_every_s, backbone=settings.backbone,
                                  registry_wait_s=settings.train.registry_wait_s, on_wait=on_wait,
                                  trackers=for_run(settings.train, launch.out)),
        print_summary=print_summary, listen=listen,
    )


def check_writable_folder(folder: Path, flag: str, *, shown: Path | None = None) -> None:
    """Refuse, before any data loads, a folder that cannot take new files (a run's checkpoints, an export);
    the sentence names ``flag`` and ``shown`` (default: ``folder``). Nothing is created: a folder that does not
    exist yet is judged by the nearest one above it that does."""
    import tempfile

    reason = None
    existing = Path(os.path.abspath(folder))
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir():
        reason = "a file is in its path"
    elif existing != Path(os.path.abspath(folder)):
        if not os.access(existing, os.W_OK | os.X_OK):
            reason = f"{existing} does not let this user create folders"
    else:
        try:
            with tempfile.NamedTemporaryFile(dir=existing, prefix=".dyntie-write-check-"):
                pass
        except OSError as e:
            reason = e.strerror or type(e).__name__
    if reason is not None:
        raise UsageError(f"{flag} {shown or folder} cannot be written ({reason}); pass a folder this user can "
                         "write.") from None


def with_initial_state(job: Job, db: Path) -> Job:
    """``--initial-state final-arch-of:RUN``: ``job`` with that run's final tie state read from the registry into
    its source, and the run id in full in its settings (so the record names it whatever prefix was given)."""
    spec_text = job.settings.ties.initial_state
    if not spec_text.startswith("final-arch-of:"):
        return job
    run = load_source_run(db, spec_text.split(":", 1)[1])
    if run["final_state"] is None:
        raise UsageError(f"Run {run['run_id']} has no tie history, so --initial-state final-arch-of has no state "
                         "to take: name a run that made tie decisions.")
    settings = revised(job.settings, [("ties.initial_state", f"final-arch-of:{run['run_id']}")])
    return replace(job, settings=settings, source={**(job.source or {}), "initial_state": run["final_state"]})


def with_agent_knowledge(job: Job, db: Path) -> Job:
    """``job`` with what its agent starts from (``agent.warm_from``, ``agent.warm_weights``) read from the registry
    into its source, and recorded in its labels (``runs.config`` ``agent_sources``: the run ids whose transitions
    it learned from, how many, and the run whose network it started from). Unchanged for a policy without an
    agent or an agent that starts cold."""
    a = job.settings.agent
    if not spec(job.settings.variant).has_agent or not (a.warm_from or a.warm_weights):
        return job
    from ..results.lineage import agent_knowledge

    study = (job.labels.get("study") or {}).get("name")
    knowledge = agent_knowledge(db, a.warm_from, a.warm_weights, job.settings.backbone, study=study)
    sources = {"runs": knowledge["runs"], "transitions": len(knowledge["transitions"]),
               "updates": a.warm_updates if knowledge["transitions"] else 0, "weights_run": knowledge["weights_run"]}
    return replace(job, source={**(job.source or {}), "agent": knowledge},
                   labels={**job.labels, "agent_sources": sources})


def resume_recorded(db: Path, run_id: str, *, max_steps: int | None = None, quiet: bool = False,
                    print_summary: bool = True, listen: Callable[[Event], None] | None = None,
                    force: bool = False, threads: int | None = None) -> RunResult:
    """Continue the killed run ``run_id`` of registry ``db`` from its last checkpoint, with its recorded settings
    (``max_steps`` may extend it, and ``runs.config`` then records it). Refused before anything loads: a run that
    finished or diverged, or is training in another process, a checkpoint that is missing or corrupt, a
    ``max_steps`` below the checkpoint's step."""
    run = load_run(db, RunWriter(db).check_resumable(run_id))
    if not run.out_dir:
        raise DyntieError(f"Run {run.run_id} has no checkpoint folder recorded, so it cannot be resumed.")
    at = check_checkpoint(Path(run.out_dir) / "checkpoint")
    backbone, recorded = recorded_settings(run.config, [])
    settings = recorded if max_steps is None else revised(recorded, [("train.max_steps", max_steps)])
    if max_steps is not None and at is not None and max_steps != recorded.train.max_steps:
        if max_steps < at:
            raise UsageError(f"Run {run.run_id}'s checkpoint is at step {at}; --max-steps {max_steps} would end it "
                             f"before that: give at least {at}.")
        if at == recorded.train.max_steps:  # its test split is scored already: a longer run would score it twice
            raise UsageError(f"Run {run.run_id} had trained all its {at} steps when it was killed; resume it "
                             "without --max-steps to record its end, and train a new run for more steps.")
    launch = Launch(db, Path(run.out_dir).parent, quiet, force, threads)
    changed = settings.train.max_steps != recorded.train.max_steps
    record = {**run.config, "train": settings.to_dict()["train"]} if changed else None
    job = Job(settings, run.command, run.parent_run_id, record=record, source=recorded_source(db, run))
    return _run_trainer(backbone, job, launch,
                        lambda on_wait: RunWriter(db, run_id=run.run_id, flush_every_s=settings.train.flush_every_s,
                                                  registry_wait_s=settings.train.registry_wait_s, on_wait=on_wait,
                                                  trackers=for_run(settings.train, launch.out)),
                        print_summary=print_summary, listen=listen, resume=True)


def recorded_source(db: Path, run: RecordedRun) -> dict[str, Any] | None:
    """What killed run ``run`` took from its source run (final-arch's state, replay's schedule): kept in its
    checkpoint, so the source run need not exist any more; read from the registry (``parent_run_id``) for a
    checkpoint written before checkpoints kept it. None for a variant that takes nothing from another run."""
    saved = load_run_file(Path(run.out_dir or "") / "checkpoint") if run.out_dir else None
    if saved is not None and saved.get("source"):
        return saved["source"]
    if spec(run.variant).needs_source and run.parent_run_id:
        return load_source_run(db, run.parent_run_id)
    return None


def _run_trainer(backbone, job: Job, launch: Launch, new_writer: Callable[[Callable[[str], None]], RunWriter], *,
                 resume: bool = False, print_summary: bool = True,
                 listen: Callable[[Event], None] | None = None) -> RunResult:
    """Run a Trainer in every process of a torchrun launch (one process without torchrun) and print the result.
    Rank 0 records the run with ``new_writer(on_wait)``, which tells the progress view when the run waits for the
    registry; the other ranks only learn its id."""
    started = time.perf_counter()
    group = Group.from_env()
    device = resolve_device(job.settings.device)
    group.start(device)
    view = ProgressView(launch.quiet or not group.is_main)
    # the thread count is the process's, not the run's: every device trains with the CPU's threads set, but
    # only a CPU run is slowed down by threads that wait for busy cores
    plan = plan_threads(launch.threads)
    watch = ThreadWatch(plan, view.warn if device.type == "cpu" and group.is_main else _ignore)
    # said once the run has started: a run's speed depends on it, and the default on the machine's load (a
    # setting refused during the setup gets its one sentence alone)
    untold = [plan.describe()] if device.type == "cpu" else []
    try:
        writer = new_writer(view.warn) if group.is_main else None
        rid = group.broadcast(writer.run_id if writer else None)

        def events(e: Event) -> None:
            while untold:
                view.say(untold.pop())
            watch(e)
            view(e)
            if listen is not None:
                listen(e)

        try:
            with watch:
                labelled = replace(job, labels={**job.labels, "threads": plan.threads})
                trainer = Trainer(backbone, labelled, writer or RankWriter(rid), out_dir=launch.out, resume=resume,
                                  events=events, group=group, check_memory=not launch.force,
                                  turns=PipeTurns(*launch.turns) if launch.turns else None)
                result = trainer.run()
        except RunStopped as stopped:  # the command that continues it, as this run was launched
            message = stopped.resume_with(resume_command(job.command, stopped.run_id, launch.db))
            raise DyntieError(message, exit_code=stopped.exit_code) from None
        finally:
            view.close()
    finally:
        group.close()
    if group.is_main and print_summary:
        print_result(job, result, launch.db, time.perf_counter() - started)
    return result


def _ignore(text: str) -> None:
    return None
