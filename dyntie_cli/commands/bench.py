"""`dyntie bench`: conventional training and dynamic tying side by side, each variant in its own process."""

from __future__ import annotations

from typing import Annotated

import typer

from ..variants import BASELINE, METHOD
from .options import Format, TrainingOptions, examples, training_options

# final-arch: the dynamic run's final state fixed from step 0, its twin at equal steps; dynamic / final-arch shows
# what the tie machinery itself costs per step
DEFAULT_VARIANTS = f"{BASELINE},{METHOD},final-arch"


@training_options(exclude=("variant",))
def bench(
    opts: TrainingOptions,
    backbone: Annotated[str, typer.Argument(help="Backbone to benchmark.")] = "gpt2",
    variants: Annotated[str, typer.Option("--variants", help="Comma-separated: no-tying, dynamic, final-arch, "
                                          "random, static-*, each with any memory savers added with + "
                                          "(checkpointing, adamw8bit, adafactor, galore, apollo: "
                                          "dynamic+checkpointing+adamw8bit). Plain no-tying is the baseline of the "
                                          "ratios; final-arch, the dynamic run's final state from step 0, its "
                                          "twin.")]
    = DEFAULT_VARIANTS,
    repeat: Annotated[int, typer.Option("--repeat", help="Run the set N times and report medians over the rounds "
                                        "(one at a time, the order reversed every other round).")] = 1,
    one_at_a_time: Annotated[bool, typer.Option("--one-at-a-time", help="Train the variants one after another "
                                                "instead of in turns: memory for one run at a time, but a machine "
                                                "whose speed drifts between runs skews their step-time "
                                                "ratios.")] = False,
    fmt: Format = "table",
) -> None:
    """Train variants side by side and print their speed and memory as ratios to no-tying.

    Each variant trains on the same data, seed and steps, in a process of its own (a clean peak memory), and is
    recorded as a run (command 'bench'). The processes train in turns, one step of each at a time while the others
    wait, so every variant is timed on the same machine minutes; final-arch, which needs the dynamic run's end,
    trains afterwards in turns beside a rerun of the dynamic run, through which its speed is compared. The ratios:
    peak memory, parameter / gradient / optimizer bytes, trainable parameters, tokens/s, median step time,
    validation perplexity, agent share.
    """
    from ..core.distributed import Group
    from ..errors import UsageError
    from ..experiments.bench import run_bench
    from ..report.tables import render
    from ..results.bench import bench_title
    from ..results.queries import run_query
    from .report import terminal_width

    if repeat < 1:
        raise UsageError("--repeat must be at least 1 (the number of times the set of variants runs).")
    if Group.from_env().active:
        raise UsageError("Run `dyntie bench` as one process, without torchrun: it starts one process per variant.")
    names = [v.strip() for v in variants.split(",") if v.strip()]
    launch = opts.launch()
    say = (lambda text: None) if opts.quiet else (lambda text: typer.echo(text, err=True))
    done = run_bench(backbone, opts.sources(), launch, names, repeat=repeat, in_turns=not one_at_a_time, say=say)
    for v, result in done.refused.items():
        plan = result["plan"]
        typer.echo(f"{v}: does not fit: predicted {plan['peak_bytes'] / 2**30:.1f} GiB > "
                   f"{(plan['available_bytes'] or 0) / 2**30:.1f} GiB available (not trained; `dyntie plan` shows the "
                   "parts)")
    if done.run_ids:
        table = run_query("bench", launch.db, done.run_ids)
        width = terminal_width() if fmt == "table" else None
        typer.echo(render(table, fmt, title=bench_title(repeat), width=width))


def register(app: typer.Typer) -> None:
    app.command("bench", epilog=examples("dyntie bench gpt2 --preset gpt2-deep-cpu --max-steps 300 --repeat 2"))(bench)
