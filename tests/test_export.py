"""`dyntie export`: a run's last checkpoint as a plain transformers/timm folder (full) or with each independent
block once (compact, reloaded by ``load_tied`` with real sharing), each checked by its own round trip.

The plain-library checks run in a fresh Python process that never imports dyntie.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from dyntie_cli import load_tied
from dyntie_cli.export import COMPACT_WEIGHTS, weights_bytes
from dyntie_cli.results.writer import RunWriter
from tests.conftest import TINY_RUNS, TINY_STATE, invoke

BACKBONES = tuple(TINY_RUNS)
STATE = TINY_STATE


def _export(runner, db, run_id, out, *extra):
    return invoke(runner, "export", run_id, "--out", out, "--db", db, *extra)


#: loads an export with the plain library and prints the largest difference from the run's outputs; dyntie is
#: never imported (asserted at the end)
PLAIN_LOADER = r"""
import json, sys, torch
folder, case = sys.argv[1], torch.load(sys.argv[2])
batch, want, backbone = case["batch"], case["outputs"], case["backbone"]
out = {}
with torch.no_grad():
    if backbone == "vit":
        import timm
        config = json.load(open(folder + "/config.json"))
        local = timm.create_model("local-dir:" + folder, pretrained=True).eval()
        overlay = dict(config["pretrained_cfg"], file=folder + "/model.safetensors")
        named = timm.create_model(config["architecture"], pretrained=True, pretrained_cfg_overlay=overlay,
                                  **config["model_args"]).eval()
        out["local-dir"] = (local(batch["pixel_values"]) - want).abs().max().item()
        out["overlay"] = (named(batch["pixel_values"]) - want).abs().max().item()
    else:
        import transformers
        from transformers import AutoTokenizer
        kind = "AutoModelForCausalLM" if backbone in ("gpt2", "llama") else "AutoModelForSequenceClassification"
        model = getattr(transformers, kind).from_pretrained(folder).eval()
        inputs = {k: v for k, v in batch.items() if k != "labels"}
        out["from_pretrained"] = (model(**inputs).logits - want).abs().max().item()
        tokenizer = AutoTokenizer.from_pretrained(folder)
        out["ids"] = tokenizer(case["text"], add_special_tokens=backbone == "glue")["input_ids"]
