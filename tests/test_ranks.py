"""The Python API and the Trainer callback across ranks (torchrun, gloo on CPU) and through checkpoints: every
rank takes rank 0's decisions and ends with the same weights, two ranks train as one process does on the same
global batch, and a run stopped after a checkpoint continues with the decisions and weights of one never
stopped. The model and the loops are tests/ranks_program.py."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tests.conftest import rows
from tests.ranks_program import run_loop, run_trainer

PROGRAM = Path(__file__).with_name("ranks_program.py")


def _torchrun(*args, nproc: int = 2) -> None:
    env = os.environ | {"OMP_NUM_THREADS": "1", "PYTHONFAULTHANDLER": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
           str(PROGRAM), *map(str, args)]
    r = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600, check=False)
    assert r.returncode == 0, r.stderr[-6000:]


def _ranks(out: Path) -> list[dict]:
    return [json.loads(f.read_text()) for f in sorted(out.glob("rank-*.json"))]


def _same_on_every_rank(ranks: list[dict]) -> dict:
    first = ranks[0]
    assert len(ranks) == first["world"]
    for other in ranks[1:]:
        assert other["states"] == first["states"], "every rank applies rank 0's decisions"
        assert other["digest"] == first["digest"], "every rank ends with the same weights"
    assert len({tuple(s) for s in first["states"]}) > 2, "the ties changed during the run"
    return first


def _one_process(run, out: Path, monkeypatch, *args, **kwargs) -> dict:
    for name in ("WORLD_SIZE", "RANK", "LOCAL_RANK"):
        monkeypatch.delenv(name, raising=False)
    run(out, *args, **kwargs)
    return _ranks(out)[0]


def _mean_losses(ranks: list[dict]) -> list[float]:
    return [sum(values) / len(values) for values in zip(*(r["losses"] for r in ranks))]


def test_two_ranks_of_a_plain_loop_train_as_one_process_on_the_same_global_batch(tmp_path, monkeypatch):
    _torchrun("loop", tmp_path / "two", "--steps", 16)
    two = _ranks(tmp_path / "two")
    first = _same_on_every_rank(two)
    one = _one_process(run_loop, tmp_path / "one", monkeypatch, "random", 16)
    assert first["states"] == one["states"]
    assert _mean_losses(two) == pytest.approx(one["losses"], rel=1e-5)


def test_two_ranks_of_a_trainer_train_as_one_process_on_the_same_global_batch(tmp_path, monkeypatch):
    pytest.importorskip("accelerate")
    _torchrun("trainer", tmp_path / "two", "--steps", 16)
    two = _ranks(tmp_path / "two")
    first = _same_on_every_rank(two)
    assert first["wrapper"] == "DistributedDataParallel"  # the Trainer's own DDP wrapper, kept
    one = _one_process(run_trainer, tmp_path / "one", monkeypatch, "random", 16)
    assert first["states"] == one["states"]
    assert first["losses"] == pytest.approx(one["losses"], rel=1e-5)  # the Trainer's logged (gathered) losses


@pytest.mark.parametrize("variant", ["dynamic", "random"])
def test_dynamic_tying_continues_from_its_state_dict_as_if_never_stopped(tmp_path, monkeypatch, variant):
    # stopped at step 9: the decision of step 8 waits for the second loss of its reward interval
    whole = _one_process(run_loop, tmp_path / "whole", monkeypatch, variant, 16, db=str(tmp_path / "w.duckdb"))
    checkpoint = tmp_path / "checkpoint.pt"
    run_loop(tmp_path / "cut", variant, 16, stop_after=9, save=str(checkpoint), db=str(tmp_path / "c.duckdb"))
    assert torch.load(checkpoint, weights_only=False)["tying"]["loop"]["pending"]["losses"]
    run_loop(tmp_path / "cut", variant, 16, resume=str(checkpoint), db=str(tmp_path / "c.duckdb"))
    resumed = _ranks(tmp_path / "cut")[0]
    assert resumed["states"] == whole["states"] and resumed["actions"] == whole["actions"]
    assert resumed["losses"] == whole["losses"]
    assert resumed["digest"] == whole["digest"], "bit-identical weights after the resume"
    # one registry run, with the rows of the uninterrupted one (the rows unwritten at the stop came back)
    query = ("SELECT t.decision, t.step, t.state, d.reward FROM ties t LEFT JOIN decisions d USING (run_id, decision)"
             " ORDER BY t.decision")
    assert rows(tmp_path / "c.duckdb", query) == rows(tmp_path / "w.duckdb", query)
    metrics = "SELECT step, name, value FROM metrics WHERE split = 'train' ORDER BY step, name"
    assert rows(tmp_path / "c.duckdb", metrics) == rows(tmp_path / "w.duckdb", metrics)
    assert rows(tmp_path / "c.duckdb", "SELECT status FROM runs") == [("finished",)]


def test_a_trainer_resumed_from_its_checkpoint_makes_the_decisions_of_one_never_stopped(tmp_path, monkeypatch):
    pytest.importorskip("accelerate")
    whole = _one_process(run_trainer, tmp_path / "whole", monkeypatch, "dynamic", 16)
    with pytest.raises(SystemExit):  # dies at step 8; the last checkpoint is step 6's
        run_trainer(tmp_path / "cut", "dynamic", 16, stop_after=8)
    assert {p.name for p in (tmp_path / "cut" / "trainer").iterdir()} == {"checkpoint-6"}
    run_trainer(tmp_path / "cut", "dynamic", 16, resume=True)
    resumed = _ranks(tmp_path / "cut")[0]
    assert resumed["states"] == whole["states"] and resumed["actions"] == whole["actions"]
    assert resumed["losses"] == whole["losses"]
    assert resumed["digest"] == whole["digest"], "bit-identical weights after the resume"


@pytest.mark.slow
def test_two_ranks_of_a_trainer_killed_after_a_checkpoint_resume_as_never_stopped(tmp_path):
    _torchrun("trainer", tmp_path / "whole", "--steps", 16)
    _torchrun("trainer", tmp_path / "cut", "--steps", 16, "--stop-after", 8)
    _torchrun("trainer", tmp_path / "cut", "--steps", 16, "--resume")
    whole, resumed = _same_on_every_rank(_ranks(tmp_path / "whole")), _same_on_every_rank(_ranks(tmp_path / "cut"))
    assert (resumed["states"], resumed["digest"]) == (whole["states"], whole["digest"])
