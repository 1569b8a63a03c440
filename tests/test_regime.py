"""The regime preset (gpt2-regime-cpu: 48 blocks, a decision every 3 steps, a held-out reward slice) at a few steps:
its tie log obeys Eq. 1 with storage matching state, and a run killed mid-way resumes bit-exact -- its best model,
its held-out reward and a decision waiting for it included."""

from __future__ import annotations

import signal
from itertools import pairwise
from pathlib import Path

import pytest

from dyntie_cli.core.loop import Job, Trainer
from dyntie_cli.core.ties import transition
from dyntie_cli.errors import DyntieError
from dyntie_cli.plugins import get_backbone
from dyntie_cli.results.writer import RunWriter
from dyntie_cli.runner.jobs import resume_recorded
from dyntie_cli.settings import resolve
from tests.test_reproducible import logged

STEPS = 30
#: a few steps of the preset, scored cheaply, with every reward the regime study probes and the held-out one acting
SHORT = [("train.max_steps", STEPS), ("train.eval_every", 12), ("train.eval_items", 1024),
         ("train.test_items", 1024), ("train.log_every", 3), ("agent.reward_batch", "heldout"),
         ("agent.reward_probes", ["interval", "fresh", "heldout"]), ("agent.keep_bias", 0.0),
         ("agent.keep_bonus", 0.0), ("agent.keep_trained", False)]


def _trainer(db: Path, out: Path, *, stop_at: int | None = None) -> tuple[Trainer, RunWriter]:
    backbone = get_backbone("gpt2")
    settings = resolve(type(backbone), backbone.presets["gpt2-regime-cpu"], sources=[SHORT])
    writer = RunWriter(db, backbone="gpt2")
    trainer = Trainer(backbone, Job(settings), writer, out_dir=out)
    if stop_at is not None:
        def stop(event):  # SIGTERM at a step boundary, as a kill would ask for
            if event["type"] == "log" and event["step"] == stop_at:
                trainer.stop_signal = signal.SIGTERM
        trainer.events = stop
    return trainer, writer


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("regime")
    trainer, writer = _trainer(tmp / "r.duckdb", tmp / "runs")
    trainer.run()
    return tmp / "r.duckdb", tmp / "runs" / writer.run_id, writer.run_id


def test_a_short_regime_run_keeps_eq1_and_one_storage_per_independent_block(uninterrupted):
    db, _, run_id = uninterrupted
    ties = logged(db, run_id)["ties"]
    assert len(ties) == 1 + (STEPS - 1) // 3 and all(len(state) == 48 for _, _, state, *_ in ties)
    for (_, _, before, *_), (_, _, state, action, independent, distinct, changed) in pairwise(ties):
        assert state == transition(before, action)  # Eq. 1
        assert distinct == independent == sum(s == i for i, s in enumerate(state))  # storage matches state
        assert changed == sum(a != b for a, b in zip(before, state))
    assert len({tuple(state) for _, _, state, *_ in ties}) > 2  # the schedule moved


def test_a_regime_run_killed_mid_way_resumes_bit_exact(uninterrupted, tmp_path):
    want_db, want_dir, want_id = uninterrupted
    db, out = tmp_path / "k.duckdb", tmp_path / "runs"
    # stopped at step 15: validated and checkpointed at 12 (its best model kept), the decision of step 15 waiting
    # for its held-out reward at the end of its interval, with its fresh probe already scored
    trainer, writer = _trainer(db, out, stop_at=15)
    with pytest.raises(DyntieError, match="resume it with"):
        trainer.run()
    assert trainer.loop.pending is not None and set(trainer.loop.pending.scores) == {"fresh"}
    assert (out / writer.run_id / "best" / "best.json").is_file()
    resume_recorded(db, writer.run_id, quiet=True, print_summary=False)
    assert logged(db, writer.run_id) == logged(want_db, want_id)
    for folder in ("best", "checkpoint"):
        for name in ("model.safetensors", "ties.json"):
            assert (out / writer.run_id / folder / name).read_bytes() == (want_dir / folder / name).read_bytes()
