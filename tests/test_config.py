"""Config resolution: presets, recipes, --set."""

from __future__ import annotations

import pytest

from dyntie_cli.config import apply_set, list_recipes, load_recipe, parse_sets
from dyntie_cli.errors import UsageError
from dyntie_cli.runner import RunOptions, build_config


def _cfg(**kw):
    return build_config(RunOptions(backbone="gpt2", **kw), expect="train")[1]


def test_precedence_preset_recipe_options_set(tmp_path):
    recipe = tmp_path / "r.toml"
    recipe.write_text('preset = "gpt2-tiny"\n[train]\nlr = 0.5\nmax_steps = 7\n[agent]\npreset = "paper"\n')
    cfg = _cfg(recipe=str(recipe), max_steps=9, sets=["train.lr=0.25", "gamma=0.5"])
    assert cfg.preset == "gpt2-tiny" and cfg.model["n_layer"] == 4
    assert cfg.train.max_steps == 9 and cfg.train.lr == 0.25
    assert cfg.agent.preset == "paper" and cfg.agent.replay_size == 1 and cfg.agent.gamma == 0.5
    # the paper's agent explores uniformly over each row's choices and has no budget
    assert (cfg.agent.explore_moves, cfg.agent.max_independent, cfg.agent.keep_bias) == ("any", 0, 0.0)


@pytest.mark.parametrize("name", list_recipes())
def test_packaged_recipes_apply(name):
    recipe = load_recipe(name)
    assert "command" in recipe["meta"] and recipe["meta"]["command"].startswith("dyntie ")
    cfg = _cfg(recipe=name)
    assert cfg.preset == recipe["preset"]


def test_set_values_are_typed_and_checked():
    assert parse_sets(["a=3", "b=1e-3", "c=true", "d=text", "e=[1,2]"]) == [
        ("a", 3), ("b", 1e-3), ("c", True), ("d", "text"), ("e", [1, 2])]
    cfg = _cfg(preset="gpt2-tiny")
    apply_set(cfg, "train.lr", 1)  # an int where a float is expected is fine
    assert cfg.train.lr == 1.0 and isinstance(cfg.train.lr, float)
    for key, value, match in [("train.max_steps", "x", "number"), ("ties.nope", 1, "ties.nope"),
                              ("model.n_layers", 3, "n_layer"), ("zzz", 1, "no section"),
                              ("agent.preset", "clever", "agent setting"), ("train.lr", True, "number")]:
        with pytest.raises(UsageError, match=match):
            apply_set(cfg, key, value)


def test_dataset_names_match_loosely_and_are_stored_canonically():
    cfg = build_config(RunOptions(backbone="glue", dataset="SST-2", preset="bert-tiny"), expect="finetune")[1]
    assert cfg.dataset == "sst2"
    assert _cfg(dataset="WikiText_103").dataset == "wikitext-103"
    with pytest.raises(UsageError, match="Unknown dataset"):
        _cfg(dataset="wikitext-3")


def test_agent_settings_default_and_lean():
    """default: sequence-keeping moves with a budget of 8 blocks; lean: the previous default (fewer blocks)."""
    default = _cfg().agent
    assert (default.keep_target, default.explore_moves, default.max_independent, default.keep_bias) == (
        "previous", "local", 8, 0.95)
    lean = _cfg(agent="lean").agent
    assert lean.preset == "lean"
    assert (lean.keep_target, lean.explore_moves, lean.max_independent, lean.keep_bias, lean.keep_bonus) == (
        "root", "any", 0, 0.9, 2.0)


def test_a_saved_config_round_trips_and_an_older_one_keeps_its_policy():
    """Resume and ablate rebuild a run's config from the registry: a current config comes back unchanged, and one
    saved before an agent field existed gets the value that reproduces how that run behaved, not today's default."""
    from dyntie_cli.config import RunConfig
    from dyntie_cli.core.agent import AGENT_FIELDS_BEFORE_THEY_EXISTED

    cfg = _cfg()
    assert RunConfig.from_dict(cfg.to_dict()) == cfg
    assert cfg.agent.keep_trained is True
    old = cfg.to_dict()
    for key in AGENT_FIELDS_BEFORE_THEY_EXISTED:
        del old["agent"][key]
    agent = RunConfig.from_dict(old).agent
    assert (agent.keep_trained, agent.keep_target, agent.explore_moves, agent.keep_bonus, agent.reward_batch) == (
        False, "root", "any", 0.0, "fresh")
    assert agent.max_independent == cfg.agent.max_independent  # a field the run saved is taken as saved
