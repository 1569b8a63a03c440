"""The `evidence` table: what the recorded rewards say about tie moves, the evidence an agent can learn from.

Runs are grouped by what makes their decisions comparable (backbone, number of blocks, training steps and decision
cadence, so that decision n of one run sits at the same point of training as decision n of another) and by the
reward (column ``reward``): the shaped reward the runs' policy learned from (``relative on interval``: the agent's
``reward`` on its ``reward_batch``), and each reward the runs probed on the same decisions without acting on it
(``agent.reward_probes``: ``-log ppl on fresh``, ``-log ppl on heldout`` ...; the acting kind too where it is listed),
fitted as -log of the perplexity it recorded, so every kind is on one scale. In each group, every scored decision is
one observation, and the reward is fitted by least squares as

    reward = level[decision] + untie_effect * (blocks it untied) + tie_effect * (blocks it tied) + noise

with one free level per decision index, so that what training progress does to the reward (far larger than what a
tie does) is taken out before the moves are credited. ``untie_se`` and ``tie_se`` are the usual standard errors,
``reward_noise_sd`` the residual standard deviation: how much a single decision's reward varies that no move and no
point of training explains. An effect within about two standard errors of 0 is one the rewards do not settle.
"""

from __future__ import annotations

import json
import math
from typing import Any

import duckdb
import numpy as np

from dyntie_cli.lazy_import import pandas as pd
from dyntie_cli.results.db import IN_RUNS
from dyntie_cli.settings import AgentSettings

COLUMNS = ["backbone", "blocks", "steps", "decide_every", "reward", "runs", "transitions", "untie_effect",
           "untie_se", "untie_t", "tie_effect", "tie_se", "reward_noise_sd"]


def evidence_table(con: duckdb.DuckDBPyConnection, ids: list[str]) -> pd.DataFrame:
    rows = con.execute(f"""
        WITH t AS (
            SELECT run_id, decision, state, lag(state) OVER (PARTITION BY run_id ORDER BY decision) AS before
            FROM ties WHERE {IN_RUNS}),
        scored AS (
            SELECT run_id, decision, NULL AS kind, reward FROM decisions
            WHERE {IN_RUNS} AND reward IS NOT NULL
            UNION ALL
            -- a probe's rows sit at the step its decision's last kind was scored, beside reward/decision
            SELECT p.run_id, CAST(d.value AS INTEGER), substr(p.name, 5), -ln(p.value)
            FROM metrics p JOIN metrics d ON d.run_id = p.run_id AND d.step = p.step AND d.split = 'reward'
                AND d.name = 'decision'
            WHERE p.{IN_RUNS} AND p.split = 'reward' AND starts_with(p.name, 'ppl_'))
        SELECT s.run_id, r.backbone, r.config, s.decision, s.kind, s.reward, t.state, t.before
        FROM scored s JOIN t ON t.run_id = s.run_id AND t.decision = s.decision JOIN runs r ON r.run_id = s.run_id
        WHERE s.decision > 0 AND t.before IS NOT NULL
        ORDER BY s.run_id, s.decision, s.kind NULLS FIRST""", {"ids": ids}).fetchall()
    groups: dict[tuple, list[tuple]] = {}
    for run_id, backbone, config, decision, kind, reward, state, before in rows:
        cfg = json.loads(config) if isinstance(config, str) else config
        key = (backbone, len(state), int(cfg["train"]["max_steps"]), int(cfg["ties"]["decide_every"]),
               _acting(cfg) if kind is None else f"-log ppl on {kind}")
        untied = sum(s == i and b != i for i, (s, b) in enumerate(zip(state, before)))
        tied = sum(s != i and b == i for i, (s, b) in enumerate(zip(state, before)))
        groups.setdefault(key, []).append((run_id, decision, float(reward), untied, tied))
    table = [_fit(key, obs) for key, obs in sorted(groups.items())]
    return pd.DataFrame(table, columns=COLUMNS)


def _acting(cfg: dict[str, Any]) -> str:
    """The reward a run's policy learned from, as the evidence table names it: ``relative on interval``."""
    agent = {**AgentSettings.legacy_values(), **(cfg.get("agent") or {})}
    shape = agent.get("reward", AgentSettings.model_fields["reward"].default)
    return f"{shape} on {agent['reward_batch']}"


def _fit(key: tuple, obs: list[tuple]) -> list[Any]:
    """One group's row: the least-squares effects of a newly untied and a newly tied block, with their standard
    errors, over one level per decision index."""
    decisions = sorted({d for _, d, *_ in obs})
    index = {d: n for n, d in enumerate(decisions)}
    levels = np.zeros((len(obs), len(decisions)))
    levels[np.arange(len(obs)), [index[d] for _, d, *_ in obs]] = 1.0
    reward = np.array([r for _, _, r, _, _ in obs])
    moves = {"untie": np.array([u for *_, u, _ in obs], float), "tie": np.array([t for *_, t in obs], float)}
    # a move no decision made has no effect to estimate: it is left out of the fit (NaN)
    used = [name for name, x in moves.items() if x.any()]
    design = np.column_stack([levels] + [moves[name] for name in used])
    coef, *_ = np.linalg.lstsq(design, reward, rcond=None)
    rank = np.linalg.matrix_rank(design)
    dof = len(reward) - rank
    resid = reward - design @ coef
    sigma = math.sqrt(float(resid @ resid) / dof) if dof > 0 else math.nan
    cov = np.linalg.pinv(design.T @ design) * sigma**2 if dof > 0 else None
    fit: dict[str, tuple[float, float]] = {}
    if rank < design.shape[1]:  # the moves coincide with decision levels (one run, say): nothing to separate
        used = []
    for n, name in enumerate(used):
        col = len(decisions) + n
        se = math.sqrt(float(cov[col, col])) if cov is not None else math.nan
        fit[name] = (float(coef[col]), se)
    untie, untie_se = fit.get("untie", (math.nan, math.nan))
    tie, tie_se = fit.get("tie", (math.nan, math.nan))
    t = untie / untie_se if untie_se and not math.isnan(untie_se) else math.nan
    return [*key, len({run for run, *_ in obs}), len(obs), untie, untie_se, t, tie, tie_se, sigma]
