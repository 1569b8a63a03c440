"""Every registered backbone trains through the real CLI, and an out-of-tree plugin does too.

The parametrised test enumerates the registry, so a backbone is tested the day it is registered: it trains the
backbone's ``*-tiny`` preset for a few steps with several tie decisions and checks what the run logged
against the method (Eq. 1, measured weight sharing, validation during training, the final score once at
the end, memory rows).
"""

from __future__ import annotations

import itertools
import json
import textwrap
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from dyntie_cli.core.ties import transition
from dyntie_cli.plugins import all_backbones
from tests.conftest import invoke
from tests.conftest import rows as _rows

FIXTURES = Path(__file__).parent / "fixtures"
#: what a backbone needs beyond its defaults to run offline from the repository's own fixtures
EXTRA_ARGS = {"glue": ["--data-dir", FIXTURES / "glue"]}
#: the official split behind each backbone's final score (GLUE hides its test labels)
FINAL_SPLIT = {"glue": "validation"}
MAX_STEPS, DECIDE_EVERY, EVAL_EVERY = 10, 3, 5  # decisions at steps 3, 6, 9; validation at 5 and 10



def _tiny_preset(cls) -> str:
    tiny = [name for name in cls.presets if name.endswith("-tiny")]
    assert tiny, f"backbone {cls.name} has no *-tiny preset for tests (docs/plugins.md)"
    return tiny[0]


def train_tiny(runner: CliRunner, tmp: Path, name: str, cls, *extra) -> tuple[Path, str]:
    db = tmp / "r.duckdb"
    result = invoke(
        runner,
        cls.command,
        name,
        "--preset",
        _tiny_preset(cls),
        "--db",
        db,
        "--out",
        tmp / "runs",
        "--quiet",
        "--max-steps",
        MAX_STEPS,
        "--decide-every",
        DECIDE_EVERY,
        "--set",
        f"train.eval_every={EVAL_EVERY}",
        "--set",
        "train.log_every=5",
        *EXTRA_ARGS.get(name, []),
        *extra,
    )
    assert result.exit_code == 0, result.stderr or result.output
    run_id = next(
        line.split(": ", 1)[1] for line in result.stdout.splitlines() if line.startswith("run_id: ")
    )
    return db, run_id


def check_logged_run(db: Path, run_id: str, cls, final_split: str) -> None:
    """What any backbone's run must have logged (docs/method.md and docs/registry.md)."""
    status, command, test_split, metric, higher_is_better = _rows(
        db, "SELECT status, command, test_split, metric, higher_is_better FROM runs WHERE run_id = ?", run_id
    )[0]
    assert (status, command, test_split) == ("finished", cls.command, final_split)
    assert isinstance(metric, str) and isinstance(higher_is_better, bool)  # the headline, for reports
    ties = _rows(
        db,
        "SELECT decision, state, action, independent_layers, distinct_block_weights FROM ties "
        "WHERE run_id = ? ORDER BY decision",
        run_id,
    )
    assert len(ties) == 1 + (MAX_STEPS - 1) // DECIDE_EVERY  # the initial state, then every decision
    assert set(ties[0][1]) == {0}  # the paper's initial state: every block is block 0
    for prev, cur in itertools.pairwise(ties):
        assert transition(prev[1], cur[2]) == cur[1], "a logged state does not follow Eq. 1"
    for _, state, _, independent, distinct in ties:
        assert independent == sum(1 for i, r in enumerate(state) if r == i)
        assert distinct == independent, "measured weight storages disagree with the state"
    metrics = {
        (split, name, step)
        for split, name, step in _rows(db, "SELECT split, name, step FROM metrics WHERE run_id = ?", run_id)
    }
    assert ("validation", metric, EVAL_EVERY) in metrics  # model selection during training
    test_steps = {step for split, _, step in metrics if split == "test"}
    assert test_steps == {MAX_STEPS}  # the final score, once, at the last step
    assert ("test", metric, MAX_STEPS) in metrics and ("test", "loss", MAX_STEPS) in metrics
    rewards = _rows(
        db, "SELECT value FROM metrics WHERE run_id = ? AND split = 'reward' AND name = 'ppl'", run_id
    )
    assert rewards and all(value >= 1.0 for (value,) in rewards)  # exp(cross-entropy), never an accuracy
    memory = _rows(
        db, "SELECT step, trainable_params, param_bytes FROM memory WHERE run_id = ? ORDER BY step", run_id
    )
    assert [m[0] for m in memory] == [5, 10] and all(m[1] > 0 and m[2] > 0 for m in memory)


