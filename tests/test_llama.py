"""The Llama-family backbone: the generic form (Qwen2, Mistral, a local config), generation with the KV cache on
a tied model, a start from a plain ``save_pretrained`` folder, resume, plan, bench and study, and the Trainer
callback. What it shares with every backbone (training, export, ``--init`` from an export, the lazy build, a
fixed-seed record) is tested where every backbone is."""

from __future__ import annotations

import json
import os
import signal

import pytest
import torch

from tests.conftest import TINY_STATE, invoke, rows, tiny_run

TINY = ("--preset", "llama-tiny", "--max-steps", "6", "--decide-every", "2")


def _config(db, run_id=None) -> dict:
    sql = "SELECT config FROM runs" + (" WHERE run_id = ?" if run_id else "")
    return json.loads(rows(db, sql, *([run_id] if run_id else []))[0][0])


@pytest.mark.parametrize("backbone", ["gpt2", "llama"])
def test_a_tied_model_generates_with_the_kv_cache_what_its_materialised_copy_does(tiny_exports, backbone):
    from transformers import AutoModelForCausalLM

    exported = tiny_exports[backbone]
    tied = exported["run_model"].model  # blocks 2 and 3 compute with the storage of blocks 0 and 1
    ties = exported["run_model"].ties
    assert ties.state == TINY_STATE and ties.distinct_block_weights() == 2
    plain = AutoModelForCausalLM.from_pretrained(exported["full"]).eval()
    prompt = exported["batch"]["input_ids"][:2, :8]
    args = dict(max_new_tokens=16, do_sample=False, output_scores=True, return_dict_in_generate=True,
                pad_token_id=0)
    with torch.no_grad():
        cached = tied.generate(prompt, use_cache=True, **args)
        uncached = tied.generate(prompt, use_cache=False, **args)
        reference = plain.generate(prompt, use_cache=True, **args)
    assert torch.equal(cached.sequences, reference.sequences)
    assert torch.equal(cached.sequences, uncached.sequences)
    for a, b in zip(cached.scores, reference.scores, strict=True):
        assert (a - b).abs().max() <= 1e-4
    assert ties.distinct_block_weights() == 2  # generating left the ties as they were


@pytest.mark.parametrize("arch, cls", [("qwen2", "Qwen2ForCausalLM"), ("mistral", "MistralForCausalLM")])
def test_the_generic_form_trains_qwen2_and_mistral_by_architecture(runner, tmp_path, arch, cls):
    from dyntie_cli.export import load_run_model

    db, run_id = tiny_run(runner, tmp_path, "llama", *TINY[2:], "--set", f"model.arch={arch}")
    assert _config(db)["model"]["arch"] == arch
    model = load_run_model(db, run_id).model
    assert type(model).__name__ == cls
    if arch == "qwen2":  # Qwen2's own architecture: biases on the query, key and value projections
        assert model.model.layers[0].self_attn.q_proj.bias is not None


def test_a_local_config_of_another_decoder_trains_at_the_settings_shape(runner, tmp_path):
    from transformers import Qwen2Config

    from dyntie_cli.export import load_run_model

    folder = tmp_path / "qwen2-config"  # the config of a 24-block model, trained here at the preset's 4 x 64
    Qwen2Config(num_hidden_layers=24, hidden_size=896, intermediate_size=4864, num_attention_heads=14,
                num_key_value_heads=2, rms_norm_eps=1e-5, vocab_size=151936).save_pretrained(folder)
    db, run_id = tiny_run(runner, tmp_path, "llama", *TINY[2:], "--set", f"model.config={folder}")
    assert _config(db)["model"]["config"] == str(folder.resolve())
    model = load_run_model(db, run_id).model
    assert type(model).__name__ == "Qwen2ForCausalLM" and model.config.rms_norm_eps == 1e-5
    assert len(model.model.layers) == 4 and model.config.hidden_size == 64
    assert model.config.layer_types == ["full_attention"] * 4


def test_a_config_without_model_layers_or_a_bad_shape_is_refused_in_one_sentence(runner, tmp_path):
    from transformers import GPT2Config

    folder = tmp_path / "gpt2-config"
    GPT2Config(n_layer=2, n_embd=32, n_head=2).save_pretrained(folder)
    for args, words in (((f"model.config={folder}",), "no block list at model.layers"),
                        ((f"model.config={tmp_path / 'nope'}",), "does not exist"),
                        (("model.num_key_value_heads=3",), "must be a multiple")):
        sets = [x for a in args for x in ("--set", a)]
        r = invoke(runner, "train", "llama", *TINY, *sets, "--db", tmp_path / "r.duckdb", "--out", tmp_path / "o",
                   "--quiet")
        assert r.exit_code == 1 and words in r.stderr, r.stderr
        assert "Traceback" not in r.stderr and r.stderr.count("\n") == 1


def test_init_from_a_plain_save_pretrained_folder_starts_from_its_weights(runner, tmp_path):
    from transformers import LlamaConfig, LlamaForCausalLM

    from dyntie_cli.runner.settings_source import recorded_settings

    folder = tmp_path / "hf-llama"  # as save_pretrained writes it: no tokenizer, its own untied head
    torch.manual_seed(1)
    LlamaForCausalLM(LlamaConfig(vocab_size=600, num_hidden_layers=3, hidden_size=32, intermediate_size=64,
                                 num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                                 tie_word_embeddings=False)).save_pretrained(folder)
    db, run_id = tiny_run(runner, tmp_path, "llama", "--init", folder, "--max-steps", 2,
                          "--set", "train.eval_at_start=true")
    config = _config(db)
    assert config["model"]["num_hidden_layers"] == 3 and config["model"]["hidden_size"] == 32
    assert config["model"]["tie_word_embeddings"] is False and config["data"]["tokenizer"] == "bpe:512"
    assert rows(db, "SELECT state FROM ties WHERE decision = 0")[0][0] == [0, 1, 2]
    # the step-0 score is the folder's model on the run's own validation windows
    backbone, settings = recorded_settings(config, [])
    data = backbone.load_data(settings)
    plain = LlamaForCausalLM.from_pretrained(folder).eval()
    want = backbone.evaluate(plain, data.eval_batches("validation", settings.train.eval_items))
    got = dict(rows(db, "SELECT name, value FROM metrics WHERE split = 'validation' AND step = 0"))
    assert got["loss"] == pytest.approx(want["loss"], rel=1e-6)
    assert "has 3 blocks but model.num_hidden_layers is 2" in invoke(
        runner, "train", "llama", "--preset", "llama-tiny", "--init", folder, "--set", "model.num_hidden_layers=2",
        "--db", tmp_path / "x.duckdb", "--quiet").stderr


