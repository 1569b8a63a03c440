"""The loop API (``DynamicTying``) and the transformers callback: the examples of docs/python-api.md run as they
are printed there, on tiny models, and their tie logs obey Eq. 1 with storage matching state at every decision."""

from __future__ import annotations

import re
from itertools import pairwise
from pathlib import Path

import pytest
import torch

from dyntie_cli.core.ties import independent_count, transition
from dyntie_cli.errors import UsageError
from tests.conftest import invoke, rows

DOCS = Path(__file__).resolve().parents[1] / "docs" / "python-api.md"


def _examples() -> list[str]:
    return re.findall(r"```python\n(.*?)```", DOCS.read_text(), flags=re.DOTALL)


def _run_example(index: int, tmp_path, monkeypatch) -> dict:
    monkeypatch.chdir(tmp_path)
    code = _examples()[index]
    assert 20 <= len(code.strip().splitlines()) <= 40  # the docs' promise: a short, whole example
    namespace: dict = {"__name__": "__docs__"}
    exec(compile(code, str(DOCS), "exec"), namespace)  # noqa: S102 -- the documented example, verbatim
    return namespace


def _obeys_eq1(history) -> None:
    assert history[0].decision == 0
    for before, after in pairwise(history):
        assert after.decision == before.decision + 1
        assert after.state == transition(before.state, after.action)  # Eq. 1, from the logged action
    for row in history:
        assert row.distinct_block_weights == row.independent_layers == independent_count(row.state)
    assert any(a.state != b.state for a, b in pairwise(history)), "no decision changed the ties"


def _storage_matches_state(tying, model, optimizer) -> None:
    ties = tying.ties
    assert ties.distinct_block_weights() == ties.independent_layers
    for i, root in enumerate(ties.state):
        for mine, theirs in zip(ties.block_tensors(i), ties.block_tensors(root)):
            assert mine.untyped_storage().data_ptr() == theirs.untyped_storage().data_ptr()
    held = {id(p) for g in optimizer.param_groups for p in g["params"]}
    assert held == {id(p) for p in model.parameters()}  # the optimizer holds exactly what trains


def test_the_plain_loop_example_ties_by_eq1_and_records_the_run(tmp_path, monkeypatch):
    ns = _run_example(0, tmp_path, monkeypatch)
    tying = ns["tying"]
    assert len(tying.history) == 1 + (ns["steps"] - 1) // 5
    _obeys_eq1(tying.history)
    _storage_matches_state(tying, ns["model"], ns["optimizer"])
    db = tmp_path / "runs.duckdb"
    logged = rows(db, "SELECT state, action, distinct_block_weights FROM ties WHERE run_id = ? ORDER BY decision",
                  tying.run_id)
    assert logged == [(r.state, r.action, r.distinct_block_weights) for r in tying.history]
    assert rows(db, "SELECT status, command FROM runs") == [("finished", "api")]
    rewarded = rows(db, "SELECT count(*) FROM decisions WHERE run_id = ? AND reward IS NOT NULL", tying.run_id)
    assert rewarded[0][0] == len(tying.history) - 1
    from typer.testing import CliRunner

    report = invoke(CliRunner(), "report", "--table", "ties", "--db", db, "--format", "csv")
    assert report.exit_code == 0 and tying.run_id in report.stdout


def test_the_trainer_example_ties_by_eq1_inside_a_transformers_trainer(tmp_path, monkeypatch):
    pytest.importorskip("accelerate")
    ns = _run_example(1, tmp_path, monkeypatch)
    tying = ns["callback"].tying
    assert tying.loop.step == 40 and len(tying.history) == 1 + 39 // 5
    _obeys_eq1(tying.history)
    from transformers import GPT2LMHeadModel

    # materialize() made every block its own: the saved model is a plain GPT-2 with the trained weights
    saved = GPT2LMHeadModel.from_pretrained(tmp_path / "trainer-out" / "final").eval()
    model = ns["model"].eval()
    x = torch.arange(16)[None] % 64
    assert torch.equal(saved(input_ids=x).logits, model(input_ids=x).logits)


def test_loop_api_refuses_what_it_cannot_do_in_one_sentence():
    from dyntie_cli import DynamicTying

    blocks = [torch.nn.Linear(4, 4) for _ in range(3)]
    optimizer = torch.optim.SGD([p for b in blocks for p in b.parameters()], lr=0.1)
    with pytest.raises(UsageError, match="fresh_ppl"):
        DynamicTying(blocks, optimizer, total_steps=10, agent="paper")
    with pytest.raises(UsageError, match="must be one of follow, sum"):
        DynamicTying(blocks, optimizer, total_steps=10, tied_grad="both")
    with pytest.raises(UsageError, match="replays another run"):
        DynamicTying(blocks, optimizer, total_steps=10, variant="final-arch")


def test_the_optimizer_releases_tied_blocks_and_takes_untied_ones():
    from dyntie_cli import DynamicTying

    torch.manual_seed(0)
    blocks = torch.nn.ModuleList(torch.nn.Linear(4, 4) for _ in range(3))
    optimizer = torch.optim.AdamW(blocks.parameters(), lr=0.1)
    tying = DynamicTying(blocks, optimizer, total_steps=10, decide_every=2, variant="random", seed=3)
    assert tying.state == [0, 0, 0]
    assert sum(len(g["params"]) for g in optimizer.param_groups) == 2  # block 0 only
    x = torch.randn(5, 4)
    for _ in range(10):
        y = x
        for b in blocks:
            y = b(y)
        loss = y.pow(2).mean()
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        tying.step(loss)
        _storage_matches_state(tying, blocks, optimizer)
    tying.finish()
    _obeys_eq1(tying.history)