@pytest.mark.parametrize("name", sorted(all_backbones()))
def test_every_registered_backbone_trains_its_tiny_preset(name, runner, tmp_path):
    cls = all_backbones()[name].cls
    db, run_id = train_tiny(runner, tmp_path, name, cls)
    check_logged_run(db, run_id, cls, FINAL_SPLIT.get(name, "test"))
    config = json.loads(_rows(db, "SELECT config FROM runs WHERE run_id = ?", run_id)[0][0])
    assert config["preset"] == _tiny_preset(cls) and config["backbone"] == name


def test_builtins_are_registered_through_entry_points():
    found = all_backbones()
    for name, module in (("gpt2", "gpt2"), ("glue", "bert_glue"), ("vit", "vit")):
        assert found[name].source == "dyntie"
        assert found[name].cls.__module__ == f"dyntie_cli.backbones.{module}"
    assert found["glue"].cls.command == "finetune" and found["vit"].cls.command == "train"


def test_backbones_command_lists_glue_and_vit_with_their_presets(runner):
    result = invoke(runner, "backbones")
    assert result.exit_code == 0
    for text in (
        "dyntie finetune glue",
        "bert-tiny",
        "bert-cpu",
        "bert-paper",
        "rte",
        "mrpc",
        "cola",
        "dyntie train vit",
        "vit-tiny",
        "vit-cpu",
        "vit-paper",
        "digits",
        "imagefolder:PATH",
    ):
        assert text in result.stdout, text


# -- a third-party backbone, found through its own distribution's entry point --------------------------

PLUGIN_SOURCE = '''
"""An out-of-tree backbone: residual MLP blocks on a synthetic classification task; nothing from dyntie's own
backbones, so the core is exercised through the plugin interface alone."""
import math
import torch
import torch.nn.functional as F
from torch import nn
from dyntie_cli.backbone import Backbone, Preset


class Block(nn.Module):
    def __init__(self, width):
        super().__init__()
        self.norm = nn.LayerNorm(width)
        self.fc = nn.Linear(width, width)

    def forward(self, x):
        return x + self.fc(F.gelu(self.norm(x)))


class Net(nn.Module):
    def __init__(self, dim, width, depth, classes):
        super().__init__()
        self.inp = nn.Linear(dim, width)
        self.layers = nn.ModuleList(Block(width) for _ in range(depth))
        self.head = nn.Linear(width, classes)

    def forward(self, x):
        h = self.inp(x)
        for layer in self.layers:
            h = layer(h)
        return self.head(h)


class Blobs:
    """Gaussian blobs: 4 classes in 8 dimensions, fixed by a seed."""
    test_split = "test"
    source = "synthetic gaussian blobs"

    def __init__(self, batch_size):
        g = torch.Generator().manual_seed(0)
        self.centers = torch.randn(4, 8, generator=g) * 2
        self.batch_size = batch_size
        self.fixed = {split: self._draw(torch.Generator().manual_seed(seed), 64)
                      for split, seed in (("validation", 1), ("test", 2))}

    def _draw(self, g, n):
        labels = torch.randint(4, (n,), generator=g)
        return {"x": self.centers[labels] + torch.randn(n, 8, generator=g), "labels": labels}

    def train_batch(self, generator):
        return self._draw(generator, self.batch_size)

    def eval_batches(self, split, max_items=None):
        yield self.fixed[split]

    def items_per_batch(self):
        return self.batch_size


class ToyBackbone(Backbone):
    name = "toy"
    description = "residual MLP on gaussian blobs (test plugin)"
    command = "train"
    presets = {"toy-tiny": Preset("toy-tiny", "5 x 16", model=dict(depth=5, width=16),
                                  data=dict(batch_size=16),
                                  train=dict(max_steps=10, warmup_steps=2, eval_every=5, log_every=5))}
    default_preset = "toy-tiny"
    datasets = ["blobs"]
    default_dataset = "blobs"
    metric = "accuracy"
    higher_is_better = True

    def load_data(self, cfg):
        return Blobs(cfg.data["batch_size"])

    def build_model(self, cfg, data):
        return Net(8, cfg.model["width"], cfg.model["depth"], 4)

    def blocks(self, model):
        return list(model.layers)

    def loss(self, model, batch):
        return F.cross_entropy(model(batch["x"]), batch["labels"]), len(batch["labels"])

    @torch.no_grad()
    def evaluate(self, model, batches):
        total, correct, n = 0.0, 0, 0
        for batch in batches:
            logits = model(batch["x"])
            total += float(F.cross_entropy(logits, batch["labels"], reduction="sum"))
            correct += int((logits.argmax(-1) == batch["labels"]).sum())
            n += len(batch["labels"])
        return {"loss": total / n, "ppl": math.exp(total / n), "accuracy": correct / n}
'''


