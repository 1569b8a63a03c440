"""The settings schema: resolution order, typed values, one clear sentence for every bad setting."""

from __future__ import annotations

import pytest

from dyntie_cli.commands.options import TrainingOptions
from dyntie_cli.errors import UsageError
from dyntie_cli.runner.settings_source import new_settings
from dyntie_cli.settings import (
    AgentSettings,
    RunSettings,
    TrainSettings,
    from_saved,
    list_recipes,
    load_recipe,
    parse_sets,
    section_fields,
)
from tests.conftest import invoke


def _opts(**values) -> TrainingOptions:
    return TrainingOptions(values)


def _cfg(backbone: str = "gpt2", **values) -> RunSettings:
    return new_settings(backbone, _opts(**values).sources())[1]


def test_precedence_preset_recipe_options_set(tmp_path):
    recipe = tmp_path / "r.toml"
    recipe.write_text('preset = "gpt2-tiny"\n[train]\nlr = 0.5\nmax_steps = 7\n[agent]\npreset = "paper"\n')
    cfg = _cfg(recipe=str(recipe), max_steps=9, sets=["train.lr=0.25", "gamma=0.5"])
    assert cfg.preset == "gpt2-tiny" and cfg.model.n_layer == 4
    assert cfg.train.max_steps == 9 and cfg.train.lr == 0.25
    assert cfg.agent.preset == "paper" and cfg.agent.replay_size == 1 and cfg.agent.gamma == 0.5
    # the paper's agent explores uniformly over each row's choices and has no budget
    assert (cfg.agent.explore_moves, cfg.agent.max_independent, cfg.agent.keep_bias) == ("any", 0, 0.0)


def test_the_agent_flag_comes_first_so_other_flags_refine_it():
    cfg = _cfg(agent="paper", max_independent=3, reward="relative")
    assert cfg.agent.preset == "paper" and cfg.agent.max_independent == 3 and cfg.agent.reward == "relative"


@pytest.mark.parametrize("name", list_recipes())
def test_packaged_recipes_apply(name):
    recipe = load_recipe(name)
    assert "command" in recipe["meta"] and recipe["meta"]["command"].startswith("dyntie ")
    cfg = _cfg(recipe=name)
    assert cfg.preset == recipe["preset"]


def test_values_are_typed_and_checked():
    assert parse_sets(["a=3", "b=1e-3", "c=true", "d=text", "e=[1,2]"]) == [
        ("a", 3), ("b", 1e-3), ("c", True), ("d", "text"), ("e", [1, 2])]
    cfg = _cfg(preset="gpt2-tiny", sets=["train.lr=1"])  # a whole number where a float is expected is fine
    assert cfg.train.lr == 1.0 and isinstance(cfg.train.lr, float)
    for sets, words in [
        (["train.max_steps=x"], ["train.max_steps", "whole number", "'x'"]),
        (["train.max_steps=2.5"], ["train.max_steps", "whole number"]),
        (["train.lr=true"], ["train.lr", "a number"]),
        (["agent.keep_trained=1"], ["agent.keep_trained", "true or false"]),
        (["ties.nope=1"], ["ties.nope", "decide_every"]),
        (["model.n_layers=3"], ["model.n_layers", "n_layer"]),
        (["zzz=1"], ["zzz", "no section"]),
        (["agent.preset=clever"], ["clever", "paper"]),
        (["agent.explore=sideways"], ["agent.explore", "row, vector", "sideways"]),
        (["train.precision=fp8"], ["train.precision", "fp32, bf16, fp16", "fp8"]),
        (["nope.x=1"], ["nope", "sections", "train, ties, agent, model, data"]),
        (["agent.gamma=2"], ["agent.gamma", "at most 1"]),
        (["data.seq_len=0"], ["data.seq_len", "at least 1"]),
        (["device=tpu"], ["device", "tpu"]),
    ]:
        with pytest.raises(UsageError) as e:
            _cfg(preset="gpt2-tiny", sets=sets)
        message = str(e.value)
        assert all(w in message for w in words), (sets, message)
        assert message.count(". ") == 0 and message.endswith("."), message  # one sentence


def test_a_flag_error_names_the_flag():
    with pytest.raises(UsageError, match=r"train.max_steps \(--max-steps\) must be at least 1, not -3"):
        _cfg(max_steps=-3)


