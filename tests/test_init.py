"""Starting from pretrained or exported weights (``--init``) with a chosen initial tie state
(``--initial-state``), for every built-in backbone."""

from __future__ import annotations

import json

import pytest

from dyntie_cli.backbones.bert_glue import GlueBackbone
from dyntie_cli.settings import from_saved
from tests.conftest import TINY_RUNS, TINY_STATE, invoke, rows, tiny_run

BACKBONES = tuple(TINY_RUNS)


@pytest.fixture(scope="module")
def exports(tiny_exports) -> dict:
    """The full export of each tiny run."""
    return {name: exported["full"] for name, exported in tiny_exports.items()}


def _validation(db, run_id, step: int | None = None) -> dict[str, float]:
    """A run's validation metrics at ``step`` (None: its last validation), without the best-model records."""
    found = rows(db, "SELECT step, name, value FROM metrics WHERE run_id = ? AND split = 'validation' "
                 "AND name NOT LIKE 'best\\_%' ESCAPE '\\' ORDER BY step", run_id)
    at = found[-1][0] if step is None else step
    return {name: value for s, name, value in found if s == at}


def _ties(db, run_id):
    return rows(db, "SELECT decision, state, distinct_block_weights FROM ties WHERE run_id = ? ORDER BY decision",
                run_id)


@pytest.mark.parametrize("backbone", BACKBONES)
def test_init_from_a_full_export_reproduces_its_last_validation_at_step_0(runner, tiny_runs, exports, tmp_path,
                                                                          backbone):
    db, run_id = tiny_runs[backbone]
    new_db, new_run = tiny_run(runner, tmp_path, backbone, "--init", exports[backbone], "--initial-state",
                               "independent", "--max-steps", 2, "--set", "train.eval_at_start=true")
    want, got = _validation(db, run_id), _validation(new_db, new_run, step=0)
    assert set(got) == set(want) and len(want) >= 2
    for name, value in want.items():
        assert got[name] == pytest.approx(value, rel=1e-6, abs=1e-9), name
    assert _ties(new_db, new_run)[0] == (0, [0, 1, 2, 3], 4)
    config = json.loads(rows(new_db, "SELECT config FROM runs")[0][0])
    assert config["init"] == str(exports[backbone].resolve())
    assert config["ties"]["initial_state"] == "independent"


def test_a_pretrained_start_defaults_to_independent_blocks_and_a_scratch_start_to_all_tied(runner, exports,
                                                                                            tmp_path):
    db, started = tiny_run(runner, tmp_path, "gpt2", "--init", exports["gpt2"], "--max-steps", 1)
    assert _ties(db, started)[0][1] == [0, 1, 2, 3]
    _, scratch = tiny_run(runner, tmp_path, "gpt2", "--max-steps", 1)
    assert _ties(db, scratch)[0][1] == [0, 0, 0, 0]
    # the folder's tokenizer replaces the preset's bpe:512 and is recorded
    config = json.loads(rows(db, "SELECT config FROM runs WHERE run_id = ?", started)[0][0])
    assert config["data"]["tokenizer"] == str(exports["gpt2"])


def test_vit_starts_from_a_bare_timm_checkpoint_file(runner, tiny_runs, exports, tmp_path):
    db, run_id = tiny_runs["vit"]
    new_db, new_run = tiny_run(runner, tmp_path, "vit", "--init", exports["vit"] / "model.safetensors",
                               "--max-steps", 1, "--set", "train.eval_at_start=true")
    assert _validation(new_db, new_run, step=0) == pytest.approx(_validation(db, run_id), rel=1e-6)


def test_initial_state_final_arch_of_a_run_and_static_schemes(runner, tiny_runs, tmp_path):
    db, run_id = tiny_runs["gpt2"]
    _, copied = tiny_run(runner, tmp_path, "gpt2", "--db", db, "--max-steps", 1,
                         "--initial-state", f"final-arch-of:{run_id[:-2]}")
    assert _ties(db, copied)[0][1] == TINY_STATE
    config = json.loads(rows(db, "SELECT config FROM runs WHERE run_id = ?", copied)[0][0])
    assert config["ties"]["initial_state"] == f"final-arch-of:{run_id}"  # the full id is recorded
    _, static = tiny_run(runner, tmp_path, "gpt2", "--db", db, "--max-steps", 1, "--variant", "random",
                         "--initial-state", "static-cycle:2")
    assert _ties(db, static)[0][1:] == ([0, 1, 0, 1], 2)


def _refused(runner, tmp_path, backbone: str, *args, code: int = 1) -> str:
    db = tmp_path / "refused.duckdb"
    result = invoke(runner, *TINY_RUNS[backbone], "--db", db, "--out", tmp_path / "runs", "--quiet", "--max-steps",
                    1, *args)
    assert result.exit_code == code, result.stderr or result.output
    assert "Traceback" not in result.stderr and result.stderr.count("\n") == 1, result.stderr
    assert not db.exists() or not rows(db, "SELECT run_id FROM runs")  # nothing recorded
    return result.stderr


