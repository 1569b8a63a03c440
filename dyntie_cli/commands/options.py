"""The options every command that trains shares, declared once: each flag, its help, and the setting it sets.

``train``, ``finetune``, ``ablate``, ``bench``, ``study``, ``plan`` and ``config show`` take them through
``@training_options``, which adds them to the command's signature (Typer reads it) and hands the command one
``TrainingOptions`` object. A flag that names a setting (``--max-steps`` sets ``train.max_steps``) takes its name
and its help from the settings schema, so the two cannot disagree.
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Annotated, Any

import typer

from ..errors import UsageError
from ..settings import FLAG_OF, RunSettings, parse_sets, section_fields

if TYPE_CHECKING:  # both import torch: a command imports them when it runs, so `dyntie --help` stays quick
    from ..runner.jobs import Launch
    from ..runner.settings_source import SettingsSource


@dataclass(frozen=True)
class Flag:
    name: str  # the parameter name
    decls: tuple[str, ...]  # "--max-steps", "-k"
    kind: Any  # the value's type
    key: str | None  # the setting it sets; None: an option of the launch (where results go, what is shown)
    help: str = ""  # for a setting: added after the schema's help


def _setting(key: str, kind: Any, *aliases: str, help: str = "") -> Flag:
    """The flag the schema names for setting ``key`` (``settings.FLAG_OF``), with its short ``aliases``."""
    flag = FLAG_OF[key]
    return Flag(flag.removeprefix("--").replace("-", "_"), (flag, *aliases), kind, key, help)


FLAGS: tuple[Flag, ...] = (
    _setting("dataset", str, "-d", help="See `dyntie backbones`."),
    Flag("preset", ("--preset", "-p"), str, None, "Named model + training preset (`dyntie backbones` lists them)."),
    Flag("recipe", ("--recipe",), str, None, "A TOML recipe file, or a packaged recipe name."),
    Flag("sets", ("--set",), list[str], None, "Override any setting: --set train.lr=3e-4 (repeatable; "
                                              "`dyntie config show` prints them all)."),
    Flag("db", ("--db",), str, None, "DuckDB registry file (or DYNTIE_DB) \\[default: ./dyntie.duckdb]."),
    Flag("out", ("--out",), str, None, "Folder for checkpoints \\[default: ./runs]."),
    _setting("seed", int),
    _setting("device", str),
    _setting("train.max_steps", int),
    _setting("ties.decide_every", int, "-k"),
    _setting("variant", str),
    _setting("ties.independent", int),
    _setting("agent.preset", str, help="default, lean (fewer blocks, worse perplexity), paper (the paper's exact "
                                       "agent), shared (the shared per-block Q-network) or advantage (the shared "
                                       "network moving a row only where its bootstrap heads agree the move is "
                                       "better)."),
    _setting("agent.warm_from", str),
    _setting("agent.warm_weights", str),
    _setting("agent.reward", str),
    _setting("agent.max_independent", int),
    _setting("agent.param_penalty", float),
    _setting("ties.tied_grad", str),
    _setting("init", str),
    _setting("ties.initial_state", str),
    _setting("data_dir", str),
    Flag("threads", ("--threads",), int, None, "CPU threads of the run (OMP_NUM_THREADS also sets them) "
                                              "\\[default: the cores other processes leave free, at most "
                                              "one per core]."),
    Flag("quiet", ("--quiet", "-q"), bool, None, "No progress bar or messages (warnings still show)."),
    Flag("force", ("--force",), bool, None, "Train even when the memory plan predicts the run does not fit the "
                                            "device (`dyntie plan` shows the prediction)."),
)
BY_NAME = {f.name: f for f in FLAGS}
#: the flags a resume takes: where the registry is, how the run is shown and on how many CPU threads, the memory
#: plan overridden, and a new length (--max-steps, recorded in runs.config). Any other would make the resumed run
#: differ from the one recorded, so it is refused.
RESUME_FLAGS = ("max_steps", "threads", "quiet", "db", "force")


def _schema_help(key: str) -> str:
    section, _, name = key.rpartition(".")
    fields = section_fields(RunSettings)[section] if section else RunSettings.model_fields
    info = fields.get(name)
    return info.description or "" if info is not None else ""


def _help(flag: Flag) -> str:
    text = " ".join(part for part in (_schema_help(flag.key) if flag.key else "", flag.help) if part)
    return text.replace("[", "\\[") if "\\[" not in text else text  # Rich markup: keep brackets visible


def _parameter(flag: Flag) -> inspect.Parameter:
    if flag.kind is bool:
        annotation = Annotated[bool, typer.Option(*flag.decls, help=_help(flag))]
        default: Any = False
    else:
        annotation = Annotated[flag.kind | None, typer.Option(*flag.decls, help=_help(flag), show_default=False)]
        default = None
    return inspect.Parameter(flag.name, inspect.Parameter.KEYWORD_ONLY, default=default, annotation=annotation)


@dataclass(frozen=True)
class TrainingOptions:
    """The shared options of one command line: the settings they give (``sources``) and where the run's results
    go (``launch``)."""

    values: dict[str, Any]

    def __getattr__(self, name: str) -> Any:
        if name in BY_NAME:
            return self.values.get(name)
        raise AttributeError(name)

    def flag_pairs(self) -> list[tuple[str, Any]]:
        """(settings key, value) of every flag given; the named agent first, so flags and --set refine it."""
        pairs = [(f.key, self.values[f.name]) for f in FLAGS
                 if f.key and self.values.get(f.name) is not None]
        return sorted(pairs, key=lambda pair: pair[0] != "agent.preset")

    def set_pairs(self) -> list[tuple[str, Any]]:
        return parse_sets(self.values.get("sets"))

    def sources(self, *extra: tuple[str, Any]) -> SettingsSource:
        """Where the run's settings come from: the preset and recipe named, the flags, then ``extra`` (settings a
        command sets from its own options: ``finetune --task`` sets ``dataset``), then ``--set``."""
        from ..runner.settings_source import SettingsSource

        return SettingsSource(self.preset, self.recipe, (*self.flag_pairs(), *extra), tuple(self.set_pairs()))

    def launch(self) -> Launch:
        """Where the run's results go and how it is shown."""
        from ..results.db import resolve_db_path
        from ..runner.jobs import Launch, default_out_dir

        if self.threads is not None and self.threads < 1:
            raise UsageError(f"--threads must be at least 1, not {self.threads}.")
        return Launch(resolve_db_path(self.db), default_out_dir(self.out), bool(self.quiet), bool(self.force),
                      self.threads)

    def given(self, name: str) -> bool:
        return self.values.get(name) not in (None, False, [])

    def check_resume(self, run_id: str) -> None:
        """Refuse, in one sentence, the flags that a resume of ``run_id`` cannot honour (``RESUME_FLAGS``)."""
        refused = [f.decls[0] for f in FLAGS if f.name not in RESUME_FLAGS and self.given(f.name)]
        if refused:
            allowed = _listed([BY_NAME[name].decls[0] for name in RESUME_FLAGS])
            raise UsageError(f"--resume {run_id} continues the run with the settings it was recorded with, so "
                             f"{_listed(refused)} cannot change it; drop {'it' if len(refused) == 1 else 'them'} or "
                             f"train a new run (a resume takes {allowed}).")


