"""Activation checkpointing (train.checkpointing): a checkpointed model computes the gradients of the plain one,
tied blocks recomputing with their root's tensors, on every backbone and in both gradient modes."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from dyntie_cli.core.plan import saved_bytes
from dyntie_cli.core.recompute import checkpointed_blocks, is_checkpointed
from dyntie_cli.core.ties import TieManager
from dyntie_cli.runner.settings_source import SettingsSource, new_settings
from tests.conftest import MOVING_AGENT, invoke
from tests.conftest import rows as _rows

FIXTURES = Path(__file__).parent / "fixtures"
CASES = {"gpt2": ("gpt2-tiny", {}), "llama": ("llama-tiny", {}), "vit": ("vit-tiny", {}),
         "glue": ("bert-tiny", {"dataset": "rte", "data_dir": str(FIXTURES / "glue")})}
STATE = [0, 1, 0, 1]  # blocks 0 and 1 independent, 2 tied to 0, 3 tied to 1


def _model(name, tied_grad, every):
    """A tiny model of backbone ``name`` in tie state ``STATE``, its blocks checkpointed as ``every`` says, and a
    training batch; the same weights for the same arguments."""
    preset, extra = CASES[name]
    backbone, cfg = new_settings(name, SettingsSource(preset, flags=tuple(extra.items())))
    data = backbone.load_data(cfg)
    torch.manual_seed(0)
    model = backbone.build_model(cfg, data)
    ties = TieManager(backbone.blocks(model), STATE, tied_grad=tied_grad)
    ties.checkpoint(every)
    batch = data.train_batch(torch.Generator().manual_seed(0))
    return backbone, model, ties, batch


def _gradients(backbone, model, batch, autocast=None):
    model.train()
    torch.manual_seed(1)  # the same dropout masks in both models
    with torch.autocast("cpu", dtype=autocast) if autocast else torch.autocast("cpu", enabled=False):
        loss, _ = backbone.loss(model, batch)
    loss.backward()
    return float(loss.detach()), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("name", sorted(CASES))
@pytest.mark.parametrize("tied_grad", ["follow", "sum"])
def test_a_checkpointed_model_has_the_gradients_of_the_plain_one(name, tied_grad):
    backbone, plain, _, batch = _model(name, tied_grad, "off")
    loss, want = _gradients(backbone, plain, batch)
    for every in ("all", 2):
        backbone, model, ties, batch = _model(name, tied_grad, every)
        assert [i for i, b in enumerate(ties.blocks) if is_checkpointed(b)] == checkpointed_blocks(4, every)
        got_loss, got = _gradients(backbone, model, batch)
        assert got_loss == pytest.approx(loss, rel=1e-6)
        assert got.keys() == want.keys()  # the same parameters train: under follow none of the tied blocks'
        for n in want:
            torch.testing.assert_close(got[n], want[n], rtol=1e-5, atol=1e-7, msg=n)


def test_a_tied_block_recomputes_with_its_roots_tensors_and_shared_casts_under_autocast():
    """Under bf16 autocast a tied block computes with one cast of its root's weights shared by every position that
    follows the root; the recomputation in the backward pass must read that cast again."""
    backbone, plain, _, batch = _model("gpt2", "follow", "off")
    loss, want = _gradients(backbone, plain, batch, torch.bfloat16)
    backbone, model, ties, batch = _model("gpt2", "follow", "all")
    calls = []
    original = ties._before_forward
    ties._before_forward = lambda i: (calls.append(i), original(i))[1]
    got_loss, got = _gradients(backbone, model, batch, torch.bfloat16)
    assert calls.count(2) == 3  # the hook, the checkpointed forward, and the recomputation in the backward pass
    assert got_loss == pytest.approx(loss, rel=1e-6)
    for n in want:
        torch.testing.assert_close(got[n], want[n], rtol=1e-5, atol=1e-7, msg=n)


def test_checkpointing_keeps_fewer_activations_and_leaves_evaluation_alone():
    backbone, plain, _, batch = _model("gpt2", "follow", "off")
    backbone, model, ties, _ = _model("gpt2", "follow", "all")

    def saved(m):
        return saved_bytes(lambda: backbone.loss(m, batch), {p.untyped_storage().data_ptr() for p in m.parameters()})

    assert saved(model)[0] < saved(plain)[0] / 2
    with torch.no_grad():
        assert torch.equal(backbone.outputs(model, batch), backbone.outputs(plain, batch))
    ties.remove_hooks()  # a plain library model again
    assert not any(is_checkpointed(b) for b in ties.blocks)


def test_the_python_api_checkpoints_blocks_and_refuses_a_bad_value():
    from transformers import GPT2Config, GPT2LMHeadModel

    from dyntie_cli import DynamicTying
    from dyntie_cli.errors import UsageError

    model = GPT2LMHeadModel(GPT2Config(n_layer=4, n_embd=16, n_head=2, vocab_size=32, n_positions=16,
                                       use_cache=False))
    opt = torch.optim.AdamW(model.parameters())
    tying = DynamicTying(model.transformer.h, opt, total_steps=10, checkpointing=2)
    assert [is_checkpointed(b) for b in model.transformer.h] == [True, False, True, False]
    tying.materialize()
    assert not any(is_checkpointed(b) for b in model.transformer.h)
    with pytest.raises(UsageError, match="train.checkpointing must be off, all, or a whole number"):
        DynamicTying(model.transformer.h, opt, total_steps=10, checkpointing="some")


def _short_run(runner, tmp_path, tag, *extra):
    db = tmp_path / f"{tag}.duckdb"
    result = invoke(runner, "train", "gpt2", "--preset", "gpt2-tiny", "--max-steps", "24", "--decide-every", "4",
                    *MOVING_AGENT, "--set", "train.eval_every=12", "--db", db, "--out", tmp_path / tag, "--quiet",
                    *extra)
    assert result.exit_code == 0, result.stderr or result.output
    ties = _rows(db, "SELECT decision, state FROM ties ORDER BY decision")
    ppl = _rows(db, "SELECT step, split, value FROM metrics WHERE name = 'ppl' ORDER BY step, split")
    return ties, ppl


def test_a_fixed_seed_run_with_checkpointing_makes_the_same_ties_and_perplexities(runner, tmp_path):
    ties, ppl = _short_run(runner, tmp_path, "plain")
    ties_ckpt, ppl_ckpt = _short_run(runner, tmp_path, "ckpt", "--set", "train.checkpointing=all")
    assert len({tuple(s) for _, s in ties}) > 1  # the schedule moved
    assert ties_ckpt == ties
    assert [(s, sp) for s, sp, _ in ppl_ckpt] == [(s, sp) for s, sp, _ in ppl]
    assert [v for *_, v in ppl_ckpt] == pytest.approx([v for *_, v in ppl], rel=1e-5)
