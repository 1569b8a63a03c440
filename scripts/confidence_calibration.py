"""How often does the advantage agent act when untying pays nothing, and how often when it pays?

The knowledge is a real study's transitions (the states and actions its runs took, read from the registry) with
their rewards replaced by a known model: the study's mean reward at each decision index (what training progress
does) plus ``effect`` for every block a decision newly unties, plus Gaussian noise of the study's own size (the
spread of its rewards around those means). An advantage agent warm-started from that knowledge then makes a
run's decisions on ``--blocks`` blocks under the same reward model, once per ``--confidence``, and the script
counts the realisations (fresh noise each) in which its decisions differ from its own ``q-off`` run: with
``effect`` 0 that is how often it acts on noise, with an effect, how often it finds it.

First it prints what the study's real rewards teach an agent of each ``--seeds`` seed: at an all-tied state of
``--blocks`` blocks, after the warm start, an untied block's advantage over keeping (the heads' mean, averaged over
rows), its spread over heads, and how many rows clear one and two standard deviations.

Usage: python scripts/confidence_calibration.py --db adv.duckdb --study knowledge12
           [--effects 0,0.025] [--confidence 1,2] [--realisations 12] [--blocks 48] [--decisions 30]
           [--seeds 0,1,2]
"""

from __future__ import annotations

import argparse
import statistics
from collections import defaultdict
from pathlib import Path

import numpy as np
import torch

from dyntie_cli.core.agent import QAgent
from dyntie_cli.core.ties import all_tied, independent_count, transition
from dyntie_cli.results.db import read_registry
from dyntie_cli.results.lineage import agent_knowledge
from dyntie_cli.settings import AgentSettings


def study_runs(db: Path, study: str) -> tuple[str, str]:
    """The finished runs of a study that recorded rewards, and their backbone."""
    with read_registry(db) as con:
        rows = con.execute("SELECT r.run_id, r.backbone FROM runs r WHERE r.status = 'finished' "
                           "AND json_extract_string(r.config, '$.study.name') = ? AND EXISTS (SELECT 1 FROM "
                           "decisions d WHERE d.run_id = r.run_id AND d.reward IS NOT NULL) ORDER BY r.run_id",
                           [study]).fetchall()
    if not rows:
        raise SystemExit(f"Study {study} has no finished run with rewards in {db}.")
    return ",".join(r[0] for r in rows), rows[0][1]


def untied(state: list[int], next_state: list[int]) -> int:
    return max(independent_count(next_state) - independent_count(state), 0)


def reward_model(transitions: list[tuple]) -> tuple[dict[float, float], float]:
    """Mean reward per progress point (the decision index) and the spread of the rewards around it."""
    by_progress: dict[float, list[float]] = defaultdict(list)
    for _, _, r, _, p, _ in transitions:
        by_progress[round(p, 6)].append(r)
    level = {p: statistics.fmean(rs) for p, rs in by_progress.items()}
    residuals = [r - level[round(p, 6)] for _, _, r, _, p, _ in transitions]
    return level, float(np.std(residuals, ddof=len(level)))


def level_at(level: dict[float, float], progress: float) -> float:
    """The level at the recorded progress point nearest to ``progress`` (the runs' decision cadence may differ)."""
    return level[min(level, key=lambda p: abs(p - progress))]


def warm_advantage(transitions: list[tuple], blocks: int, seed: int, decisions: int) -> str:
    """An agent warm-started from ``transitions``: what it values untying at an all-tied state, first decision."""
    agent = QAgent(blocks, AgentSettings.from_preset("advantage", seed=seed), total_decisions=decisions)
    agent.warm_start(transitions)
    with torch.no_grad():
        _, adv, mean = agent.q.head_values(torch.tensor([all_tied(blocks)]), torch.tensor([1 / decisions]))
    rows = list(range(1, blocks))
    m, sd = mean[0][rows, rows], adv[0][:, rows, rows].std(0)
    return (f"agent seed {seed}: untie advantage {float(m.mean()):+.4f}, spread {float(sd.mean()):.4f}; rows "
            f"clearing one sd {int((m - sd > 0).sum())}, two sd {int((m - 2 * sd > 0).sum())} of {blocks - 1}")


def run(agent: QAgent, blocks: int, decisions: int, level, noise: np.ndarray, effect: float) -> list[list[int]]:
    state, actions = all_tied(blocks), []
    for d in range(decisions - 1):
        p, p2 = (d + 1) / decisions, (d + 2) / decisions
        action = agent.act(state, p).action
        nxt = transition(state, action)
        agent.update(state, action, level_at(level, p) + effect * untied(state, nxt) + noise[d], nxt, p, p2)
        actions.append(action)
        state = nxt
    return actions


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--db", type=Path, required=True)
    ap.add_argument("--study", required=True, help="the study whose transitions are the knowledge")
    ap.add_argument("--effects", default="0,0.025", help="reward per newly untied block, comma-separated")
    ap.add_argument("--confidence", default="1,2", help="agent.confidence values, comma-separated")
    ap.add_argument("--realisations", type=int, default=12)
    ap.add_argument("--blocks", type=int, default=48)
    ap.add_argument("--decisions", type=int, default=30)
    ap.add_argument("--seeds", default="0,1,2", help="agent seeds for the warm start on the real rewards")
    args = ap.parse_args()
    torch.set_num_threads(1)

    ids, backbone = study_runs(args.db, args.study)
    knowledge = agent_knowledge(args.db, ids, "", backbone)["transitions"]
    level, sd = reward_model(knowledge)
    print(f"{len(knowledge)} transitions of study {args.study}; reward noise around the per-decision mean: {sd:.4f}")
    for seed in (int(x) for x in args.seeds.split(",")):
        print("real rewards,", warm_advantage(knowledge, args.blocks, seed, args.decisions), flush=True)
    confidences = [float(c) for c in args.confidence.split(",")]

    q_off: dict[int, list[list[int]]] = {}  # q-off's actions do not depend on the rewards: one run per seed
    for effect in (float(e) for e in args.effects.split(",")) if args.realisations else ():
        acted = {c: 0 for c in confidences}
        for k in range(args.realisations):
            rng = np.random.default_rng(k)  # the same noise for every effect: paired realisations
            made = [(s, a, level[round(p, 6)] + effect * untied(s, s2) + rng.normal(0, sd), s2, p, p2)
                    for s, a, _, s2, p, p2 in knowledge]
            noise = rng.normal(0, sd, args.decisions)
            if k not in q_off:
                off = QAgent(args.blocks, AgentSettings.from_preset("advantage", seed=k, use_q=False),
                             total_decisions=args.decisions)
                q_off[k] = run(off, args.blocks, args.decisions, level, noise, 0.0)
            for c in confidences:
                agent = QAgent(args.blocks, AgentSettings.from_preset("advantage", seed=k, confidence=c),
                               total_decisions=args.decisions)
                agent.warm_start(made)
                differ = sum(a != b for a, b in zip(run(agent, args.blocks, args.decisions, level, noise, effect),
                                                    q_off[k]))
                acted[c] += differ > 0
                print(f"effect {effect:+.4f} realisation {k:2d} confidence {c:g}: "
                      f"{differ} of {args.decisions - 1} decisions differ from q-off", flush=True)
        for c in confidences:
            print(f"effect {effect:+.4f}, confidence {c:g}: acted on {acted[c]} of {args.realisations} realisations")


if __name__ == "__main__":
    main()