assert not any(m.startswith("dyntie") for m in sys.modules), "the plain loader imported dyntie"
print(json.dumps(out))
"""


def _case(exported: dict, tmp_path) -> tuple[Path, dict]:
    """What the fresh process compares with: the run's own outputs on the fixed batch, its tokenizer's ids."""
    rm = exported["run_model"]
    text = "The quick brown fox, said she, jumped over 12 lazy dogs."
    case = {"batch": exported["batch"], "outputs": exported["outputs"], "backbone": rm.backbone.name, "text": text}
    if rm.backbone.name in ("gpt2", "llama"):
        case["ids"] = rm.data.tokenizer.encode(text).tolist()
    elif rm.backbone.name == "glue":
        case["ids"] = rm.data.tokenizer.tokenizer.encode(text).ids
    path = tmp_path / "case.pt"
    torch.save(case, path)
    return path, case


@pytest.mark.parametrize("backbone", BACKBONES)
def test_full_export_loads_with_the_plain_library_in_a_fresh_process(tiny_exports, tmp_path, backbone):
    exported = tiny_exports[backbone]
    out = exported["full"]
    assert "round trip: max abs difference 0 (limit 1e-05)" in exported["full_stdout"]
    assert (out / "model.safetensors").is_file() and not list(out.parent.glob(".*"))
    config = json.loads((out / "config.json").read_text())
    assert config["dyntie_format"] == "full" and config["dyntie_tie_map"] == STATE
    case_file, case = _case(exported, tmp_path)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-c", PLAIN_LOADER, str(out), str(case_file)], capture_output=True,
                          text=True, env=env, cwd=tmp_path, timeout=300, check=False)
    assert proc.returncode == 0, proc.stderr
    got = json.loads(proc.stdout.strip().splitlines()[-1])
    for route, difference in got.items():
        if route != "ids":
            assert difference <= 1e-5, (route, difference)
    if "ids" in case:  # the run's own tokenizer, loaded by AutoTokenizer
        assert got["ids"] == case["ids"]


@pytest.mark.parametrize("backbone", BACKBONES)
def test_compact_export_reloads_with_shared_storage_at_the_trainable_fraction(tiny_exports, backbone):
    exported = tiny_exports[backbone]
    full, compact = exported["full"], exported["compact"]
    assert not (compact / "model.safetensors").exists() and (compact / COMPACT_WEIGHTS).is_file()
    assert json.loads((compact / "config.json").read_text())["dyntie_tie_map"] == STATE

    model = load_tied(compact)
    ties = model.dyntie_ties
    assert ties.state == STATE
    assert ties.distinct_block_weights() == ties.independent_layers == 2
    for i, root in enumerate(STATE):  # a tied block computes with its root's storage
        for mine, theirs in zip(ties.block_tensors(i), ties.block_tensors(root)):
            assert mine.untyped_storage().data_ptr() == theirs.untyped_storage().data_ptr()
    # parameters counted once: the always-trained ones plus one block per independent block
    plain = load_tied(full)  # a full export loads through load_tied too
    counted = sum(p.numel() for p in model.parameters())
    assert counted == sum(p.numel() for p in plain.parameters())
    conventional = counted + ties.block_numel() * (ties.num_blocks - ties.independent_layers)
    fraction = counted / conventional
    assert weights_bytes(compact) / weights_bytes(full) == pytest.approx(fraction, abs=0.01)
    assert f"({weights_bytes(compact) / weights_bytes(full):.3f} of full)" in exported["compact_stdout"]

    backbone_ = exported["run_model"].backbone
    with torch.no_grad():
        for loaded in (model, plain):
            assert (backbone_.outputs(loaded, exported["batch"]) - exported["outputs"]).abs().max() <= 1e-5


def test_a_compact_folder_does_not_half_load_with_the_plain_library(tiny_exports):
    from transformers import AutoModelForCausalLM

    with pytest.raises(OSError):  # no model.safetensors: loud, never random tied blocks
        AutoModelForCausalLM.from_pretrained(tiny_exports["gpt2"]["compact"])


def test_export_refuses_bad_input_in_one_sentence_and_overwrites_nothing(runner, tiny_runs, tmp_path):
    db, run_id = tiny_runs["gpt2"]
    unknown = _export(runner, db, "gpt2-nope", tmp_path / "x")
    assert unknown.exit_code != 0 and "Traceback" not in unknown.stderr
    assert "gpt2-nope" in unknown.stderr and not (tmp_path / "x").exists()

    taken = tmp_path / "taken"
    taken.mkdir()
    (taken / "notes.txt").write_text("mine")
    refused = _export(runner, db, run_id, taken)
    assert refused.exit_code == 2 and "--overwrite" in refused.stderr
    assert refused.stderr.count("\n") == 1 and "Traceback" not in refused.stderr
    assert [p.name for p in taken.iterdir()] == ["notes.txt"]
    replaced = _export(runner, db, run_id, taken, "--overwrite")
    assert replaced.exit_code == 0 and (taken / "model.safetensors").is_file()
    assert not (taken / "notes.txt").exists() and not list(tmp_path.glob(".taken*"))

    bad_format = _export(runner, db, run_id, tmp_path / "y", "--format", "zip")
    assert bad_format.exit_code == 2 and "full or compact" in bad_format.stderr


def _recorded_copy(db: Path, run_id: str, out_dir: Path | None, status: str | None) -> str:
    """A second registry row with run_id's settings, pointing at ``out_dir``, left ``running`` (this process is
    alive) or finished with ``status``."""
    from dyntie_cli.results.lineage import load_run

    source = load_run(db, run_id)
    writer = RunWriter(db, backbone=source.backbone)
    writer.start(source.command, source.backbone, "wikitext-2", source.variant, source.config,
                 out_dir=None if out_dir is None else str(out_dir))
    if status:
        writer.finish(status)
    return writer.run_id


def test_export_takes_a_running_or_killed_runs_last_checkpoint_and_refuses_one_without(runner, tiny_runs, tmp_path):
    from dyntie_cli.results.lineage import load_run

    db, run_id = tmp_path / "r.duckdb", tiny_runs["gpt2"][1]
    shutil.copy(tiny_runs["gpt2"][0], db)  # the rows added here stay out of the shared registry
    folder = Path(load_run(db, run_id).out_dir)
    for status in (None, "killed"):
        other = _recorded_copy(db, run_id, folder, status)
        assert load_run(db, other).status == (status or "running")
        result = _export(runner, db, other, tmp_path / f"e-{status}")
        assert result.exit_code == 0, result.stderr
    empty = _recorded_copy(db, run_id, tmp_path / "never-saved", "killed")
    result = _export(runner, db, empty, tmp_path / "z")
    assert result.exit_code == 1 and "has no checkpoint yet" in result.stderr
    assert result.stderr.count("\n") == 1 and not (tmp_path / "z").exists()


@pytest.mark.parametrize("backbone", ["gpt2", "llama"])
def test_generate_samples_continuations_from_a_language_model_run_and_refuses_runs_that_do_not_generate(
        runner, tiny_runs, backbone):
    db, run_id = tiny_runs[backbone]
    args = ("generate", run_id, "--prompt", "The city of", "--samples", 2, "--max-new-tokens", 40, "--db", db)
    first, again = invoke(runner, *args, "--seed", 1), invoke(runner, *args, "--seed", 1)
    assert first.exit_code == 0, first.stderr or first.output
    assert first.stdout == again.stdout  # seeded
    samples = first.stdout.split("--- sample ")[1:]
    assert len(samples) == 2 and all(s.split("\n", 1)[1].startswith("The city of") for s in samples)
    # 40 new tokens on a model of 32 positions: the context slides
    assert all(len(s.split("\n", 1)[1]) > len("The city of") + 20 for s in samples)
    vit_db, vit_run = tiny_runs["vit"]
    refused = invoke(runner, "generate", vit_run, "--prompt", "x", "--db", vit_db)
    assert refused.exit_code == 2 and refused.stdout == ""
    assert (f"Run {vit_run} is a vit run, which does not generate text; generate works with runs of: gpt2, llama"
            in refused.stderr.replace("\n", " "))
    assert refused.stderr.count("Error") == 1 and "Traceback" not in refused.stderr


def test_an_export_that_fails_its_round_trip_writes_nothing_and_keeps_the_old_folder(runner, tiny_runs, tmp_path,
                                                                                    monkeypatch):
    from dyntie_cli.backbones.gpt2 import GPT2Backbone

    db, run_id = tiny_runs["gpt2"]
    out = tmp_path / "out"
    assert _export(runner, db, run_id, out).exit_code == 0
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    real = GPT2Backbone.export_model

    def drifting(self, model, data, cfg, folder):  # a real export of slightly different weights
        with torch.no_grad():
            model.transformer.h[1].mlp.c_fc.weight.mul_(1.5)  # an independent block
        real(self, model, data, cfg, folder)

    monkeypatch.setattr(GPT2Backbone, "export_model", drifting)
    for fmt in ("full", "compact"):
        failed = _export(runner, db, run_id, out, "--overwrite", "--format", fmt)
        assert failed.exit_code == 1 and "nothing was written" in failed.stderr, failed.stderr
        assert {p.name: p.read_bytes() for p in out.iterdir()} == before
        assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]  # no staging folder left behind


def test_importing_dyntie_cli_stays_cheap():
    code = "import sys, dyntie_cli; print(sorted(m for m in ('torch', 'transformers', 'timm') if m in sys.modules))"
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=60)
    assert proc.stdout.strip() == "[]"


def test_a_load_tied_model_keeps_its_ties_through_a_dtype_move(tiny_exports):
    exported = tiny_exports["gpt2"]
    model = load_tied(exported["compact"]).double()  # .double() skips the tied blocks' plain tensors
    with torch.no_grad():
        logits = model(input_ids=exported["batch"]["input_ids"], use_cache=False).logits
    ties = model.dyntie_ties
    assert logits.dtype == torch.float64 and ties.distinct_block_weights() == ties.independent_layers
    assert all(t.dtype == torch.float64 for i in range(ties.num_blocks) for t in ties.block_tensors(i))
    assert (logits - exported["outputs"].double()).abs().max() < 1e-4