def _listed(words: list[str]) -> str:
    return words[0] if len(words) == 1 else f"{', '.join(words[:-1])} and {words[-1]}"


def training_options(*, exclude: tuple[str, ...] = ()) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """Add the shared flags (but ``exclude``) to a command; it receives them as ``opts: TrainingOptions``."""
    flags = [f for f in FLAGS if f.name not in exclude]

    def wrap(fn: Callable[..., Any]) -> Callable[..., Any]:
        signature = inspect.signature(fn, eval_str=True)
        own = [p for p in signature.parameters.values() if p.name != "opts"]
        added = [_parameter(f) for f in flags]

        @functools.wraps(fn)
        def command(**kwargs: Any) -> Any:
            values = {f.name: kwargs.pop(f.name) for f in flags}
            return fn(opts=TrainingOptions(values), **kwargs)

        parameters = own + added
        command.__signature__ = signature.replace(parameters=parameters)  # type: ignore[attr-defined]
        command.__annotations__ = {p.name: p.annotation for p in parameters}
        return command

    return wrap


def examples(*commands: str) -> str:
    """A command's epilog: one example command a line, so none is broken across lines at any width."""
    return "Examples:\n" + "\n".join(f"  {command}" for command in commands)


Db = Annotated[str | None, typer.Option("--db", envvar="DYNTIE_DB", help=_help(BY_NAME["db"]))]
Format = Annotated[str, typer.Option("--format", "-f", help="table, csv, json or markdown.")]
Resume = Annotated[str | None, typer.Option("--resume", help="Continue a stopped (killed) run from its last "
                                            "checkpoint with its recorded settings, as its stop message says "
                                            "(it takes --max-steps, --threads, --quiet, --db and --force; a "
                                            "finished run is refused).", show_default=False)]
