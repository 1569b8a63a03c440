"""`dyntie generate RUN --prompt TEXT`: sampled continuations from a language model run's last checkpoint, through
the backbone contract (``Backbone.generates_text``, ``Backbone.continuations``)."""

from __future__ import annotations

from typing import Annotated

import typer

from .options import Db

#: the longest continuation: far past the context of the models dyntie trains (it is cropped to their positions),
#: a few minutes of a CPU model, not hours with nothing shown
MAX_NEW_TOKENS = 2048
MAX_SAMPLES = 64


def generate(
    run: Annotated[str, typer.Argument(help="A run of a backbone that generates text, such as gpt2 (its id, or a "
                                            "unique prefix).")],
    prompt: Annotated[str, typer.Option("--prompt", "-p", help="The text to continue.")],
    max_new_tokens: Annotated[int, typer.Option("--max-new-tokens", "-n", min=1, max=MAX_NEW_TOKENS,
                                                help="Tokens per continuation.")] = 40,
    samples: Annotated[int, typer.Option("--samples", "-k", min=1, max=MAX_SAMPLES,
                                         help="How many continuations.")] = 3,
    temperature: Annotated[float, typer.Option("--temperature", "-t", min=0.0, help="Sampling temperature "
                                                                                    "(0: greedy).")] = 0.8,
    top_k: Annotated[int, typer.Option("--top-k", min=0, help="Sample among the k likeliest tokens (0: "
                                                              "all).")] = 50,
    seed: Annotated[int, typer.Option("--seed", min=0, max=2**31 - 1, help="Seed of the sampling.")] = 0,
    db: Db = None,
) -> None:
    """Print SAMPLES continuations of PROMPT sampled from RUN's last checkpoint (finished, killed or still
    running), decoded with the run's own tokenizer: the quickest look at what a language model learned. Each is
    printed as soon as it is sampled.
    """
    import torch

    from ..errors import UsageError
    from ..export import load_run_model
    from ..plugins import all_backbones, get_backbone
    from ..results.db import resolve_db_path
    from ..results.lineage import load_run

    db_path = resolve_db_path(db)
    recorded = load_run(db_path, run)
    if not get_backbone(recorded.backbone).generates_text:
        able = [name for name, found in sorted(all_backbones().items()) if found.cls and found.cls.generates_text]
        raise UsageError(f"Run {recorded.run_id} is a {recorded.backbone} run, which does not generate text; "
                         f"generate works with runs of: {', '.join(able) or 'no installed backbone'}.")
    rm = load_run_model(db_path, recorded.run_id)
    generator = torch.Generator().manual_seed(seed)
    for i in range(1, samples + 1):  # one at a time, each shown when it is done
        text, = rm.backbone.continuations(rm.model, rm.data, prompt, max_new_tokens=max_new_tokens, samples=1,
                                          temperature=temperature, top_k=top_k, generator=generator)
        typer.echo(f"--- sample {i}")
        typer.echo(prompt + text)


def register(app: typer.Typer) -> None:
    app.command("generate", epilog='Example: dyntie generate RUN --prompt "The history of" --samples 3')(generate)
