"""`dyntie study`: variants x seeds at equal steps, recorded in the registry as one study, and resumable.

A study is a name. Every run it trains records ``{"study": {"name": NAME}}`` in ``runs.config`` besides its settings,
so the registry knows which runs belong to it and what each (variant, seed) already has. Started again with the same
name (the same command gives the same default name), a study skips every (variant, seed) that has a finished run,
continues a killed run from its checkpoint (or trains it again when it has none), trains a failed one again, and
refuses to mix settings: a recorded run whose settings differ from what the command asks is named, not reused.

The variants that take something from a run of the study (``final-arch``, ``replay``; ``grow`` and the matched static
schemes unless ``--independent`` gives their count) are trained from that seed's dynamic run, as `dyntie ablate
--from-run` trains them (``ablation.ablation_job``). Runs go seed by seed, the dynamic run of a seed first.

With ``jobs == 1`` the runs are trained in this process one after another: a run is then exactly the `dyntie train`
or `dyntie ablate` run of its settings, and Ctrl-C or SIGTERM reaches the trainer's own handler, which checkpoints
at the next step boundary. With ``jobs > 1`` each run is a child process (`dyntie job`, as `dyntie bench` starts
its variants), ``jobs`` at a time; a stop signal is passed on to every child, which checkpoints the same way.
"""

from __future__ import annotations

import hashlib
import json
import os
import signal
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import typer

from ..core.checkpoint import recover
from ..core.loop import Event, Job, stop_signals_to
from ..errors import DyntieError, UsageError
from ..results.study import read_study_runs
from ..runner.children import STOPPED_EXIT, ChildRun
from ..runner.jobs import Launch, resume_recorded, run_job
from ..runner.settings_source import SettingsSource, new_settings
from ..settings import RUN_LABELS, VARIANTS, RunSettings
from ..variants import METHOD, spec
from .ablation import ablation_job

_CHECKPOINT_FILES = ("ties.json", "trainer.pt", "model.safetensors")


@dataclass
class Task:
    """One (variant, seed) of the study and what is known of it."""

    variant: str
    seed: int
    needs_dynamic: bool  # trained from this seed's dynamic run
    outcome: str = "pending"  # pending, finished, failed, stopped
    run_id: str | None = None  # its finished run
    resume_id: str | None = None  # a killed run with a checkpoint, to continue
    error: str | None = None

    @property
    def label(self) -> str:
        return f"{self.variant} seed {self.seed}"


