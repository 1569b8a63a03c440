"""What a person sees of a run: the progress view on stderr while it trains, the summary on stdout when it ends."""

from __future__ import annotations

import math
import shlex
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

from ..core.loop import Job, RunResult
from ..results.db import resolve_db_path
from ..variants import METHOD

err_console = Console(stderr=True)

#: what the end of a run is doing, as the progress view says it
PHASE_TEXT = {"validation": "final validation", "test": "computing the final score (on the {split} split)",
              "checkpoint": "writing the checkpoint"}
#: the widths the progress line keeps for its fixed parts: elapsed and ETA (h:mm:ss, one spare) and the gaps
_TIME_WIDTH = 8
_MIN_BAR = 5
#: without a terminal (output to a file or a pipe), a progress line at most this often while a run trains ...
LINE_EVERY_S = 30.0
#: ... and a line whenever this long has passed without one, whatever the run is doing (a long step, a final
#: evaluation, the setup): a log read later never has a silent minute
SILENCE_S = 60.0


def run_kind(command: str, variant: str, parent_run_id: str | None) -> str:
    """What a run is, in a few words: 'ablation final-arch of RUN', 'variant no-tying', '' for dynamic tying."""
    if parent_run_id:
        return f"ablation {variant} of {parent_run_id}"
    if command == "ablate":
        return f"ablation {variant} (no source run)"
    return f"variant {variant}" if variant != METHOD else ""


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
    terminal, a line otherwise); warnings. Without a terminal (a log file, a pipe) a line per validation and per
    end phase, a progress line at most every ``line_every_s`` seconds while it trains, and one whenever
    ``silence_s`` seconds pass without a line (``tick``, called by a watcher thread, or by hand with ``watch=False``);
    --quiet shows only warnings."""

    def __init__(self, quiet: bool, console: Console | None = None, *, clock: Callable[[], float] = time.monotonic,
                 line_every_s: float = LINE_EVERY_S, silence_s: float = SILENCE_S, watch: bool = True) -> None:
        self.console = console or err_console
        self.quiet = quiet
        self.live = not quiet and self.console.is_terminal
        self.progress: Progress | None = None
        self.bar: BarColumn | None = None
        self.step_text = ""
        self.task = None
        self.status = None
        self.info = ""
        self.clock, self.line_every_s, self.silence_s = clock, line_every_s, silence_s
        self.lines = not quiet and not self.live  # plain lines instead of the bar
        self.began = self.last_line = clock()
        self.doing = "setting up (data, model)"  # what the run does now, for a line after a silence
        self.figures = ""  # the latest logged figures
        self.step, self.total, self.first_step, self.first_time = 0, 0, 0, self.began
        self._stop = threading.Event()
        if self.lines and watch:
            threading.Thread(target=self._watch, name="dyntie-progress", daemon=True).start()

    def __call__(self, e: dict[str, Any]) -> None:
        kind = e["type"]
        if kind == "start":
            self._start(e)
        elif kind == "step":
            self._progress_line(e)
        elif kind == "log":
            self.figures = f"loss {e['loss']:.4g} " + progress_info(e["ppl"], e["independent"], e["blocks"],
                                                                   e["peak_bytes"], 80)
            if self.progress is not None:
                self._fit(e)
                self.progress.update(self.task, completed=e["step"], info=self.info)
        elif kind == "eval" and not self.quiet:
            shown = " ".join(f"{k} {v:.4g}" for k, v in e["metrics"].items())
            self._say(f"step {e['step']}: validation {shown}")
        elif kind == "phase":
            self._phase(e)
        elif kind == "end":
            self.close()

    def _progress_line(self, e: dict[str, Any]) -> None:
        self.step = e["step"]
        if self.lines and self.clock() - self.last_line >= self.line_every_s:
            self._say(self._where())

    def _where(self) -> str:
        """The progress line: step, figures, elapsed and the time left at the pace since the start."""
        elapsed = self.clock() - self.began
        parts = [f"step {self.step}/{self.total}", *([self.figures] if self.figures else []),
                 f"{duration_text(elapsed)} elapsed"]
        done, spent = self.step - self.first_step, self.clock() - self.first_time
        if done > 0 and self.total > self.step:
            parts.append(f"about {duration_text(spent / done * (self.total - self.step))} left")
        return ", ".join(parts)

    def tick(self) -> None:
        """A line if ``silence_s`` seconds have passed without one: where the run is, or what it is doing."""
        if not self.lines or self.clock() - self.last_line < self.silence_s:
            return
        if self.doing == "training":
            self._say(self._where())
        else:
            self._say(f"{self.doing}... ({duration_text(self.clock() - self.began)} elapsed)")

    def _watch(self) -> None:
        while not self._stop.wait(min(5.0, self.silence_s / 4)):
            self.tick()

    def _start(self, e: dict[str, Any]) -> None:
        if self.quiet:
            return
        what = run_kind(e.get("command", ""), e.get("variant", METHOD), e.get("parent_run_id"))
        parts = [f"run [bold]{escape(e['run_id'])}[/]", *([escape(what)] if what else []),
                 f"{e['blocks']} blocks", f"data: {escape(str(e['source']))}"]
        self._say(" - ".join(parts), markup=True)
        for note in e.get("notes", ()):
            self._say(note)
        self.doing, self.total = "training", e["total"]
        self.step = self.first_step = e["step"]
        self.first_time = self.clock()
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
        if e["final"]:
            self.doing = f"step {e['step']}: {text}"
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

    def say(self, text: str) -> None:
        """A message on stderr, unless --quiet."""
        if not self.quiet:
            self._say(text)

    def _say(self, text: str, *, markup: bool = False, style: str | None = None) -> None:
        """One message on stderr: wrapped at words on a terminal, one line per message in a pipe or a log."""
        self.last_line = self.clock()
        self.console.print(text, style=style, highlight=False, markup=markup,
                           soft_wrap=not self.console.is_terminal)

    def _stop_bar(self) -> None:
        if self.progress is not None:
            self.progress.stop()
            self.progress = None

    def close(self) -> None:
        self._stop.set()
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


def db_option(db: Path) -> str:
    """`` --db PATH`` for a command that is to be pasted, where registry ``db`` is not the default one."""
    return "" if db == resolve_db_path(None) else f" --db {shlex.quote(str(db))}"


#: the recorded commands whose own command line continues a stopped run; a bench or study run continued on its own
#: continues with `dyntie train --resume`
_RESUMED_BY = ("train", "finetune", "ablate")


def resume_command(command: str, run_id: str, db: Path) -> str:
    """The command line that continues stopped run ``run_id`` (recorded with ``command``) of registry ``db``."""
    return f"dyntie {command if command in _RESUMED_BY else 'train'} --resume {run_id}{db_option(db)}"


def next_commands(job: Job, result: RunResult, db: Path) -> list[str]:
    """What to run after this run, as it can be pasted: ``--db`` added where the registry is not the default."""
    on_db = db_option(db)
    rid = result.run_id
    commands = [f"dyntie report --run {rid} --table paper{on_db}"]
    if job.parent_run_id:
        commands.append(f"dyntie report --compare {job.parent_run_id} {rid}{on_db}")
    commands += [f"dyntie report --plot ties --run {rid}{on_db}", f"dyntie export {rid} --out DIR{on_db}"]
    return commands


def print_result(job: Job, result: RunResult, db: Path, elapsed_s: float) -> None:
    """The outcome of ``job``'s run on stdout (data), one line per fact, easy to grep; then the commands to run
    next."""
    out = sys.stdout
    split = "test" if result.test_split == "test" else f"{result.test_split} (no labelled test split)"
    metrics = " ".join(f"{k}={v:.4f}" if not math.isnan(v) else f"{k}=nan" for k, v in result.final.items())
    print(f"run_id: {result.run_id}", file=out)
    what = run_kind(job.command, job.settings.variant, job.parent_run_id)
    if what:
        print(f"run: {what}", file=out)
    print(f"final {split}: {metrics}", file=out)
    if result.baseline:  # beside the score: the floor of a predictor that learned nothing
        floor = " ".join(f"{k}={v:.4f}" for k, v in result.baseline.items())
        print(f"majority class: {floor} ({result.baseline_how})", file=out)
    if result.best_step is not None:
        print(f"best validation: {result.best_metric}={result.best_validation:.4f} at step {result.best_step}",
              file=out)
    which = "the best validation" if result.tested_step == result.best_step else "the last step"
    print(f"{result.test_split} scored: the model of step {result.tested_step} ({which})", file=out)
    for note in result.notes:
        print(f"note: {note}", file=out)
    print(f"independent layers: mean {result.mean_independent:.2f}, end {result.end_independent}", file=out)
    full = f" of {result.conventional_params:,} in the full model (every block its own weights)" \
        if result.conventional_params else ""
    print(f"trainable params: mean {result.mean_trainable:,.0f}, end {result.end_trainable:,}{full}", file=out)
    print(f"checkpoint: {result.checkpoint}", file=out)
    print(f"registry: {db}", file=out)
    print(f"wall time: {duration_text(elapsed_s)} (setup, training, evaluation and the checkpoint)", file=out)
    print("next:", file=out)
    for command in next_commands(job, result, db):
        print(f"  {command}", file=out)
