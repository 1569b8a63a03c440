"""Blocks that start tied are never materialised, and the model is still exactly the one a full build makes."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from torch import nn

from dyntie_cli.core.lazy_build import build_lazily
from dyntie_cli.core.memory import parameter_bytes
from dyntie_cli.core.ties import TieManager
from dyntie_cli.runner.settings_source import SettingsSource, new_settings
from tests.conftest import invoke
from tests.conftest import rows as _rows

FIXTURES = Path(__file__).parent / "fixtures"
CASES = {"gpt2": ("gpt2-tiny", {}), "llama": ("llama-tiny", {}), "vit": ("vit-tiny", {}),
         "glue": ("bert-tiny", {"dataset": "rte", "data_dir": str(FIXTURES / "glue")})}


def _setup(name):
    preset, extra = CASES[name]
    backbone, cfg = new_settings(name, SettingsSource(preset, flags=tuple(extra.items())))
    data = backbone.load_data(cfg)
    probe = backbone.blocks(backbone.load_model_code(cfg, data))
    return backbone, cfg, data, probe


def _block_prefix(backbone, model, i):
    block = backbone.blocks(model)[i]
    return next(name for name, module in model.named_modules() if module is block) + "."


@pytest.mark.parametrize("name", sorted(CASES))
@pytest.mark.parametrize("initial", [[0, 0, 0, 0], [0, 1, 1, 3]])
def test_a_lazy_build_draws_the_same_numbers_as_a_full_build(name, initial):
    backbone, cfg, data, probe = _setup(name)
    torch.manual_seed(0)
    full = backbone.build_model(cfg, data)
    after_full = torch.get_rng_state()
    torch.manual_seed(0)
    lazy, report = build_lazily(lambda: backbone.build_model(cfg, data), backbone.blocks, initial, probe)
    assert report.lazy and report.skipped == sum(1 for i, r in enumerate(initial) if r != i)
    assert torch.equal(torch.get_rng_state(), after_full)  # everything drawn later (dropout, ...) is the same too
    skipped = tuple(_block_prefix(backbone, lazy, i) for i, r in enumerate(initial) if r != i)
    want, got = full.state_dict(), lazy.state_dict()
    kept = [k for k in want if not k.startswith(skipped)]
    assert kept and all(torch.equal(want[k], got[k]) for k in kept)
    # the skipped blocks' parameters are views of one scratch buffer, no larger than one block's largest tensor
    storages = {p.untyped_storage().data_ptr(): p.untyped_storage().nbytes()
                for i, r in enumerate(initial) if r != i for p in backbone.blocks(lazy)[i].parameters()}
    largest = max(p.numel() * p.element_size() for p in backbone.blocks(lazy)[0].parameters())
    assert len(storages) == 1 and next(iter(storages.values())) == largest
    # once the tie manager applies the state, the model is the fully built one with the same ties
    ties_full = TieManager(backbone.blocks(full), initial)
    ties_lazy = TieManager(backbone.blocks(lazy), initial)
    assert ties_lazy.distinct_block_weights() == ties_full.distinct_block_weights()
    assert parameter_bytes(lazy) == parameter_bytes(full)
    assert set(lazy.state_dict()) == set(full.state_dict())
    assert all(torch.equal(full.state_dict()[k], v) for k, v in lazy.state_dict().items())


class Block(nn.Module):
    def __init__(self, width):
        super().__init__()
        self.fc = nn.Linear(width, width)

    def forward(self, x):
        return x + self.fc(x)


class Reversed(nn.Module):
    """Blocks constructed in one order and run in the other: a lazy build cannot tell which is which."""

    def __init__(self):
        super().__init__()
        made = [Block(8) for _ in range(3)]
        self.layers = nn.ModuleList(reversed(made))
        self.head = nn.Linear(8, 2)


def test_a_model_whose_blocks_are_built_out_of_order_is_built_in_full_and_says_why():
    torch.manual_seed(0)
    full = Reversed()
    with torch.device("meta"):
        probe = list(Reversed().layers)
    torch.manual_seed(0)
    model, report = build_lazily(Reversed, lambda m: list(m.layers), [0, 0, 0], probe)
    assert not report.lazy and "order" in report.reason
    assert all(torch.equal(a, b) for a, b in zip(full.state_dict().values(), model.state_dict().values(),
                                                 strict=True))


def test_a_run_records_how_its_model_was_built(runner, tmp_path):
    db = tmp_path / "r.duckdb"
    for variant in ("dynamic", "no-tying"):
        r = invoke(runner, "train", "gpt2", "--preset", "gpt2-tiny", "--max-steps", "4", "--variant", variant,
                   "--db", db, "--out", tmp_path / "runs", "--quiet")
        assert r.exit_code == 0, r.stderr
    setups = {variant: json.loads(config)["setup"] for variant, config in
              _rows(db, "SELECT variant, config FROM runs")}
    assert setups["dynamic"] == {"lazy": True, "skipped_blocks": 3}
    assert setups["no-tying"]["lazy"] is False and "independent" in setups["no-tying"]["reason"]
