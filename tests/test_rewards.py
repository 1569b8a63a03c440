"""The rewards a decision can be scored on: interval, next, fresh and the held-out slice, acted on or only probed
(``agent.reward_probes``), and the backbones that cannot serve a held-out slice."""

from __future__ import annotations

import json

import pytest

from dyntie_cli import DynamicTying
from dyntie_cli.errors import UsageError
from tests.conftest import FIXTURES, invoke, rows

TINY = ("train", "gpt2", "--preset", "gpt2-tiny", "--max-steps", "24", "--decide-every", "4", "--quiet")


def _run(runner, tmp_path, name: str, *extra) -> tuple:
    db = tmp_path / f"{name}.duckdb"
    r = invoke(runner, *TINY, "--db", db, "--out", tmp_path / name, *extra)
    assert r.exit_code == 0, r.stderr
    return db, rows(db, "SELECT run_id FROM runs")[0][0]


def _probes(db, run_id) -> dict[int, dict[str, tuple[int, float]]]:
    """decision -> probe kind -> (step of the row, perplexity)."""
    decision_at = dict(rows(db, "SELECT step, CAST(value AS INTEGER) FROM metrics WHERE run_id = ? AND "
                                "split = 'reward' AND name = 'decision'", run_id))
    out: dict[int, dict[str, tuple[int, float]]] = {}
    for step, name, value in rows(db, "SELECT step, name, value FROM metrics WHERE run_id = ? AND split = 'reward' "
                                      "AND name LIKE 'ppl\\_%' ESCAPE '\\'", run_id):
        out.setdefault(decision_at[step], {})[name[4:]] = (step, value)
    return out


def _training(db, run_id) -> dict[str, list]:
    return {
        "ties": rows(db, "SELECT decision, step, state FROM ties WHERE run_id = ? ORDER BY decision", run_id),
        "decisions": rows(db, "SELECT decision, reward, ppl FROM decisions WHERE run_id = ? ORDER BY decision",
                          run_id),
        "train": rows(db, "SELECT step, name, value FROM metrics WHERE run_id = ? AND split IN ('train', "
                          "'validation', 'test') AND name IN ('loss', 'ppl') ORDER BY ALL", run_id),
    }


def test_probes_score_every_decision_without_changing_the_run(runner, tmp_path):
    plain_db, plain = _run(runner, tmp_path, "plain")
    db, probed = _run(runner, tmp_path, "probed", "--set", "agent.reward_probes=interval,fresh,next")
    # the probes draw nothing from the training stream and act on nothing: the same run
    assert _training(db, probed) == _training(plain_db, plain)
    scores = _probes(db, probed)
    decisions = rows(db, "SELECT decision, step, ppl FROM decisions WHERE run_id = ? ORDER BY decision", probed)
    assert sorted(scores) == [d for d, _, _ in decisions] == list(range(1, 6))
    for decision, step, ppl in decisions:
        kinds = scores[decision]
        assert set(kinds) == {"interval", "fresh", "next"}
        assert kinds["interval"] == (step + 4, ppl)  # the acting kind probed: the reward it acted on
        assert {s for s, _ in kinds.values()} == {step + 4}  # logged together, when the last was scored
        assert kinds["fresh"][1] != kinds["next"][1]


def test_a_heldout_reward_scores_the_same_slice_at_the_end_of_each_interval(runner, tmp_path):
    db, run = _run(runner, tmp_path, "heldout", "--set", "agent.reward_batch=heldout", "--set",
                   "data.heldout_tokens=512", "--set", "agent.reward_probes=heldout,interval")
    decisions = rows(db, "SELECT decision, step, ppl FROM decisions WHERE run_id = ? ORDER BY decision", run)
    scores = _probes(db, run)
    assert len(decisions) == 5
    for decision, step, ppl in decisions:
        assert scores[decision]["heldout"] == (step + 4, ppl)  # what the agent learned from, after k steps
        assert scores[decision]["heldout"][1] != scores[decision]["interval"][1]
    rewards = rows(db, "SELECT step, value FROM metrics WHERE run_id = ? AND split = 'reward' AND name = 'ppl' "
                       "ORDER BY step", run)
    assert rewards == [(step + 4, ppl) for _, step, ppl in decisions]
    assert json.loads(rows(db, "SELECT config FROM runs")[0][0])["data"]["heldout_tokens"] == 512
    # a run that does not use the slice trains on all of train: another run
    plain_db, plain = _run(runner, tmp_path, "plain")
    assert _training(db, run)["ties"][0] == _training(plain_db, plain)["ties"][0]
    assert _training(db, run)["train"] != _training(plain_db, plain)["train"]


@pytest.mark.parametrize("command", [
    ("train", "vit", "--preset", "vit-tiny", "--dataset", "digits"),
    ("finetune", "glue", "--task", "rte", "--preset", "bert-tiny", "--data-dir", FIXTURES / "glue"),
])
def test_a_backbone_without_a_heldout_slice_refuses_the_heldout_reward_in_one_sentence(runner, tmp_path, command):
    r = invoke(runner, *command, "--max-steps", "4", "--db", tmp_path / "r.duckdb", "--out", tmp_path / "runs",
               "--quiet", "--set", "agent.reward_probes=heldout")
    assert r.exit_code == 1 and "has no held-out slice" in r.stderr, r.stderr
    assert len(r.stderr.strip().splitlines()) == 1 and "Traceback" not in r.stderr


def test_the_python_api_asks_for_a_heldout_scorer(tmp_path):
    import torch

    blocks = [torch.nn.Linear(4, 4) for _ in range(3)]
    optimizer = torch.optim.AdamW([p for b in blocks for p in b.parameters()])
    with pytest.raises(UsageError, match="pass heldout_ppl"):
        DynamicTying(blocks, optimizer, total_steps=20, agent_options={"reward_batch": "heldout"})
    tying = DynamicTying(blocks, optimizer, total_steps=20, decide_every=4, heldout_ppl=lambda: 7.0,
                         agent_options={"reward_batch": "heldout"})
    for _ in range(20):
        tying.step(1.0)
    tying.finish()
    assert [row["ppl"] for row in tying.log.decisions] == [7.0] * 4