def test_init_refuses_wrong_architecture_block_count_and_missing_folders_in_one_sentence(runner, exports,
                                                                                        tmp_path):
    assert "holds a timm vit_base_patch16_224 model, not GPT-2" in _refused(runner, tmp_path, "gpt2", "--init",
                                                                             exports["vit"])
    assert "not a timm ViT" in _refused(runner, tmp_path, "vit", "--init", exports["gpt2"])
    assert "holds a transformers gpt2 model, not BERT" in _refused(runner, tmp_path, "glue", "--init",
                                                                   exports["gpt2"])
    assert "has 4 blocks but model.n_layer is 3" in _refused(runner, tmp_path, "gpt2", "--init", exports["gpt2"],
                                                             "--set", "model.n_layer=3")
    assert "have 4 blocks but model.depth is 6" in _refused(runner, tmp_path, "vit", "--init", exports["vit"],
                                                           "--set", "model.depth=6")
    assert "has 3 blocks but this model has 4" in _refused(runner, tmp_path, "gpt2", "--initial-state", "0,0,1")
    assert "no local file or folder" in _refused(runner, tmp_path, "gpt2", "--init", tmp_path / "nope")
    assert "no file or folder" in _refused(runner, tmp_path, "vit", "--init", tmp_path / "nope")


def test_initial_state_is_validated_before_anything_loads(runner, tmp_path):
    assert "must be auto, all-tied, independent" in _refused(runner, tmp_path, "gpt2", "--initial-state",
                                                             "sideways", code=2)
    assert "holds its own tie state" in _refused(runner, tmp_path, "gpt2", "--variant", "no-tying",
                                                 "--initial-state", "independent", code=2)
    assert "asks for 9 independent blocks of 4" in _refused(runner, tmp_path, "gpt2", "--initial-state",
                                                            "static-sequence:9")


def test_config_show_prints_the_shape_an_init_folder_fixes(runner, exports):
    result = invoke(runner, "config", "show", "gpt2", "--preset", "gpt2-cpu", "--init", exports["gpt2"],
                    "--format", "json")
    assert result.exit_code == 0, result.stderr
    tree = json.loads(result.stdout)
    assert tree["model"]["n_layer"] == 4 and tree["model"]["n_embd"] == 64  # the folder's, not gpt2-cpu's 12 x 128
    assert tree["data"]["tokenizer"] == str(exports["gpt2"])


def test_older_bert_records_with_model_init_keep_their_all_tied_start():
    saved = {"backbone": "glue", "dataset": "rte", "variant": "dynamic",
             "model": {"num_hidden_layers": 4, "hidden_size": 64, "num_attention_heads": 2,
                       "intermediate_size": 256, "dropout": 0.0, "init": "/models/bert"}}
    settings = from_saved(GlueBackbone, saved)
    assert settings.init == "/models/bert" and settings.ties.initial_state == "all-tied"
    scratch = from_saved(GlueBackbone, {**saved, "model": {**saved["model"], "init": ""}})
    assert scratch.init == "" and scratch.ties.initial_state == "auto"


def test_gpt2_starts_from_a_plain_transformers_folder(runner, tmp_path):
    from transformers import GPT2Config, GPT2LMHeadModel

    folder = tmp_path / "hf-gpt2"  # a folder as save_pretrained writes it: no tokenizer, GPT-2's own GELU
    GPT2LMHeadModel(GPT2Config(vocab_size=600, n_layer=3, n_embd=32, n_head=2, n_positions=64)).save_pretrained(folder)
    db, run_id = tiny_run(runner, tmp_path, "gpt2", "--init", folder, "--max-steps", 2)
    config = json.loads(rows(db, "SELECT config FROM runs")[0][0])
    assert (config["model"]["n_layer"], config["model"]["n_embd"], config["data"]["tokenizer"]) == (3, 32, "bpe:512")
    assert _ties(db, run_id)[0][1:] == ([0, 1, 2], 3)
    too_long = _refused(runner, tmp_path, "gpt2", "--init", folder, "--set", "data.seq_len=128")
    assert "exceeds the 64 positions" in too_long


def test_vit_weights_of_another_task_are_adapted_by_timm(runner, tmp_path):
    import timm

    folder = tmp_path / "timm-vit"  # 3 channels, 16 px, 5 classes; digits are 1 channel, 8 px, 10 classes
    args = dict(img_size=16, patch_size=4, in_chans=3, num_classes=5, embed_dim=32, depth=3, num_heads=2,
                mlp_ratio=2.0)
    timm.models.save_for_hf(timm.create_model("vit_base_patch16_224", **args), str(folder), model_args=args,
                            safe_serialization=True)
    db, run_id = tiny_run(runner, tmp_path, "vit", "--init", folder, "--max-steps", 2)
    config = json.loads(rows(db, "SELECT config FROM runs")[0][0])
    assert (config["model"]["depth"], config["model"]["embed_dim"], config["model"]["patch_size"]) == (3, 32, 4)
    assert _ties(db, run_id)[0][1] == [0, 1, 2]
    assert rows(db, "SELECT count(*) FROM metrics WHERE run_id = ? AND split = 'test' AND name = 'accuracy'",
                run_id)[0][0] == 1


def test_only_a_scratch_bert_is_said_to_start_from_random_weights(exports):
    scratch = from_saved(GlueBackbone, {"backbone": "glue", "dataset": "rte", "preset": "bert-tiny"}, [])
    assert "random weights (no --init)" in GlueBackbone().start_notes(scratch)[0]
    pretrained = from_saved(GlueBackbone, {"backbone": "glue", "dataset": "rte", "preset": "bert-tiny",
                                           "init": str(exports["glue"])}, [])
    assert GlueBackbone().start_notes(pretrained) == []
