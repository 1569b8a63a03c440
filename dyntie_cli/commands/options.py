"""Options shared by every command that trains (DESIGN.md section 6), declared once."""

from __future__ import annotations

from typing import Annotated

import typer

Dataset = Annotated[str | None, typer.Option("--dataset", "-d", help="Dataset name, or text:PATH / "
                                                "imagefolder:PATH (see `dyntie backbones`).")]
Preset = Annotated[str | None, typer.Option("--preset", "-p", help="Named model + training preset.")]
Recipe = Annotated[str | None, typer.Option("--recipe", help="A TOML recipe file, or a packaged recipe name.")]
Sets = Annotated[list[str] | None, typer.Option("--set", help="Override any config key: --set train.lr=3e-4 "
                                                   "(repeatable).")]
Db = Annotated[str | None, typer.Option("--db", envvar="DYNTIE_DB", help="DuckDB registry file "
                                           "\\[default: ./dyntie.duckdb].")]
Out = Annotated[str | None, typer.Option("--out", help="Folder for checkpoints \\[default: ./runs].")]
Seed = Annotated[int | None, typer.Option("--seed", help="Random seed (data order, init, agent).")]
Device = Annotated[str | None, typer.Option("--device", help="cpu, cuda or auto.")]
MaxSteps = Annotated[int | None, typer.Option("--max-steps", help="Training steps.")]
DecideEvery = Annotated[int | None, typer.Option("--decide-every", "-k", help="A tie decision every K steps.")]
Variant = Annotated[str | None, typer.Option("--variant", help="dynamic (default), no-tying, random, "
                                                "static-all, static-sequence, static-cycle, static-cycle-rev.")]
Agent = Annotated[str | None, typer.Option("--agent", help="Agent setting: default, lean (about half the "
                                              "independent blocks of default, worse perplexity), or paper "
                                              "(the paper's exact agent).")]
Reward = Annotated[str | None, typer.Option("--reward", help="Reward shaping: relative (default), neg-log-ppl, "
                                                "or neg-ppl (the paper's raw -PPL).")]
MaxIndependent = Annotated[int | None, typer.Option("--max-independent", help="A hard budget: at most N "
                                                       "independent blocks (actions are masked; default agent: "
                                                       "8, 0 for no cap).")]
ParamPenalty = Annotated[float | None, typer.Option("--param-penalty", help="Subtract X times the fraction of "
                                                       "independent blocks from the reward.")]
TiedGrad = Annotated[str | None, typer.Option("--tied-grad", help="follow (paper: tied blocks get no weight "
                                                 "gradient) or sum (ALBERT-style).")]
DataDir = Annotated[str | None, typer.Option("--data-dir", help="Local copy of the dataset (offline use).")]
Quiet = Annotated[bool, typer.Option("--quiet", "-q", help="No progress bar or messages.")]