def parse_seeds(text: str) -> list[int]:
    try:
        seeds = [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise UsageError(f"--seeds takes whole numbers separated by commas (for example 0,1,2), not {text!r}.") from None
    if not seeds or any(s < 0 for s in seeds) or len(set(seeds)) != len(seeds):
        raise UsageError(f"--seeds needs distinct seeds of 0 or more (for example 0,1,2), not {text!r}.")
    return seeds


def parse_variants(text: str) -> list[str]:
    """The variants in the order given, dynamic first (the source of the run-dependent ones)."""
    names = list(dict.fromkeys(v.strip() for v in text.split(",") if v.strip()))
    unknown = [v for v in names if v not in VARIANTS]
    if unknown or not names:
        raise UsageError(f"Unknown variant {unknown[0] if unknown else text!r} in --variants; choose from "
                         f"{', '.join(VARIANTS)}.")
    return sorted(names, key=lambda v: v != METHOD)


def default_name(settings: RunSettings) -> str:
    """``PRESET-STEPS-HASH``: the hash of the settings every run of the study shares (all but variant and seed),
    so the same command names the same study and other settings name another."""
    tree = {k: v for k, v in settings.to_dict().items() if k not in ("variant", "seed")}
    tree["agent"] = {k: v for k, v in tree["agent"].items() if k not in ("seed", "use_q")}
    digest = hashlib.sha1(json.dumps(tree, sort_keys=True, default=str).encode()).hexdigest()[:6]
    return f"{settings.preset or settings.backbone}-{settings.train.max_steps}-{digest}"


def _flat(tree: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            out.update(_flat(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def settings_difference(expected: RunSettings, recorded: dict[str, Any]) -> tuple[str, Any, Any] | None:
    """The first setting where a recorded run's config differs from ``expected`` (key, expected, recorded), or None.
    ``ties.independent`` 0 is what a variant resolves when it runs, so it matches any recorded count."""
    want = _flat(expected.to_dict())
    have = _flat({k: v for k, v in recorded.items() if k not in RUN_LABELS})
    for key in sorted(set(want) | set(have)):
        if key == "ties.independent" and want.get(key) == 0:
            continue
        if want.get(key) != have.get(key):
            return key, want.get(key), have.get(key)
    return None


class _Done:
    """The outcome of a run trained in this process (the same face as a ``ChildRun`` that has ended)."""

    def __init__(self, label: str, result: dict[str, Any] | None = None, error: str | None = None,
                 stopped: bool = False, exit_code: int = 1) -> None:
        self.label, self._result, self.error, self.stopped, self.exit_code = label, result, error, stopped, exit_code

    def poll(self) -> int:
        return 0 if self._result is not None else self.exit_code

    def result(self) -> dict[str, Any]:
        if self._result is None:
            raise DyntieError(f"{self.label} failed: {self.error or 'the run did not finish'}")
        return self._result


class Study:
    """The plan and the runs of one ``dyntie study`` command: every variant of ``variants`` on every seed of
    ``seeds``, with the settings of ``source`` (``independent_given``: it gives the static schemes' and grow's
    number of independent blocks, so they need no dynamic run), recorded as ``launch`` says."""

    def __init__(self, backbone: str, source: SettingsSource, launch: Launch, *, independent_given: bool,
                 variants: list[str], seeds: list[int], name: str | None, jobs: int,
                 say: Callable[[str], None]) -> None:
        if jobs < 1:
            raise UsageError("--jobs must be at least 1 (the number of runs trained at once).")
        self.source, self.backbone, self.variants, self.seeds, self.jobs = source, backbone, variants, seeds, jobs
        self.launch = launch
        self.say = say
        self.dependent = {v for v in variants if spec(v).reads_source(independent_given)}
        if self.dependent and METHOD not in variants:
            raise UsageError(f"--variants {', '.join(sorted(self.dependent))} needs dynamic in the list: each is "
                             "trained from that seed's dynamic run.")
        # every run's settings are resolved (and refused if wrong) before the first run starts
        self.settings: dict[tuple[str, int], RunSettings] = {}
        for s in seeds:
            for v in variants:
                if v not in self.dependent:
                    self.settings[v, s] = self._new_settings(v, s)[1]
        base = self._new_settings(METHOD, seeds[0])[1]
        self.name = name or default_name(base)
        self.labels = {"study": {"name": self.name}}
        self.stop: int | None = None
        self._in_setup = False
        self._running: dict[int, tuple[Task, Any]] = {}

    def _new_settings(self, variant: str, seed: int) -> tuple[Any, RunSettings]:
        return new_settings(self.backbone, self.source.with_flags(("variant", variant), ("seed", seed)))

    # -- the plan ----------------------------------------------------------------------------------

    def plan(self) -> list[Task]:
        """Every (variant, seed), seed by seed and dynamic first, with what the registry already holds of it."""
        recorded = read_study_runs(self.launch.db, self.name)
        tasks = [Task(v, s, v in self.dependent) for s in self.seeds for v in self.variants]
        for task in tasks:
            runs = [r for r in recorded if r["variant"] == task.variant and r["seed"] == task.seed]
            finished = [r for r in runs if r["status"] == "finished"]
            alive = [r for r in runs if r["status"] == "running"]
            if alive:
                raise DyntieError(f"Study {self.name} has a run still training ({alive[0]['run_id']}, "
                                  f"{task.label}, pid {alive[0]['pid']}); wait for it or stop it, then run the "
                                  "study again.")
            if finished:
                task.outcome, task.run_id = "finished", finished[0]["run_id"]
                self._check(task, finished[0], tasks)
                continue
            killed = [r for r in runs if r["status"] == "killed" and _has_checkpoint(r["out_dir"])]
            if killed:
                task.resume_id = killed[-1]["run_id"]
                self._check(task, killed[-1], tasks)
        return tasks

    def _check(self, task: Task, run: dict[str, Any], tasks: list[Task]) -> None:
        """Refuse a recorded run trained with other settings than this command asks for."""
        if task.needs_dynamic:
            source = self._dynamic(task, tasks)
            if source is None or source.run_id is None:
                return  # its source is not finished: nothing to compare with yet
            expected = self._dependent_job(task, source.run_id).settings
        else:
            expected = self.settings[task.variant, task.seed]
        config = run["config"] if isinstance(run["config"], dict) else json.loads(run["config"])
        diff = settings_difference(expected, config)
        if diff:
            key, want, have = diff
            raise DyntieError(f"Study {self.name} already has {task.label} ({run['run_id']}) trained with {key} = "
                              f"{have!r}, not {want!r}; run the study with the settings it started with, or give "
                              "it another --name.")

    def _dynamic(self, task: Task, tasks: list[Task]) -> Task | None:
        return next((t for t in tasks if t.variant == METHOD and t.seed == task.seed), None)

    def _dependent_job(self, task: Task, source_run: str, notes: list[str] | None = None) -> Job:
        _, job = ablation_job(self.launch.db, source_run, task.variant,
                              [list(self.source.flags), list(self.source.sets)], command="study", labels=self.labels,
                              notes=notes)
        return job

    # -- running -----------------------------------------------------------------------------------

    def run(self) -> list[Task]:
        """Train what the study still needs; returns every task with its outcome."""
        tasks = self.plan()
        todo = [t for t in tasks if t.outcome == "pending"]
        done = len(tasks) - len(todo)
        if done:
            self.say(f"study {self.name}: {done} of {len(tasks)} runs already finished")
        with self._signals():
            while True:
                while self.stop is None and len(self._running) < self.jobs:
                    task = self._next_ready(todo, tasks)
                    if task is None:
                        break
                    todo.remove(task)
                    self._running[id(task)] = (task, self._start(task, tasks))
                ended = [(t, h) for t, h in self._running.values() if h.poll() is not None]
                for task, handle in ended:
                    del self._running[id(task)]
                    self._settle(task, handle, tasks)
                if not self._running and (self.stop is not None or self._next_ready(todo, tasks) is None):
                    break
                if not ended:
                    time.sleep(0.2)
        return tasks

    def _next_ready(self, todo: list[Task], tasks: list[Task]) -> Task | None:
        for task in todo:
            source = self._dynamic(task, tasks) if task.needs_dynamic else None
            if source is None or source.outcome == "finished":
                return task
        return None

    def _job(self, task: Task, tasks: list[Task]) -> Job:
        if not task.needs_dynamic:
            return Job(self.settings[task.variant, task.seed], "study", labels=self.labels)
        notes: list[str] = []
        job = self._dependent_job(task, self._dynamic(task, tasks).run_id, notes)
        for note in notes:
            self.say(note)
        return job

    def _start(self, task: Task, tasks: list[Task]) -> Any:
        verb = f"continuing {task.resume_id}" if task.resume_id else "starting"
        self.say(f"study {self.name}: {task.label}: {verb}")
        if self.jobs > 1:
            payload = ({"resume": task.resume_id, "db": str(self.launch.db)} if task.resume_id else
                       {"job": self._job(task, tasks).to_dict(), "db": str(self.launch.db), "out": str(self.launch.out)})
            return ChildRun(payload, task.label, own_session=True)
        return self._train_here(task, tasks)

    def _train_here(self, task: Task, tasks: list[Task]) -> _Done:
        def listen(event: Event) -> None:
            if event["type"] == "start":
                self._in_setup = False  # from here on a stop signal is the trainer's to handle

        self._in_setup = True
        try:
            if task.resume_id:
                result = resume_recorded(self.launch.db, task.resume_id, quiet=self.launch.quiet,
                                         print_summary=False, listen=listen)
            else:
                from ..plugins import get_backbone

                job = self._job(task, tasks)
                result = run_job(get_backbone(job.settings.backbone), job, self.launch, print_summary=False,
                                 listen=listen)
            return _Done(task.label, result=asdict(result))
        except KeyboardInterrupt:  # stopped before the run began (or a second Ctrl-C)
            return _Done(task.label, error="interrupted", stopped=True, exit_code=128 + signal.SIGINT)
        except DyntieError as e:
            return _Done(task.label, error=str(e), stopped=e.exit_code in STOPPED_EXIT, exit_code=e.exit_code)
        except Exception as e:  # a fault in one run: recorded as failed by its writer; the other runs go on
            if os.environ.get("DYNTIE_DEBUG"):
                raise
            return _Done(task.label, error=f"{type(e).__name__}: {e}")
        finally:
            self._in_setup = False

    def _settle(self, task: Task, handle: Any, tasks: list[Task]) -> None:
        if handle.stopped:  # by a signal to the study, or to the run itself: the study stops too
            task.outcome = "stopped"
            if self.stop is None:
                code = handle.exit_code if isinstance(handle, _Done) else handle.poll()
                self.stop = abs(code) if code < 0 else code - 128
            if isinstance(handle, ChildRun):
                _discard(handle)
            return
        try:
            result = handle.result()
        except DyntieError as e:
            task.outcome, task.error = "failed", str(e)
            self.say(f"study {self.name}: {e}")
            return
        task.outcome, task.run_id, task.resume_id = "finished", result["run_id"], None
        finished = sum(t.outcome == "finished" for t in tasks)
        shown = " ".join(f"{k} {v:.4g}" for k, v in result.get("validation", {}).items())
        self.say(f"study {self.name}: {task.label} finished ({finished} of {len(tasks)}): {result['run_id']}, "
                 f"validation {shown}")

    @contextmanager
    def _signals(self) -> Iterator[None]:
        """Ctrl-C and SIGTERM stop the study: runs in child processes are asked to stop (each checkpoints), a run
        in this process is stopped by the trainer's own handler, or before it begins by this one."""

        def handler(signum, frame):
            self.stop = signum
            for _, handle in self._running.values():
                if isinstance(handle, ChildRun):
                    handle.stop()
            if self._in_setup:
                raise KeyboardInterrupt

        with stop_signals_to(handler):
            yield


def _discard(child: ChildRun) -> None:
    try:
        child.result()
    except DyntieError:
        pass


def _has_checkpoint(out_dir: str | None) -> bool:
    """Whether a killed run left a checkpoint to resume from."""
    folder = Path(out_dir or "") / "checkpoint"
    if out_dir:
        recover(folder)  # one left under its old name by a kill in the middle of a swap
    return bool(out_dir) and all((folder / name).is_file() for name in _CHECKPOINT_FILES)


def summary(study: Study, tasks: list[Task]) -> str | None:
    """What is left when the study did not finish every run (None when it did)."""
    left = [t for t in tasks if t.outcome != "finished"]
    if not left:
        return None
    finished = len(tasks) - len(left)
    failed = [t for t in left if t.outcome == "failed"]
    if study.stop is not None:
        return (f"Study {study.name} stopped with {finished} of {len(tasks)} runs finished; run the same command "
                "again to continue it.")
    shown = "; ".join(str(t.error) for t in failed[:3])
    waiting = len(left) - len(failed)
    more = f" ({waiting} more wait on a failed dynamic run)" if waiting else ""
    return (f"Study {study.name}: {finished} of {len(tasks)} runs finished; failed: {shown}{more}. Run the same "
            "command again to train them again.")


def echo_to_stderr(quiet: bool) -> Callable[[str], None]:
    return (lambda text: None) if quiet else (lambda text: typer.echo(text, err=True))
