"""`dyntie ablate --variant V [--from-run R]`: the paper's ablations and the baselines a reviewer asks for."""

from __future__ import annotations

from typing import Annotated

import typer

from ..variants import ABLATIONS
from .options import Resume, TrainingOptions, examples, training_options
from .train import resume_run


@training_options(exclude=("variant",))
def ablate(
    opts: TrainingOptions,
    variant: Annotated[str | None, typer.Option("--variant", help=f"{', '.join(ABLATIONS)}.",
                                                show_default=False)] = None,
    from_run: Annotated[str | None, typer.Option("--from-run", help="The dynamic run to ablate: its "
                                                    "data, seed, steps and hyperparameters are reused "
                                                    "\\[default: the newest finished dynamic run, of "
                                                    "gpt2 when there is one].")] = None,
    backbone: Annotated[str | None, typer.Option("--backbone", help="Without --from-run: train a variant "
                                                    "that needs no source (no-tying, random, static-*) from "
                                                    "this backbone's preset; final-arch and replay start from "
                                                    "its newest finished dynamic run.")] = None,
    resume: Resume = None,
) -> None:
    """Train ablation variant V of a dynamic run, as a new run linked to it.

    The variant keeps its source run's data, seed, steps and hyperparameters unless overridden and records the
    source as its parent_run_id, so `dyntie report --table paper` can set them side by side. Without --from-run the source is the newest finished dynamic run in the registry: of --backbone when given, else of gpt2 when there is one (the main job, whatever GLUE or ViT runs came after it), else of any backbone; the command says which.

    What a variant resolves from the source is written into the new run's settings: the number of independent
    blocks of a static scheme (ties.independent; --independent N sets it, default the source run's mean,
    rounded half up, else L/4), grow's target (--independent N, default the source run's final count, else the
    agent's budget) and the replay permutation's seed (ties.perm_seed).
    """
    from ..core.loop import Job
    from ..errors import UsageError
    from ..experiments.ablation import ablation_job, check_ablation_arguments, choose_source
    from ..runner.jobs import run_job
    from ..runner.settings_source import new_settings

    if resume is not None:
        if from_run or backbone:
            raise UsageError("--resume continues a run from its own source and settings: drop --from-run and "
                             "--backbone.")
        if variant is not None:
            from ..results.lineage import load_run

            recorded = load_run(opts.launch().db, resume)
            if recorded.variant != variant:
                raise UsageError(f"Run {recorded.run_id} is a {recorded.variant} run, not {variant}: drop --variant "
                                 "to resume it.")
        resume_run(opts, resume)
        return
    if variant is None:
        raise UsageError("Name the ablation with --variant V (or continue a stopped one with --resume RUN).")
    check_ablation_arguments(variant, opts.independent)
    launch = opts.launch()
    source = choose_source(launch.db, variant, from_run, backbone)
    if source is None:
        bb, settings = new_settings(backbone, opts.sources(("variant", variant)))
        run_job(bb, Job(settings, "ablate"), launch)
        return
    if opts.preset or opts.recipe:
        flag = "--preset" if opts.preset else "--recipe"
        raise UsageError(f"{flag} cannot be combined with a source run: an ablation keeps its source run's model "
                         "and settings (change single settings with --set; --backbone NAME without --from-run "
                         "trains a variant from a preset).")
    notes: list[str] = []
    bb, job = ablation_job(launch.db, source, variant, [opts.flag_pairs(), opts.set_pairs()], notes=notes)
    if backbone and backbone != job.settings.backbone:
        raise UsageError(f"--backbone {backbone} differs from the source run's {job.settings.backbone}; "
                         "drop --backbone.")
    if source != from_run and not opts.quiet:
        typer.echo(f"ablate: from {source}, the newest finished dynamic {job.settings.backbone} run in {launch.db} "
                   "(--from-run RUN picks another)", err=True)
    if not opts.quiet:
        for note in notes:
            typer.echo(note, err=True)
    run_job(bb, job, launch)


def register(app: typer.Typer) -> None:
    app.command("ablate", epilog=examples(
        "dyntie ablate --variant final-arch", "dyntie ablate --variant no-tying --from-run RUN",
        "dyntie ablate --variant static-cycle --backbone gpt2 --independent 4",
        "dyntie ablate --variant grow --from-run RUN --set ties.grow_until=0.3",
        "dyntie ablate --resume RUN"))(ablate)
