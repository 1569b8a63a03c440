"""`dyntie plan` and the memory check before a run: the parts are the run's own, a run that cannot fit is refused."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

from dyntie_cli.core import plan as planner
from dyntie_cli.core.lazy_build import build_lazily
from dyntie_cli.core.ties import TieManager
from dyntie_cli.runner.settings_source import SettingsSource, new_settings
from tests.conftest import invoke
from tests.conftest import rows as _rows


def _plans(runner, *args) -> dict[str, dict]:
    r = invoke(runner, "plan", "train", "gpt2", "--preset", "gpt2-tiny", *args, "--format", "json")
    assert r.exit_code == 0, r.stderr
    return {p["variant"]: p for p in json.loads(r.stdout)}


def test_the_plan_counts_what_the_run_then_holds(runner, tmp_path, monkeypatch):
    plans = _plans(runner, "--variants", "no-tying,dynamic", "--max-independent", "2")
    assert plans["no-tying"]["independent"] == 4 and plans["dynamic"]["independent"] == 2
    for p in plans.values():
        assert p["peak_bytes"] == sum(p[k] for k in ("baseline_bytes", "parameter_bytes", "gradient_bytes",
                                                      "optimizer_bytes", "activation_bytes", "transient_bytes"))
        assert p["optimizer_bytes"] == 2 * p["parameter_bytes"] and p["fits"] is True
    db = tmp_path / "r.duckdb"
    # as if the run were near the device's limit: it then measures its activations and records its plan
    monkeypatch.setattr(planner, "MEASURE_ABOVE", 0.0)
    r = invoke(runner, "train", "gpt2", "--preset", "gpt2-tiny", "--variant", "no-tying", "--max-steps", "5",
               "--db", db, "--out", tmp_path / "runs", "--quiet")
    assert r.exit_code == 0, r.stderr
    param, optimizer = _rows(db, "SELECT param_bytes, optimizer_bytes FROM memory ORDER BY step DESC LIMIT 1")[0]
    assert param == plans["no-tying"]["parameter_bytes"]
    # AdamW's two moments, and one 4-byte step counter per parameter tensor
    assert 0 <= optimizer - plans["no-tying"]["optimizer_bytes"] < 4 * 100
    planned = _rows(db, "SELECT value FROM metrics WHERE name = 'planned_peak_bytes'")[0][0]
    assert planned > plans["no-tying"]["parameter_bytes"] * 4  # the run recorded its own plan


def test_a_run_with_room_to_spare_does_not_measure_its_activations(runner, tmp_path):
    db = tmp_path / "r.duckdb"
    r = invoke(runner, "train", "gpt2", "--preset", "gpt2-tiny", "--max-steps", "3", "--db", db,
               "--out", tmp_path / "runs", "--quiet")
    assert r.exit_code == 0, r.stderr
    assert _rows(db, "SELECT count(*) FROM metrics WHERE name = 'planned_peak_bytes'")[0][0] == 0
    assert _rows(db, "SELECT count(*) FROM metrics WHERE name = 'process_peak_bytes'")[0][0] == 1


@pytest.mark.parametrize("independent", [1, 2, 4])
@pytest.mark.parametrize(("name", "preset", "dataset"), [("gpt2", "gpt2-tiny", "wikitext-2"),
                                                         ("glue", "bert-tiny", "rte"), ("vit", "vit-tiny", "digits")])
def test_planned_activations_are_what_a_training_step_saves(independent, name, preset, dataset):
    """The plan measures activations at one and two independent blocks, on a copy whose tied blocks were never
    initialised, and extrapolates; a real forward at any count, on the run's own lazily built model, saves exactly
    that."""
    backbone, cfg = new_settings(name, SettingsSource(preset, flags=(("dataset", dataset),)))
    data = backbone.load_data(cfg)
    meta = backbone.load_model_code(cfg, data)
    probe = backbone.blocks(meta)
    blocks = len(probe)
    activations, _ = planner.measure_activations(backbone, cfg, data, torch.device("cpu"), probe)
    state = list(range(independent)) + [independent - 1] * (blocks - independent)
    model, _ = build_lazily(lambda: backbone.build_model(cfg, data), backbone.blocks, [0] * blocks, probe)
    ties = TieManager(backbone.blocks(model), [0] * blocks)
    ties.apply(state)
    model.train()
    batch = data.train_batch(torch.Generator().manual_seed(cfg.seed))
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    saved, _ = planner.saved_bytes(lambda: backbone.loss(model, batch), params)
    assert activations(independent) == saved


def test_measuring_draws_no_number_from_the_run(monkeypatch):
    backbone, cfg = new_settings("gpt2", SettingsSource("gpt2-tiny"))
    data = backbone.load_data(cfg)
    torch.manual_seed(0)
    before = torch.get_rng_state()
    planner.plan_memory(backbone, cfg, data, torch.device("cpu"), ["dynamic"])
    assert torch.equal(torch.get_rng_state(), before)


def test_a_run_that_will_not_fit_is_refused_before_anything_is_written(runner, tmp_path, monkeypatch):
    monkeypatch.setattr(planner, "available_bytes", lambda device: 64 * 2**20)
    db = tmp_path / "r.duckdb"
    args = ("train", "gpt2", "--preset", "gpt2-tiny", "--max-steps", "3", "--db", db, "--out", tmp_path / "runs")
    r = invoke(runner, *args, "--quiet")
    assert r.exit_code == 1 and "Traceback" not in r.stderr
    lines = [line for line in r.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and "predicted to need" in lines[0] and "--max-independent" in lines[0]
    assert "data.batch_size=2" in lines[0] and "--force" in lines[0]
    assert not db.exists() and not (tmp_path / "runs").exists()
    plans = _plans(runner)
    assert plans["no-tying"]["fits"] is False and plans["no-tying"]["available_bytes"] == 64 * 2**20
    r = invoke(runner, *args, "--quiet", "--force")
    assert r.exit_code == 0, r.stderr
    assert _rows(db, "SELECT status FROM runs") == [("finished",)]


def test_plan_refuses_bad_settings_like_training_does(runner):
    r = invoke(runner, "plan", "train", "gpt2", "--set", "train.precision=fp8")
    assert r.exit_code == 2 and "train.precision" in r.stderr
    r = invoke(runner, "plan", "finetune", "gpt2")
    assert r.exit_code == 2 and "dyntie train gpt2" in r.stderr


FREE_AND_MEASURE = """
import sys, torch
from dyntie_cli.core.memory import current_rss_bytes, release_memory_at_once
if sys.argv[1] == "on" and not release_memory_at_once():
    print("no-glibc")
    raise SystemExit
