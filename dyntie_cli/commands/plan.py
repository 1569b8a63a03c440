"""`dyntie plan train|finetune ...`: a run's predicted peak memory, in parts, and whether it fits the device."""

from __future__ import annotations

from typing import Annotated

import typer

from .options import Format, TrainingOptions, training_options

plan_app = typer.Typer(help="Predict a run's peak memory (parts, per variant) and whether it fits the device.",
                       no_args_is_help=True)

VariantsOpt = Annotated[str | None, typer.Option(
    "--variants", help="Comma-separated variants to plan (default: no-tying and the run's own, dynamic unless "
                       "--variant says otherwise).")]


def _plan(backbone: str, opts: TrainingOptions, variants: str | None, fmt: str, expect: str,
          *extra: tuple[str, str]) -> None:
    import pandas as pd

    from ..core.loop import resolve_device, seed_everything
    from ..core.plan import plan_memory
    from ..report.tables import render
    from ..runner.settings_source import new_settings

    bb, settings = new_settings(backbone, opts.sources(*extra), expect=expect)
    names = [v.strip() for v in variants.split(",") if v.strip()] if variants else \
        list(dict.fromkeys(["no-tying", settings.variant]))
    device = resolve_device(settings.device)
    seed_everything(settings.seed)
    say = _progress(bool(opts.quiet))
    say(f"loading the data ({settings.dataset})")
    data = bb.load_data(settings)
    plans = plan_memory(bb, settings, data, device, names, say=say)
    rows = pd.DataFrame([p.to_dict() for p in plans])
    if fmt in ("json", "csv"):
        typer.echo(render(rows, fmt))
        return
    table = rows.set_index("variant").T.reset_index().rename(columns={"index": "quantity"})
    title = f"memory plan: {settings.backbone} {settings.preset} on {device} ({fit_words(plans, settings.variant)})"
    typer.echo(render(table, fmt, title=title))


def fit_words(plans, own: str) -> str:
    """Whether each variant fits, in words, the run's own variant ``own`` first: 'dynamic fits, no-tying does not
    fit' (one verdict for the whole plan would call a run that fits under its budget one that does not)."""
    words = {True: "fits", False: "does not fit", None: "fit unknown"}
    return ", ".join(f"{p.variant} {words[p.fits]}" for p in sorted(plans, key=lambda p: p.variant != own))


def _progress(quiet: bool):
    """What the plan is doing, a line on stderr at each part (measuring a large model takes minutes on a CPU)."""
    import time

    started = time.perf_counter()

    def say(text: str) -> None:
        if not quiet:
            typer.echo(f"plan: {text}... ({time.perf_counter() - started:.0f}s)", err=True)

    return say


@plan_app.command("train")
@training_options()
def plan_train(
    opts: TrainingOptions,
    backbone: Annotated[str, typer.Argument(help="Backbone (gpt2, vit, ...).")] = "gpt2",
    variants: VariantsOpt = None,
    fmt: Format = "table",
) -> None:
    """The peak memory `dyntie train BACKBONE ...` with these options would reach, split into parameters,
    gradients, optimizer state, activations and the process baseline, for conventional training and for dynamic
    tying at its budget, and whether each fits. Builds no model of the run's size: parameter counts come from the
    model on the meta device, activations from a copy with one and two real blocks.

    Example: dyntie plan train gpt2 --preset gpt2-wide-cpu --max-independent 8
    """
    _plan(backbone, opts, variants, fmt, "train")


@plan_app.command("finetune")
@training_options(exclude=("dataset",))
def plan_finetune(
    opts: TrainingOptions,
    benchmark: Annotated[str, typer.Argument(help="Backbone / benchmark (glue).")] = "glue",
    task: Annotated[str | None, typer.Option("--task", "-t", help="GLUE task.")] = None,
    variants: VariantsOpt = None,
    fmt: Format = "table",
) -> None:
    """The peak memory `dyntie finetune BENCHMARK ...` with these options would reach (see `plan train`).

    Example: dyntie plan finetune glue --task rte --preset bert-cpu
    """
    _plan(benchmark, opts, variants, fmt, "finetune", *([("dataset", task)] if task is not None else []))


def register(app: typer.Typer) -> None:
    app.add_typer(plan_app, name="plan")
