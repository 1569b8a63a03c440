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
    assert first["averaged"] == 16  # one average per backward pass
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


def test_a_trainer_accumulating_gradients_rewards_the_mean_loss_of_the_whole_step(tmp_path, monkeypatch):
    # with num_items_in_batch each micro-batch's loss is its share of the step's: the reward adds the shares
    pytest.importorskip("accelerate")
    whole = _one_process(run_trainer, tmp_path / "whole", monkeypatch, "random", 8)
    halves = _one_process(run_trainer, tmp_path / "halves", monkeypatch, "random", 8, accumulate=2)
    assert halves["rewards"] == pytest.approx(whole["rewards"], rel=1e-5, abs=1e-6)
    assert halves["losses"] == pytest.approx(whole["losses"], rel=1e-5)


@pytest.mark.slow
def test_two_ranks_of_a_plain_loop_accumulating_under_no_sync_average_once_a_step(tmp_path, monkeypatch):
    _torchrun("loop", tmp_path / "two", "--steps", 16, "--accumulate", 2)
    two = _ranks(tmp_path / "two")
    first = _same_on_every_rank(two)
    assert first["averaged"] == 16, "the pass under no_sync accumulates without averaging"
    one = _one_process(run_loop, tmp_path / "one", monkeypatch, "random", 16)
    assert first["states"] == one["states"]
    assert _mean_losses(two) == pytest.approx(one["losses"], rel=1e-5)


@pytest.mark.slow
def test_two_ranks_of_a_trainer_accumulating_gradients_train_as_one_process(tmp_path, monkeypatch):
    _torchrun("trainer", tmp_path / "two", "--steps", 16, "--accumulate", 2)
    first = _same_on_every_rank(_ranks(tmp_path / "two"))
    one = _one_process(run_trainer, tmp_path / "one", monkeypatch, "random", 16)
    assert first["states"] == one["states"]
    assert first["rewards"] == pytest.approx(one["rewards"], rel=1e-5, abs=1e-6)
    assert first["losses"] == pytest.approx(one["losses"], rel=1e-5)


@pytest.mark.slow
def test_two_ranks_of_a_trainer_killed_after_a_checkpoint_resume_as_never_stopped(tmp_path):
    _torchrun("trainer", tmp_path / "whole", "--steps", 16)
    _torchrun("trainer", tmp_path / "cut", "--steps", 16, "--stop-after", 8)
    _torchrun("trainer", tmp_path / "cut", "--steps", 16, "--resume")
    whole, resumed = _same_on_every_rank(_ranks(tmp_path / "whole")), _same_on_every_rank(_ranks(tmp_path / "cut"))
    assert (resumed["states"], resumed["digest"]) == (whole["states"], whole["digest"])


_FSDP_BLOCKS = """
import os, torch.distributed as dist
from torch import nn
from torch.distributed.fsdp import fully_shard
from dyntie_cli import DynamicTying
from dyntie_cli.errors import UsageError
os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=os.environ["PORT"])
dist.init_process_group("gloo", rank=0, world_size=1)
blocks = nn.ModuleList(nn.Linear(4, 4) for _ in range(3))
optimizer = __import__("torch").optim.SGD(blocks.parameters(), lr=0.1)
for block in blocks:
    fully_shard(block)
try:
    DynamicTying(blocks, optimizer, total_steps=10)
except UsageError as refused:
    print(refused)
dist.destroy_process_group()
"""


def test_blocks_sharded_by_fsdp_are_refused_in_one_sentence(tmp_path):
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    r = subprocess.run([sys.executable, "-c", _FSDP_BLOCKS], capture_output=True, text=True, timeout=120,
                       env=os.environ | {"PORT": str(port)}, check=False)
    assert r.returncode == 0, r.stderr[-3000:]
    assert r.stdout.strip().startswith("DynamicTying cannot tie blocks that FSDP or DeepSpeed shard")


@pytest.mark.parametrize("engine", ["fsdp", "deepspeed"])
def test_a_trainer_made_for_fsdp_or_deepspeed_is_refused_when_it_is_made(tmp_path, monkeypatch, engine):
    pytest.importorskip("accelerate")
    from transformers import TrainerControl, TrainerState, TrainingArguments

    from dyntie_cli import DynamicTyingCallback
    from dyntie_cli.errors import UsageError
    from tests.ranks_program import _model

    if engine == "fsdp":  # what TrainingArguments(fsdp=...) gives; the Trainer itself needs several ranks for it
        args = TrainingArguments(output_dir=str(tmp_path), fsdp=True, use_cpu=True, report_to="none")
    else:  # accelerate launch with a DeepSpeed config says so in the environment (DeepSpeed is not installed here)
        args = TrainingArguments(output_dir=str(tmp_path), use_cpu=True, report_to="none")
        monkeypatch.setenv("ACCELERATE_USE_DEEPSPEED", "true")
    with pytest.raises(UsageError, match=f"does not work with {'FSDP' if engine == 'fsdp' else 'DeepSpeed'}"):
        DynamicTyingCallback().on_init_end(args, TrainerState(), TrainerControl(), model=_model())
