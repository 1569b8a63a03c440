"""Optimizers as a setting (train.optimizer): each one's state follows the tie manager -- a block that unties gets
fresh or copied state of the optimizer's own kind in its counterpart's parameter group, a block that ties
releases it -- and a checkpoint saves and restores it bit-exactly."""

from __future__ import annotations

import importlib.util

import pytest
import torch

from dyntie_cli.core import checkpoint as ckpt
from dyntie_cli.core.memory import optimizer_bytes
from dyntie_cli.core.optimizers import OPTIMIZERS, build_optimizer, state_bytes
from dyntie_cli.core.ties import TieManager
from dyntie_cli.runner.settings_source import SettingsSource, new_settings
from tests.conftest import invoke
from tests.conftest import rows as _rows


def _installed(name: str) -> bool:
    module = OPTIMIZERS[name].module
    return module is None or importlib.util.find_spec(module) is not None


OPTIMIZER_CASES = [pytest.param(name, marks=pytest.mark.skipif(not _installed(name), reason=f"{name}: not installed"))
                   for name in OPTIMIZERS]


def _setup(name, untie_optim="fresh", state=(0, 1, 0, 1)):
    backbone, cfg = new_settings("gpt2", SettingsSource("gpt2-tiny", sets=(
        ("train.optimizer", name), ("train.low_rank", 4), ("train.low_rank_gap", 3))))
    data = backbone.load_data(cfg)
    torch.manual_seed(0)
    model = backbone.build_model(cfg, data)
    ties = TieManager(backbone.blocks(model), list(state), untie_optim=untie_optim)
    opt = build_optimizer(model, cfg, projected=ties.owned_parameters())
    ties.attach_optimizer(opt)
    return backbone, data, model, ties, opt


def _train(backbone, data, model, opt, steps):
    for step in steps:
        torch.manual_seed(step)
        loss, _ = backbone.loss(model, data.train_batch(torch.Generator().manual_seed(step)))
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)


def _group_of(opt, p):
    return next(g for g, group in enumerate(opt.param_groups) if any(q is p for q in group["params"]))


def _tensors(state):
    return {k: v for k, v in state.items() if torch.is_tensor(v)}


@pytest.mark.parametrize("name", OPTIMIZER_CASES)
@pytest.mark.parametrize("untie_optim", ["fresh", "copy"])
def test_optimizer_state_follows_tie_and_untie_and_resumes_bit_exactly(name, untie_optim, tmp_path):
    backbone, data, model, ties, opt = _setup(name, untie_optim)
    if OPTIMIZERS[name].low_rank:  # the blocks' matrices are projected, nothing else is
        projected = [p for g in opt.param_groups if "rank" in g for p in g["params"]]
        assert projected and all(p.dim() == 2 for p in projected)
        assert {id(p) for p in projected} <= {id(p) for p in ties.owned_parameters()}
    _train(backbone, data, model, opt, range(3))
    source = ties._own[0]
    sources = {id(p): _tensors(opt.state[p]) for p in source}
    # untie block 2 (from root 0): its parameters join their counterparts' groups in block 0
    ties.apply([0, 1, 2, 1])
    fresh = ties._own[2]
    for p, src in zip(fresh, source):
        assert _group_of(opt, p) == _group_of(opt, src)
        state = _tensors(opt.state.get(p, {}))
        if untie_optim == "copy":
            assert state.keys() == sources[id(src)].keys() and state
            for k, v in state.items():
                assert torch.equal(v, sources[id(src)][k]) and v.untyped_storage().data_ptr() != \
                    opt.state[src][k].untyped_storage().data_ptr()
        else:
            assert not state  # nothing learned yet: the optimizer builds its state at the block's first step
    _train(backbone, data, model, opt, range(3, 5))
    for p, src in zip(fresh, source):  # after a step: state of the same kind as its counterpart's
        assert {k: (v.dtype, v.shape) for k, v in _tensors(opt.state[p]).items()} == \
            {k: (v.dtype, v.shape) for k, v in _tensors(opt.state[src]).items()}
    # tie block 1 (its state goes) while block 3, which followed it, unties from it
    held = optimizer_bytes(opt)
    released = ties._own[1]
    ties.apply([0, 0, 2, 3])
    assert not any(p in opt.state for p in released)
    assert all(_group_of_none(opt, p) for p in released)
    assert optimizer_bytes(opt) < held or untie_optim == "copy"
    _train(backbone, data, model, opt, range(5, 7))
    trainer = {"step": 7}
    folder = ckpt.save_checkpoint(tmp_path / "ckpt", model=model, ties_map=ties.tie_map(), optimizer=opt,
                                  trainer=trainer)
    _train(backbone, data, model, opt, range(7, 10))
    want = {n: p.detach().clone() for n, p in model.named_parameters()}
    # resume: a new model in the checkpoint's tie state, its weights and optimizer loaded, the same steps after
    backbone, data, model2, ties2, opt2 = _setup(name, untie_optim, ckpt.load_tie_map(folder)["state"])
    ckpt.load_model_weights(folder, model2)
    ckpt.restore_optimizer(model2, opt2, ckpt.load_trainer_state(folder))
    ties2.attach_optimizer(opt2)
    _train(backbone, data, model2, opt2, range(7, 10))
    got = dict(model2.named_parameters())
    assert got.keys() == want.keys()
    assert all(torch.equal(got[n], want[n]) for n in want), name


def _group_of_none(opt, p):
    return not any(q is p for group in opt.param_groups for q in group["params"])


@pytest.mark.parametrize("name", OPTIMIZER_CASES)
def test_the_plan_counts_each_optimizers_state_exactly(name):
    """The memory plan's bytes per parameter (state_bytes) are what the optimizer really holds after a step."""
    backbone, data, model, ties, opt = _setup(name, state=(0, 1, 2, 3))
    _train(backbone, data, model, opt, range(1))
    cfg = new_settings("gpt2", SettingsSource("gpt2-tiny", sets=(
        ("train.optimizer", name), ("train.low_rank", 4), ("train.low_rank_gap", 3))))[1]
    blocks = {id(p) for p in ties.owned_parameters()}
    planned = sum(state_bytes(cfg.train, tuple(p.shape), p.element_size(), id(p) in blocks)
                  for p in model.parameters())
    held = optimizer_bytes(opt)
    assert planned == pytest.approx(held, rel=0.02, abs=4096), (planned, held)


def test_an_optimizer_whose_library_is_missing_is_refused_before_any_data_loads(runner, tmp_path, monkeypatch):
    from dyntie_cli.core import optimizers

    real = importlib.util.find_spec
    monkeypatch.setattr(optimizers.importlib.util, "find_spec",
                        lambda module, *a: None if module == "bitsandbytes" else real(module, *a))
    db = tmp_path / "r.duckdb"
    result = invoke(runner, "train", "gpt2", "--preset", "gpt2-tiny", "--max-steps", "2", "--db", db,
                    "--set", "train.optimizer=adamw8bit", "--quiet")
    assert result.exit_code == 1 and "Traceback" not in result.output
    assert "train.optimizer adamw8bit needs the bitsandbytes package" in result.stderr
    assert "pip install 'dyntie[lowmem]'" in result.stderr
    assert not db.exists() or not _rows(db, "SELECT run_id FROM runs")
