"""The table of variants: every part of dyntie that treats variants differently reads it, so a variant added to the
table with a factory trains, is planned and is recorded with no other change."""

from __future__ import annotations

import pytest
import torch

from dyntie_cli import variants
from dyntie_cli.core import policies
from dyntie_cli.core.plan import planned_independent
from dyntie_cli.core.policies import FixedPolicy, PolicyInputs, builds
from dyntie_cli.core.ties import independent_count
from dyntie_cli.errors import UsageError
from dyntie_cli.experiments.ablation import check_ablation_arguments
from dyntie_cli.settings import VARIANTS, AgentSettings, RunSettings
from dyntie_cli.variants import SPECS, VariantSpec
from tests.conftest import rows


def test_every_variant_of_the_table_has_a_factory_and_is_a_settings_choice():
    assert set(policies.FACTORIES) == set(SPECS)
    assert VARIANTS == variants.NAMES == tuple(SPECS)
    assert VARIANTS[0] == variants.METHOD and variants.BASELINE in VARIANTS


def test_what_the_commands_accept_follows_from_the_table():
    assert variants.ABLATIONS == ("final-arch", "replay", "no-tying", "random", "static-all", "static-sequence",
                                  "static-cycle", "static-cycle-rev", "grow", "q-off")
    assert variants.DEFAULT_STUDY == ("dynamic", "no-tying", "random", "final-arch", "replay", "grow", "q-off")
    with pytest.raises(UsageError, match=r"^--independent applies to the static-\* variants and grow only; drop it "
                                         r"for replay\.$"):
        check_ablation_arguments("replay", 3)
    with pytest.raises(UsageError, match="Unknown ablation variant 'dynamic'"):
        check_ablation_arguments("dynamic", None)
    # trained from a source run's tie history: always, or for the count unless --independent gives it
    reads = {n: (SPECS[n].reads_source(False), SPECS[n].reads_source(True)) for n in VARIANTS}
    assert {n for n, (without, _) in reads.items() if without} == {
        "final-arch", "replay", "static-sequence", "static-cycle", "static-cycle-rev", "grow"}
    assert {n for n, (_, given) in reads.items() if given} == {"final-arch", "replay"}


def test_bench_adds_its_baseline_and_trains_a_sourced_variant_from_the_dynamic_run():
    from dyntie_cli.experiments.bench import bench_variants

    assert bench_variants(["dynamic", "replay"]) == ["no-tying", "dynamic", "replay"]
    assert bench_variants(["static-cycle", "no-tying"]) == ["static-cycle", "no-tying"]
    with pytest.raises(UsageError, match="--variants final-arch needs dynamic in the list"):
        bench_variants(["no-tying", "final-arch"])


def test_a_variant_fixes_its_settings_in_every_source_of_settings():
    from dyntie_cli import DynamicTying
    from dyntie_cli.plugins import get_backbone
    from dyntie_cli.settings import resolve

    backbone = get_backbone("gpt2")
    cfg = resolve(type(backbone), backbone.presets["gpt2-tiny"],
                  sources=[[("variant", "q-off"), ("agent.use_q", True), ("seed", 4)]])
    assert cfg.agent.use_q is False and cfg.agent.seed == 4
    blocks = [torch.nn.Linear(4, 4) for _ in range(3)]
    optimizer = torch.optim.SGD([p for b in blocks for p in b.parameters()], lr=0.1)
    tying = DynamicTying(blocks, optimizer, total_steps=10, variant="q-off")
    assert tying.policy.agent.cfg.use_q is False


@pytest.fixture
def halves(monkeypatch) -> str:
    """A variant added the way any variant is: one table entry and its factory (two fixed groups of blocks)."""
    name = "halves"
    monkeypatch.setitem(SPECS, name, VariantSpec(name, most_independent=lambda cfg, blocks: (2, "two groups")))

    def factory(p: PolicyInputs) -> FixedPolicy:
        half = p.blocks // 2
        return FixedPolicy([0] * half + [half] * (p.blocks - half), p.variant)

    monkeypatch.setitem(policies.FACTORIES, name, builds()(factory))
    return name


def test_a_variant_added_to_the_table_trains_and_is_planned(halves, tmp_path):
    from dyntie_cli import DynamicTying

    torch.manual_seed(0)
    model = torch.nn.Sequential(*(torch.nn.Linear(4, 4) for _ in range(6)))
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.1)
    db = tmp_path / "runs.duckdb"
    x = torch.randn(5, 4)
    with DynamicTying(list(model), optimizer, total_steps=8, decide_every=2, variant=halves, db=db) as tying:
        for _ in range(8):
            loss = model(x).pow(2).mean()
            loss.backward()
            optimizer.step()
            optimizer.zero_grad()
            tying.step(loss)
    assert [row.state for row in tying.history] == [[0, 0, 0, 3, 3, 3]] * 4
    assert tying.ties.distinct_block_weights() == 2
    assert rows(db, "SELECT variant FROM runs") == [(halves,)]
    assert planned_independent(RunSettings(), 6, halves) == (2, "two groups")


def test_a_static_scheme_records_the_count_it_settled_on():
    cfg = AgentSettings()
    inputs = {"agent": cfg, "total_decisions": 3, "seed": 0}
    settled = policies.make_policy("static-cycle", 12, **inputs)
    assert settled.resolved == (("ties.independent", 3),) == (("ties.independent", independent_count(settled.state)),)
    assert policies.make_policy("static-cycle", 12, independent=5, **inputs).resolved == ()
    assert policies.make_policy("static-all", 12, **inputs).resolved == (("ties.independent", 1),)
    grow = policies.make_policy("grow", 12, **inputs)
    assert grow.resolved == (("ties.independent", cfg.max_independent),)
    assert policies.make_policy("no-tying", 12, **inputs).resolved == ()
