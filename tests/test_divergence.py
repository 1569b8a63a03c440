"""A run whose loss or gradients stop being numbers stops as ``diverged``: one sentence naming the step and the likely
fix, the last good checkpoint kept (never one of NaN weights), no NaN taught to the agent."""

from __future__ import annotations

import math
import re
import shutil
from pathlib import Path

import torch
from safetensors.torch import load_file
from torch import nn

from dyntie_cli.core.checkpoint import load_trainer_state
from dyntie_cli.tying import DynamicTying
from tests.conftest import FIXTURES, invoke, rows


def _train(runner, tmp_path: Path, *args):
    db, out = tmp_path / "r.duckdb", tmp_path / "runs"
    result = invoke(runner, *args, "--db", db, "--out", out, "--quiet")
    (run_id,) = [r[0] for r in rows(db, "SELECT run_id FROM runs")]
    return result, db, out, run_id


def test_a_huge_learning_rate_stops_the_run_as_diverged_in_one_sentence(runner, tmp_path):
    result, db, out, run_id = _train(runner, tmp_path, "train", "gpt2", "--preset", "gpt2-tiny", "--max-steps", 20,
                                     "--set", "train.lr=1e9")
    assert result.exit_code == 1
    assert re.fullmatch(rf"Error: Run {run_id} diverged at step \d+: the training loss is nan; lower train\.lr "
                        r"\(now 1e\+09\) or check the data for NaN; it had no checkpoint yet\.\n", result.stderr), \
        result.stderr
    status, error = rows(db, "SELECT status, error FROM runs")[0]
    assert status == "diverged" and re.fullmatch(r"diverged at step \d+: the training loss is nan", error)
    # nothing to export, and nothing a resume could do but diverge again: both say so
    exported = invoke(runner, "export", run_id, "--out", tmp_path / "export", "--db", db)
    assert exported.exit_code == 1 and exported.stderr == (
        f"Error: Run {run_id} diverged (`dyntie report --table runs --run {run_id}` says where), so it has no "
        "trained model: train it again with a lower train.lr.\n")
    resumed = invoke(runner, "train", "--resume", run_id, "--db", db)
    assert resumed.exit_code == 1 and resumed.stderr == (
        f"Error: Run {run_id} {error}; a resume keeps its settings and would diverge again: train a new run with a "
        "lower train.lr (or data without NaN).\n")
    assert rows(db, "SELECT status, error FROM runs")[0] == (status, error)


def test_gradients_that_are_not_numbers_are_skipped_then_stop_the_run_with_its_last_good_checkpoint(runner, tmp_path):
    # unclipped, a learning rate of 100 overflows the gradient norm a few steps in, while the loss is still a number
    result, db, out, run_id = _train(runner, tmp_path, "train", "gpt2", "--preset", "gpt2-tiny", "--max-steps", 20,
                                     "--decide-every", 2, "--set", "train.lr=100", "--set", "train.grad_clip=0",
                                     "--set", "train.eval_every=2")
    assert result.exit_code == 1
    found = re.fullmatch(rf"Error: Run {run_id} diverged at step (\d+): the gradient norm was not finite for 3 steps "
                         r"in a row; lower train\.lr \(now 100\) or set train\.grad_clip; its last checkpoint "
                         r"\(step (\d+)\) is kept\.\n", result.stderr)
    assert found, result.stderr
    step, kept = int(found[1]), int(found[2])
    checkpoint = out / run_id / "checkpoint"
    assert load_trainer_state(checkpoint)["step"] == kept < step
    assert all(bool(torch.isfinite(t).all()) for t in load_file(checkpoint / "model.safetensors").values())
    rewards = [r[0] for r in rows(db, "SELECT reward FROM decisions WHERE reward IS NOT NULL")]
    assert rewards and all(math.isfinite(r) for r in rewards)
    assert rows(db, "SELECT status FROM runs")[0][0] == "diverged"


def test_nan_scores_in_the_data_stop_the_run_naming_the_data(runner, tmp_path):
    data = tmp_path / "glue"
    shutil.copytree(FIXTURES / "glue" / "STS-B", data / "STS-B")
    train = data / "STS-B" / "train.tsv"
    header, *lines = train.read_text().splitlines()
    train.write_text("\n".join([header, *(line.rsplit("\t", 1)[0] + "\tnan" for line in lines)]) + "\n")
    result, db, _, run_id = _train(runner, tmp_path, "finetune", "glue", "--task", "stsb", "--preset", "bert-tiny",
                                   "--data-dir", data, "--max-steps", 10)
    assert result.exit_code == 1
    assert result.stderr == (f"Error: Run {run_id} diverged at step 1: the training loss is nan; lower train.lr (now "
                             "0.001) or check the data for NaN; it had no checkpoint yet.\n"), result.stderr
    assert rows(db, "SELECT status FROM runs")[0][0] == "diverged"


def test_a_reward_that_is_not_a_number_is_not_taught_to_the_agent():
    blocks = [nn.Linear(4, 4) for _ in range(3)]
    optimizer = torch.optim.AdamW([p for b in blocks for p in b.parameters()])
    tying = DynamicTying(blocks, optimizer, total_steps=20, decide_every=2, agent_options={"reward_batch": "next"})
    agent = tying.policy.agent
    for loss in (3.0, 3.0, math.nan):  # a decision at step 2, rewarded by the loss of step 3: NaN
        tying.step(loss)
    assert len(agent.replay) == 0
    assert tying.log.decisions[-1]["reward"] is None and math.isnan(tying.log.decisions[-1]["ppl"])
    for loss in (3.0, 3.0):  # the next decision, at step 4, rewarded by a number
        tying.step(loss)
    assert len(agent.replay) == 1 and math.isfinite(tying.log.decisions[-1]["reward"])
    assert all(bool(torch.isfinite(p).all()) for p in agent.q.parameters())