x = torch.ones(1 << 21)
del x  # a freed 8 MiB block: glibc's own threshold rises past 1 MiB, so smaller tensors come from the heap
before = current_rss_bytes()
held = [torch.ones(1 << 18) for _ in range(200)]  # 200 MiB in 1 MiB tensors
pin = torch.ones(1 << 16)  # 256 KiB carved after them: the heap's top stays in use and cannot be trimmed
del held[:]
print((current_rss_bytes() - before) / 2**20)
"""


def test_release_memory_hands_freed_tensors_back_to_the_os():
    """train.release_memory: 200 MiB of freed 1 MiB tensors leave the process at once; glibc's default keeps them
    resident. Each side runs in its own process (the setting lasts for the rest of a process)."""
    resident = {}
    for mode in ("on", "off"):
        out = subprocess.run([sys.executable, "-c", FREE_AND_MEASURE, mode], capture_output=True, text=True,
                             check=True).stdout.strip()
        if out == "no-glibc":
            pytest.skip("the C library is not glibc")
        resident[mode] = float(out)
    assert resident["on"] < 20 and resident["off"] > 150


@pytest.mark.parametrize(("setting", "near", "released"), [("auto", False, False), ("auto", True, True),
                                                           ("on", False, True), ("off", True, False)])
def test_a_run_releases_freed_memory_when_told_or_near_the_limit(runner, tmp_path, monkeypatch, setting, near,
                                                                 released):
    from dyntie_cli.core import loop

    calls = []
    monkeypatch.setattr(loop, "release_memory_at_once", lambda: calls.append(1) or True)
    monkeypatch.setattr(planner, "MEASURE_ABOVE", 0.0 if near else 0.5)
    r = invoke(runner, "train", "gpt2", "--preset", "gpt2-tiny", "--max-steps", "2", "--set",
               f"train.release_memory={setting}", "--db", tmp_path / "r.duckdb", "--out", tmp_path / "runs",
               "--quiet")
    assert r.exit_code == 0, r.stderr
    assert bool(calls) == released


def test_the_plan_says_what_it_does_and_its_title_judges_each_variant(runner):
    r = invoke(runner, "plan", "train", "gpt2", "--preset", "gpt2-tiny", "--max-independent", "2")
    assert r.exit_code == 0, r.stderr
    said = [line.split("... (")[0] for line in r.stderr.splitlines()]
    assert said == [
        "plan: loading the data (wikitext-2)",
        "plan: counting parameters on a copy built on the meta device (no memory, no initialisation)",
        "plan: building a copy with one block of 4 materialised, to measure activations on",
        ("plan: measuring activations at 1 independent block (a forward pass of one training batch through all 4 "
        "blocks)"),
        "plan: measuring activations at 2 independent blocks (another forward pass)"]
    assert "memory plan: gpt2 gpt2-tiny on cpu (dynamic fits, no-tying fits)" in r.stdout
    quiet = invoke(runner, "plan", "train", "gpt2", "--preset", "gpt2-tiny", "--quiet", "--format", "json")
    assert quiet.exit_code == 0 and quiet.stderr == ""


def test_a_budgeted_run_that_fits_is_not_titled_as_one_that_does_not():
    from dyntie_cli.commands.plan import fit_words

    def plan(variant: str, fits: bool | None) -> planner.MemoryPlan:
        return planner.MemoryPlan(variant, 48, 8, "cpu", 0, 0, 0, 0, 0, 0, 0, 0, None, fits)

    huge = [plan("no-tying", False), plan("dynamic", True)]
    assert fit_words(huge, "dynamic") == "dynamic fits, no-tying does not fit"
    assert fit_words([plan("no-tying", None), plan("grow", True)], "no-tying") == "no-tying fit unknown, grow fits"


@pytest.mark.parametrize("every", ["all", 2])
def test_planned_activations_with_checkpointing_are_what_a_checkpointed_step_keeps(every):
    """From a pass without checkpointing the plan replaces each checkpointed block's saved tensors by its inputs
    and adds one independent block's for its recomputation; a checkpointed forward keeps exactly the rest."""
    from dyntie_cli.core.recompute import checkpointed_blocks

    backbone, cfg = new_settings("gpt2", SettingsSource("gpt2-tiny", sets=(("train.checkpointing", every),)))
    data = backbone.load_data(cfg)
    probe = backbone.blocks(backbone.load_model_code(cfg, data))
    activations, _ = planner.measure_activations(backbone, cfg, data, torch.device("cpu"), probe)
    model, _ = build_lazily(lambda: backbone.build_model(cfg, data), backbone.blocks, [0] * 4, probe)
    ties = TieManager(backbone.blocks(model), [0, 1, 1, 1])
    model.train()
    batch = data.train_batch(torch.Generator().manual_seed(cfg.seed))
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    plain = planner.saved_by_block(lambda: backbone.loss(model, batch), params, ties.blocks)
    ties.checkpoint(every)
    # a checkpoint saves its block's inputs through autograd's saved-tensor hooks, so they are counted here
    kept = planner.saved_by_block(lambda: backbone.loss(model, batch), params, ties.blocks)
    assert kept.total < plain.total
    for i in checkpointed_blocks(4, every):
        assert kept.blocks[i] <= kept.inputs[i] < plain.blocks[i]
    assert activations(2) == pytest.approx(kept.total + plain.blocks[0], rel=0.01)
    assert activations(2) < planner.measure_activations(backbone, new_settings("gpt2", SettingsSource("gpt2-tiny"))[1],
                                                        data, torch.device("cpu"), probe)[0](2)


def test_the_plan_counts_each_optimizers_state():
    """Low-memory optimizers plan less state than AdamW's 8 bytes per parameter; the per-parameter counts are
    checked against the optimizers themselves in test_optimizers.py."""
    backbone, cfg = new_settings("gpt2", SettingsSource("gpt2-tiny"))
    meta = backbone.load_model_code(cfg, backbone.load_data(cfg))
    counts = planner.model_counts(meta, backbone.blocks(meta))
    adamw = counts.optimizer_bytes(cfg.train, 4)
    assert adamw == 2 * (counts.other_bytes + 4 * counts.block_bytes)
    for name in ("adafactor", "adamw8bit", "galore", "apollo"):
        t = new_settings("gpt2", SettingsSource("gpt2-tiny", sets=(("train.optimizer", name),
                                                                   ("train.low_rank", 8))))[1].train
        assert counts.optimizer_bytes(t, 4) < adamw, name
        assert counts.optimizer_bytes(t, 1) < counts.optimizer_bytes(t, 4), name