def test_a_flag_error_names_the_flag_without_the_command_line_loaded():
    """The flags of settings are declared in the schema: the sentence is the same from the Python side."""
    import subprocess
    import sys

    code = ("import sys\nfrom dyntie_cli.plugins import get_backbone\nfrom dyntie_cli.settings import resolve\n"
            "b = get_backbone('gpt2')\ntry:\n    resolve(type(b), b.presets['gpt2-tiny'], sources=[[('train.max_steps', -3)]])\n"
            "except Exception as e:\n    print(e)\nprint('dyntie_cli.commands.options' in sys.modules)\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.splitlines() == ["train.max_steps (--max-steps) must be at least 1, not -3.", "False"]


def test_bad_settings_exit_with_one_sentence_before_any_data_loads(runner, tmp_path, monkeypatch):
    """The checks run on the settings alone: a backbone whose data loader would fail never gets called."""
    from dyntie_cli.plugins import get_backbone

    backbone_cls = type(get_backbone("gpt2"))

    def no_data(self, cfg):
        raise AssertionError("data was loaded before the settings were checked")

    monkeypatch.setattr(backbone_cls, "load_data", no_data)
    recipe = tmp_path / "r.toml"
    recipe.write_text('preset = "gpt2-tiny"\nwarmup = 3\n')
    for args, words in [
        (["--set", "agent.explore=sideways"], ["agent.explore", "row, vector"]),
        (["--set", "train.precision=fp8"], ["train.precision", "fp32"]),
        (["--set", "nope.x=1"], ["nope"]),
        (["--recipe", recipe], ["unknown key", "warmup"]),
    ]:
        r = invoke(runner, "train", "gpt2", "--preset", "gpt2-tiny", *args, "--db", tmp_path / "x.duckdb")
        assert r.exit_code == 2, (args, r.output)
        lines = [line for line in r.stderr.splitlines() if line.strip()]
        assert len(lines) == 1 and all(w in lines[0] for w in words), (args, r.stderr)
    assert not (tmp_path / "x.duckdb").exists()


def test_settings_are_frozen_and_a_value_resolved_later_makes_new_settings():
    from pydantic import ValidationError

    from dyntie_cli.settings import revised

    cfg = _cfg(preset="gpt2-tiny")
    for section, key in [(cfg.train, "lr"), (cfg.ties, "independent"), (cfg.agent, "use_q"), (cfg, "dataset")]:
        with pytest.raises(ValidationError, match="frozen"):
            setattr(section, key, getattr(section, key))
    again = revised(cfg, [("ties.independent", 3)])
    assert again.ties.independent == 3 and cfg.ties.independent == 0 and type(again) is type(cfg)
    assert again.to_dict() == {**cfg.to_dict(), "ties": {**cfg.to_dict()["ties"], "independent": 3}}
    with pytest.raises(UsageError, match=r"ties.independent \(--independent\) must be at least 0"):
        revised(cfg, [("ties.independent", -1)])


def test_dataset_names_match_loosely_and_are_stored_canonically():
    assert _cfg("glue", dataset="SST-2", preset="bert-tiny").dataset == "sst2"
    assert _cfg(dataset="WikiText_103").dataset == "wikitext-103"
    with pytest.raises(UsageError, match="Unknown dataset"):
        _cfg(dataset="wikitext-3")


def test_agent_settings_default_and_lean():
    """default: sequence-keeping moves with a budget of 8 blocks; lean: the first default (fewer blocks)."""
    default = _cfg().agent
    assert (default.keep_target, default.explore_moves, default.max_independent, default.keep_bias) == (
        "previous", "local", 8, 0.95)
    lean = _cfg(agent="lean").agent
    assert lean.preset == "lean"
    assert (lean.keep_target, lean.explore_moves, lean.max_independent, lean.keep_bias, lean.keep_bonus) == (
        "root", "any", 0, 0.9, 2.0)


def test_a_saved_config_round_trips_and_an_older_one_keeps_its_policy():
    """Resume and ablate rebuild a run's settings from the registry: current settings come back unchanged, and
    settings saved before an agent field existed get the value that reproduces how that run behaved."""
    from dyntie_cli.plugins import get_backbone

    gpt2 = type(get_backbone("gpt2"))
    cfg = _cfg()
    assert from_saved(gpt2, cfg.to_dict()) == cfg
    assert cfg.agent.keep_trained is True
    old = cfg.to_dict()
    legacy = AgentSettings.legacy_values()
    assert {"keep_trained", "keep_target", "td_target", "reward_batch"} <= set(legacy)
    for key in legacy:
        del old["agent"][key]
    agent = from_saved(gpt2, old).agent
    assert (agent.keep_trained, agent.keep_target, agent.explore_moves, agent.keep_bonus, agent.reward_batch) == (
        False, "root", "any", 0.0, "fresh")
    assert agent.max_independent == cfg.agent.max_independent  # a field the run saved is taken as saved


def test_every_setting_has_help_and_a_default():
    for section, fields in section_fields(type(_cfg().model_copy())).items():
        if section in ("model", "data"):
            continue
        for name, info in fields.items():
            assert info.description, f"{section}.{name} has no help"
            assert not info.is_required(), f"{section}.{name} has no default"
    assert TrainSettings().max_steps == 1000


def test_config_show_prints_the_resolved_settings(runner):
    r = invoke(runner, "config", "show", "gpt2", "--preset", "gpt2-deep-cpu", "--set", "agent.keep_bias=0.5")
    assert r.exit_code == 0, r.stderr
    assert 'preset = "gpt2-deep-cpu"' in r.stdout and "n_layer = 48" in r.stdout and "keep_bias = 0.5" in r.stdout
    import tomllib

    shown = tomllib.loads(r.stdout)
    assert shown["train"]["max_steps"] == 1000 and shown["agent"]["keep_bias"] == 0.5
    r = invoke(runner, "config", "show", "vit", "--format", "json", "--max-steps", "5")
    import json

    assert json.loads(r.stdout)["train"]["max_steps"] == 5
    r = invoke(runner, "config", "show", "gpt2", "--set", "agent.explore=sideways")
    assert r.exit_code == 2 and "agent.explore" in r.stderr
