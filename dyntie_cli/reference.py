"""The reference pages that must never drift from the code, generated from it: the registry schema
(``docs/registry.md``), the command line (``docs/cli.md``) and the settings (``docs/settings.md``).

``python -m dyntie_cli.reference`` rewrites them; the test suite fails when a page differs from what the code
generates.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any, get_args, get_origin

import duckdb

GENERATED = "<!-- generated from the code by `python -m dyntie_cli.reference`; edit the code, not this page -->"

#: what each column of the public schema holds
COLUMNS: dict[str, dict[str, str]] = {
    "runs": {
        "run_id": "`BACKBONE-YYYYmmdd-HHMMSS-xxxx`; commands accept any unique prefix",
        "command": "train, finetune, ablate, bench or study",
        "backbone": "the backbone's name (`dyntie backbones`)",
        "dataset": "dataset name, GLUE task, or kind:PATH",
        "variant": "dynamic, no-tying, final-arch, replay, random, static-*, ...",
        "status": "running, finished, failed, killed (a run whose process is gone reads as killed) or diverged (a "
                  "non-finite training loss or gradient norm stopped it; error says at which step)",
        "config": "the run's resolved settings (docs/settings.md) plus labels: `setup` (how the model was built), "
                  "`bench` (round of a repeated bench), `study`, `world_size`, `agent_sources` (what a warm-started agent "
                  "learned from: the run ids of its transitions, their count, the updates, the run whose network it "
                  "started from)",
        "parent_run_id": "the run an ablation was made from",
        "started_at": "UTC",
        "ended_at": "UTC; NULL while running",
        "preset": "the backbone preset the settings started from",
        "seed": "the run's seed",
        "out_dir": "the run's folder (its checkpoint is `OUT_DIR/checkpoint`)",
        "pid": "the training process",
        "host": "the machine it ran on",
        "test_split": "which official split the final `test` metrics scored: test, or validation where test labels "
                      "are hidden (GLUE)",
        "error": "why a run failed, was killed or diverged",
        "heartbeat_at": "the last flush (UTC): when a killed run last wrote",
        "dyntie_version": "the dyntie that recorded it",
        "metric": "the metric the run is judged by, named by its backbone (`ppl`, `accuracy`, `mcc` for CoLA, "
                  "...): reports, studies and plots read it here; NULL where no backbone named one (the Python API) and for a "
                  "run recorded before this column that never evaluated",
        "higher_is_better": "the direction of `metric`",
    },
    "metrics": {
        "run_id": "", "step": "training step (0: before training)",
        "split": "train, validation, test or reward", "name": "see the metric names below", "value": "",
    },
    "memory": {
        "run_id": "", "step": "one row per logging interval",
        "device": "cpu, or the CUDA device's name",
        "peak_bytes": "the interval's peak: CUDA peak allocated (reset each interval); on CPU the largest resident "
                      "size seen in the interval (sampled every few ms, exact when the process reached a new peak)",
        "current_bytes": "allocated (CUDA) or resident (CPU) bytes at the reading",
        "param_bytes": "bytes of stored parameters, each tensor once (a tied block's are its root's)",
        "grad_bytes": "gradient bytes after the backward pass of the interval's last step",
        "optimizer_bytes": "optimizer state bytes",
        "trainable_params": "parameters that train: the always-trained ones plus one block per independent block",
        "process_peak_bytes": "the whole process's peak so far, from its first byte: on CPU the RSS high-water mark "
                              "(what `/usr/bin/time` reports; dyntie never resets it), on CUDA peak allocated since "
                              "the process started",
    },
    "ties": {
        "run_id": "", "decision": "0 is the initial state", "step": "the training step of the decision",
        "state": "the tie state after the decision: state[i] == i independent, else the root block i uses",
        "action": "the action taken (Eq. 1 maps it to `state`)",
        "independent_layers": "count of state[i] == i",
        "distinct_block_weights": "distinct weight storages among the blocks, measured from the tensors: always "
                                  "equal to independent_layers",
        "changed_blocks": "blocks whose entry changed at this decision",
    },
    "decisions": {
        "run_id": "", "decision": "", "step": "",
        "epsilon": "exploration rate (NULL: no agent decided)", "explored": "whether any row explored",
        "reward": "the shaped reward", "q_predicted": "Q(s, a) before the update", "q_target": "its TD target",
        "td_loss": "(q_predicted - q_target)^2", "greedy_agreement": "share of rows whose greedy choice is unchanged "
                                                                      "since the previous decision",
        "q_spread": "mean over rows of max - min Q", "ppl": "the perplexity the reward was computed from",
        "greedy_moves": "rows whose greedy Q choice (keep bonus and keep_trained applied, before exploration and "
                        "the budget), taken alone, would change their tie: 0 when the learned part would keep "
                        "everything (always 0 with agent.use_q=false); NULL when no Q-network decided",
    },
    "schema_migrations": {"version": "", "name": "", "applied_at": ""},
}

#: every metric a run writes: (split, name) -> meaning
METRICS: dict[tuple[str, str], str] = {
    ("train", "loss"): "mean training loss of the logging interval",
    ("train", "ppl"): "exp(loss) of the interval",
    ("train", "lr"): "the learning rate at the interval's end",
    ("train", "step_time_s"): "median seconds per training step in the interval (decisions and evaluation excluded)",
    ("train", "tokens_per_s"): "items (tokens or examples) per second of the interval's median step: "
                               "items per step / step_time_s",
    ("train", "agent_time_s"): "cumulative seconds choosing, applying and rewarding tie decisions",
    ("train", "wall_time_s"): "seconds of the training loop so far (evaluations included)",
    ("train", "setup_peak_bytes"): "the process's peak when setup ended (step 0)",
    ("train", "base_bytes"): "what the process held before the model was built: libraries and data (step 0)",
    ("train", "planned_peak_bytes"): "the peak the memory plan predicted before training (step 0); recorded by a run near the device's limit, which measures its activations (docs/memory.md)",
    ("train", "process_peak_bytes"): "the whole process's peak at the end, test scoring and checkpoint included",
    ("train", "independent_layers_mean"): "independent blocks averaged over steps (at the end)",
    ("train", "trainable_params_mean"): "trainable parameters averaged over steps (at the end)",
    ("train", "conventional_params"): "trainable parameters with every block independent (at the end)",
    ("validation", "loss"): "evaluation loss on the validation role", ("validation", "ppl"): "exp(loss)",
    ("validation", "accuracy"): "classifiers", ("validation", "mcc"): "CoLA", ("validation", "f1"): "MRPC, QQP",
    ("validation", "pearson"): "STS-B", ("validation", "spearman"): "STS-B",
    ("validation", "best_<metric>"): "the best validation figure of the run's headline metric (`runs.metric`: "
                                     "`best_ppl`, `best_accuracy`, ...), once, at the last step: the model the run "
                                     "selects (not an end-of-run figure)",
    ("validation", "best_step"): "the step of that best validation figure, once, at the last step",
    ("test", "*"): "the same names as validation, once, at the last step (`runs.test_split` names the split), "
                   "scored on the model of the best validation figure (`best_step`; with `train.select_best` "
                   "false, on the last model); the test split never chooses anything",
    ("reward", "ppl"): "perplexity of the batches that scored a decision",
    ("reward", "reward"): "the shaped reward of that decision",
    ("reward", "ppl_<kind>"): "`agent.reward_probes`: the perplexity each probed reward (`ppl_interval`, `ppl_next`, "
                              "`ppl_fresh`, `ppl_heldout`) gave the decision named by `reward/decision` at the same "
                              "step, logged when its last probe was scored (the end of its interval, or at once "
                              "when every probe is fresh); the policy acts on none of them",
    ("reward", "decision"): "the decision the `ppl_<kind>` rows at this step score",
}


def _schema() -> dict[str, list[tuple[str, str]]]:
    from .results.db import migrate

    con = duckdb.connect(":memory:")
    try:
        migrate(con, Path(":memory:"))
        tables = [r[0] for r in con.execute(
            "SELECT table_name FROM duckdb_tables() WHERE schema_name = 'main' ORDER BY table_name").fetchall()]
        return {t: [(r[0], r[1]) for r in con.execute(
            "SELECT column_name, data_type FROM duckdb_columns() WHERE table_name = ? ORDER BY column_index",
            [t]).fetchall()] for t in tables}
    finally:
        con.close()


def registry_page() -> str:
    from .results.db import MIGRATIONS

    intro = ("Every run writes to one DuckDB file (`--db`, `DYNTIE_DB`, default `./dyntie.duckdb`). The tables are a "
             "public interface: open them with the DuckDB CLI or pandas; dyntie adds columns only through migrations "
             "and renames none. Nothing keeps the file open: runs write in short transactions, reports read it while "
             "runs train.")
    lines = [GENERATED, "", "# The registry schema", "", intro, ""]
    order = ["runs", "metrics", "memory", "ties", "decisions", "schema_migrations"]
    schema = _schema()
    for table in order + sorted(set(schema) - set(order)):
        lines += [f"## `{table}`", "", "| column | type | meaning |", "|---|---|---|"]
        for column, kind in schema[table]:
            lines.append(f"| `{column}` | {kind} | {COLUMNS.get(table, {}).get(column, '')} |")
        lines.append("")
    lines += ["## Metric names", "", "| split | name | meaning |", "|---|---|---|"]
    lines += [f"| {split} | `{name}` | {meaning} |" for (split, name), meaning in METRICS.items()]
    migrations = ("Applied in order when a registry is opened for writing (a read upgrades an older file first and "
                  "says so):")
    lines += ["", "## Migrations", "", migrations, ""]
    lines += [f"{i}. `{name}`" for i, (name, _) in enumerate(MIGRATIONS, start=1)]
    return "\n".join(lines) + "\n"


def _is(param: Any, kind: str) -> bool:
    return getattr(param, "param_type_name", "") == kind


def _option_row(param: Any) -> str:
    names = ", ".join(f"`{n}`" for n in [*param.opts, *param.secondary_opts])
    annotation = getattr(getattr(param, "type_descriptor", None), "annotation", None)
    kind = "flag" if getattr(param, "is_flag", False) else _kind(annotation) if annotation is not None else ""
    if getattr(param, "multiple", False):
        kind += " (repeatable)"
    default = param.default if param.default not in (None, False, (), []) and not callable(param.default) else ""
    text = (getattr(param, "help", "") or "").replace("\\[", "[").replace("|", "\\|").replace("\n", " ")
    return f"| {names} | {kind} | {'' if default == '' else f'`{default}`'} | {text} |"


def _command_section(path: list[str], cmd: Any) -> list[str]:
    if getattr(cmd, "hidden", False):
        return []
    if hasattr(cmd, "list_commands"):  # a group: its commands
        out = []
        for name in cmd.list_commands(_context(cmd)):
            out += _command_section([*path, name], cmd.get_command(_context(cmd), name))
        return out
    args = [p for p in cmd.params if _is(p, "argument")]
    usage = " ".join(["dyntie", *path] + [f"[{a.name.upper()}]" if not a.required else a.name.upper() for a in args]
                     + ["[OPTIONS]"])
    lines = [f"## `dyntie {' '.join(path)}`", "", f"`{usage}`", "", " ".join((cmd.help or "").split()), ""]
    if cmd.epilog:
        lines += [" ".join(cmd.epilog.split()), ""]
    options = [p for p in cmd.params if _is(p, "option") and not p.hidden and p.name != "help"]
    if args:
        lines += ["| argument | help |", "|---|---|"]
        lines += [f"| `{a.name.upper()}` | {' '.join((getattr(a, 'help', '') or '').split())} |" for a in args]
        lines.append("")
    if options:
        lines += ["| option | type | default | help |", "|---|---|---|---|"] + [_option_row(o) for o in options] + [""]
    return lines


def _context(cmd: Any) -> Any:
    return cmd.context_class(cmd)


def cli_page() -> str:
    import typer

    from .app import app

    root = typer.main.get_command(app)
    lines = [GENERATED, "", "# Command-line reference", "", " ".join((root.help or "").split()), ""]
    for name in root.list_commands(_context(root)):
        lines += _command_section([name], root.get_command(_context(root), name))
    return "\n".join(lines) + "\n"


def _kind(annotation: Any) -> str:
    if get_origin(annotation) is not None and str(get_origin(annotation)).endswith("Literal"):
        return "one of " + ", ".join(f"`{a}`" for a in get_args(annotation))
    if get_origin(annotation) is list:
        return "list of " + ", ".join(f"`{a}`" for a in get_args(get_args(annotation)[0]))
    args = [a for a in get_args(annotation) if a is not type(None)]
    if args:
        return " or ".join(getattr(a, "__name__", str(a)) for a in args) + (" or null" if type(None) in get_args(
            annotation) else "")
    return getattr(annotation, "__name__", str(annotation))


def _range(info: Any) -> str:
    words = {"ge": ">=", "gt": ">", "le": "<=", "lt": "<"}
    parts = [f"{words[k]} {getattr(m, k)}" for m in info.metadata for k in words if getattr(m, k, None) is not None]
    return ", ".join(parts)


def _section_table(section: type) -> list[str]:
    lines = ["| key | type | default | range | help |", "|---|---|---|---|---|"]
    for name, info in section.model_fields.items():
        if name in ("model", "data", "train", "ties", "agent"):
            continue
        default = "" if info.default is None else f"`{info.default}`"
        lines.append(f"| `{name}` | {_kind(info.annotation)} | {default} | {_range(info)} | {info.description or ''} |")
    return lines + [""]


def settings_page() -> str:
    from .plugins import all_backbones
    from .settings import AgentSettings, RunSettings, TieSettings, TrainSettings

    intro = ("Every run's settings resolve in one order: these defaults < the backbone's preset < a recipe file "
             "(`--recipe`) < flags < `--set section.key=value`. They are validated once, before any data is read; "
             "`dyntie config show ...` prints the resolved settings of a command line. A bare `--set key=value` works "
             "when the key names exactly one setting.")
    lines = [GENERATED, "", "# Settings reference", "", intro, "", "## Top level", ""]
    lines += _section_table(RunSettings)
    for title, section in (("train", TrainSettings), ("ties", TieSettings), ("agent", AgentSettings)):
        lines += [f"## `{title}`", "", " ".join((section.__doc__ or "").split()), ""] + _section_table(section)
    lines += ["### Named agents", "", "`--agent NAME` (or `--set agent.preset=NAME`) starts the agent section from:",
              ""]
    for name, values in AgentSettings.PRESETS.items():
        shown = ", ".join(f"`{k}={v}`" for k, v in values.items()) or "the defaults above"
        lines.append(f"- `{name}`: {shown}")
    lines.append("")
    for name, registered in sorted(all_backbones().items()):
        cls = registered.cls
        if cls is None or registered.source != "dyntie":
            continue
        for title in ("model", "data"):
            section = getattr(cls, f"{title}_settings", None)
            if section is None:
                continue
            lines += [f"## `{title}` of `{name}`", "", " ".join((section.__doc__ or "").split()), ""]
            lines += _section_table(section)
        presets = ", ".join(f"`{p}`" for p in cls.presets)
        lines += [f"Presets of `{name}`: {presets} (`dyntie backbones {name}` describes them).", ""]
    return "\n".join(lines) + "\n"


PAGES = {"registry.md": registry_page, "cli.md": cli_page, "settings.md": settings_page}


USAGE = "usage: python -m dyntie_cli.reference [DOCS_FOLDER]  (rewrites registry.md, cli.md and settings.md there)"


def main() -> None:
    args = sys.argv[1:]
    if args and (args[0] in ("-h", "--help") or args[0].startswith("-") or len(args) > 1):
        print(USAGE)
        raise SystemExit(0 if args[0] in ("-h", "--help") else 2)
    docs = Path(args[0]) if args else Path(__file__).resolve().parents[1] / "docs"
    if not docs.is_dir():
        print(f"{docs} is not a folder; give the docs folder to write the reference pages into.")
        raise SystemExit(2)
    for name, page in PAGES.items():
        (docs / name).write_text(page())
        print(f"wrote {docs / name}")


if __name__ == "__main__":
    main()