def test_a_stopped_llama_run_resumes_to_the_uninterrupted_result(tmp_path):
    from dyntie_cli.core.loop import Job
    from dyntie_cli.errors import DyntieError
    from dyntie_cli.runner.jobs import Launch, resume_recorded, run_job
    from dyntie_cli.runner.settings_source import SettingsSource, new_settings

    flags = (("train.max_steps", 12), ("ties.decide_every", 2), ("train.eval_every", 4), ("train.log_every", 2))
    backbone, settings = new_settings("llama", SettingsSource("llama-tiny", flags=flags))

    def run(name, listen=None):
        launch = Launch(tmp_path / f"{name}.duckdb", tmp_path / name, quiet=True)
        return run_job(backbone, Job(settings), launch, print_summary=False, listen=listen)

    def stop_at_six(event):
        if event["type"] == "log" and event["step"] == 6:
            os.kill(os.getpid(), signal.SIGTERM)  # the loop stops at this step boundary, checkpointed

    reference = run("ref")
    with pytest.raises(DyntieError, match="resume it with"):
        run("stopped", stop_at_six)
    db = tmp_path / "stopped.duckdb"
    (run_id, status), = rows(db, "SELECT run_id, status FROM runs")
    assert status == "killed"
    resumed = resume_recorded(db, run_id, quiet=True, print_summary=False)
    assert resumed.final == reference.final  # bit-identical
    ties = "SELECT decision, step, state FROM ties ORDER BY decision"
    assert rows(db, ties) == rows(tmp_path / "ref.duckdb", ties)


def test_plan_bench_and_study_run_the_llama_backbone(runner, tmp_path):
    plan = invoke(runner, "plan", "train", "llama", "--preset", "llama-tiny", "--variants", "no-tying,dynamic",
                  "--format", "json")
    assert plan.exit_code == 0, plan.stderr
    plans = {p["variant"]: p for p in json.loads(plan.stdout)}
    db = tmp_path / "r.duckdb"
    bench = invoke(runner, "bench", "llama", *TINY, "--variants", "no-tying,dynamic", "--db", db, "--out",
                   tmp_path / "runs", "--format", "json", "--quiet")
    assert bench.exit_code == 0, bench.stderr
    assert rows(db, "SELECT backbone, command, variant, status FROM runs ORDER BY variant") == [
        ("llama", "bench", "dynamic", "finished"), ("llama", "bench", "no-tying", "finished")]
    # the plan counts the parameters the conventional run then held
    held = rows(db, "SELECT max(param_bytes) FROM memory JOIN runs USING (run_id) WHERE variant = 'no-tying'")
    assert held[0][0] == plans["no-tying"]["parameter_bytes"]
    study = invoke(runner, "study", "llama", *TINY, "--seeds", "0", "--variants", "dynamic,no-tying", "--db",
                   tmp_path / "s.duckdb", "--out", tmp_path / "runs", "--format", "json", "--quiet")
    assert study.exit_code == 0, study.stderr
    assert rows(tmp_path / "s.duckdb", "SELECT count(*) FROM runs WHERE backbone = 'llama' AND "
                                       "status = 'finished'")[0][0] == 2


def test_the_trainer_callback_ties_a_llama_inside_a_transformers_trainer(tmp_path, monkeypatch):
    pytest.importorskip("accelerate")
    from transformers import LlamaConfig, LlamaForCausalLM, Trainer, TrainingArguments

    from dyntie_cli import DynamicTyingCallback

    class Counting(torch.utils.data.Dataset):
        def __len__(self):
            return 256

        def __getitem__(self, i):
            tokens = (i + torch.arange(16)) % 64
            return {"input_ids": tokens, "labels": tokens}

    monkeypatch.chdir(tmp_path)
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(num_hidden_layers=4, hidden_size=32, intermediate_size=64,
                                         num_attention_heads=4, num_key_value_heads=2, vocab_size=64,
                                         max_position_embeddings=16))
    callback = DynamicTyingCallback(decide_every=3, agent_options=dict(keep_bias=0.0), db=tmp_path / "r.duckdb")
    args = TrainingArguments(output_dir="out", max_steps=12, per_device_train_batch_size=4, learning_rate=3e-3,
                             save_strategy="no", report_to="none", use_cpu=True, disable_tqdm=True)
    Trainer(model=model, args=args, train_dataset=Counting(), callbacks=[callback]).train()
    tying = callback.tying
    assert [b is m for b, m in zip(tying.ties.blocks, model.model.layers, strict=True)] == [True] * 4
    assert len(tying.history) == 1 + 11 // 3
    for row in tying.history:
        assert row.distinct_block_weights == row.independent_layers
    x = torch.arange(16)[None] % 64
    with torch.no_grad():
        before = model(input_ids=x).logits
        tying.materialize()
        assert torch.equal(model(input_ids=x).logits, before)