@pytest.fixture
def toy_plugin(tmp_path, monkeypatch):
    """A distribution on sys.path whose dist-info declares a ``dyntie.backbones`` entry point: the path a
    ``pip install``-ed third-party package takes, found by importlib.metadata like the built-ins."""
    site = tmp_path / "site"
    site.mkdir()
    (site / "dyntie_toy_plugin.py").write_text(textwrap.dedent(PLUGIN_SOURCE))
    info = site / "dyntie_toy_plugin-0.1.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: dyntie-toy-plugin\nVersion: 0.1\n")
    (info / "entry_points.txt").write_text("[dyntie.backbones]\ntoy = dyntie_toy_plugin:ToyBackbone\n")
    monkeypatch.syspath_prepend(str(site))
    yield site
    import sys

    sys.modules.pop("dyntie_toy_plugin", None)


def test_out_of_tree_plugin_is_listed_and_trains_from_the_cli(toy_plugin, runner, tmp_path):
    registered = all_backbones()["toy"]
    assert registered.source == "dyntie-toy-plugin"
    listing = invoke(runner, "backbones", "toy")
    assert listing.exit_code == 0 and "dyntie-toy-plugin" in listing.stdout and "toy-tiny" in listing.stdout
    db, run_id = train_tiny(runner, tmp_path, "toy", registered.cls)
    check_logged_run(db, run_id, registered.cls, "test")


def test_a_plugin_without_the_export_init_and_text_hooks_says_so_in_one_sentence(toy_plugin, runner, tmp_path):
    db, run_id = train_tiny(runner, tmp_path, "toy", all_backbones()["toy"].cls)
    refused = invoke(runner, "export", run_id, "--out", tmp_path / "out", "--db", db)
    assert refused.exit_code == 1 and not (tmp_path / "out").exists()
    assert refused.stderr == ("Error: Backbone toy cannot export: its plugin does not implement outputs, "
                              "export_model, load_exported (docs/plugins.md).\n")
    started = invoke(runner, "train", "toy", "--init", tmp_path, "--db", db, "--quiet")
    assert started.exit_code == 1
    assert started.stderr == "Error: Backbone toy cannot start from --init weights; train it from scratch.\n"
    generated = invoke(runner, "generate", run_id, "--prompt", "x", "--db", db)
    assert generated.exit_code == 2
    assert generated.stderr == (f"Error: Run {run_id} is a toy run, which does not generate text; generate works "
                                "with runs of: gpt2, llama.\n")


def test_gpt2_uses_gpt2s_gelu_fused_and_it_saves_activation_memory():
    """The backbone's GELU is GPT-2's tanh approximation ("gelu_new") computed by one fused op: the same
    outputs, and autograd keeps less for the backward pass."""
    import types

    from transformers import GPT2LMHeadModel

    from dyntie_cli.runner.settings_source import SettingsSource, new_settings

    backbone, cfg = new_settings("gpt2", SettingsSource("gpt2-tiny"))
    fused = backbone.build_model(cfg, types.SimpleNamespace(vocab_size=512, tokenizer=None))
    assert fused.config.activation_function == "gelu_pytorch_tanh"
    reference = GPT2LMHeadModel(fused.config.__class__(**{**fused.config.to_dict(), "activation_function": "gelu_new"}))
    reference.load_state_dict(fused.state_dict())
    x = torch.randint(0, 512, (2, 32), generator=torch.Generator().manual_seed(0))

    def saved_bytes(model):
        params = {p.untyped_storage().data_ptr() for p in model.parameters()}
        seen: dict[int, int] = {}

        def pack(t):
            if t.untyped_storage().data_ptr() not in params:
                seen[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            logits = model(input_ids=x).logits
        return logits, sum(seen.values())

    a, fused_bytes = saved_bytes(fused)
    b, reference_bytes = saved_bytes(reference)
    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    assert fused_bytes < 0.8 * reference_bytes


@pytest.mark.parametrize("name", ["gpt2", "vit"])
def test_loading_the_model_code_draws_no_random_numbers(name):
    """Before measuring the memory baseline the loop has the backbone load its model code (by default a build on
    the meta device); that must leave the seeded initialisation of the real model exactly as it was."""
    from dyntie_cli.runner.settings_source import SettingsSource, new_settings

    backbone, cfg = new_settings(name, SettingsSource(_tiny_preset(all_backbones()[name].cls)))
    data = backbone.load_data(cfg)
    torch.manual_seed(0)
    reference = backbone.build_model(cfg, data).state_dict()
    torch.manual_seed(0)
    with torch.device("meta"):
        assert all(p.is_meta for p in backbone.build_model(cfg, data).parameters())
    backbone.load_model_code(cfg, data)
    built = backbone.build_model(cfg, data).state_dict()
    assert reference.keys() == built.keys() and all(torch.equal(reference[k], built[k]) for k in reference)
