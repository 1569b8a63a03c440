"""The GLUE backbone: TSV quirks, the task table, splits, tokenizer, metrics, the reward, and real runs."""

from __future__ import annotations

import csv
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from dyntie_cli.backbones.bert_glue import PRESETS, GlueBackbone
from dyntie_cli.backbones.glue_data import GlueData, load_glue_data
from dyntie_cli.backbones.glue_splits import find_task_folder, hold_out, read_glue_tsv
from dyntie_cli.backbones.glue_tasks import TASKS, get_task
from dyntie_cli.backbones.metrics import f1_binary, matthews_corrcoef, pearson, spearman
from dyntie_cli.backbones.wordpiece import get_wordpiece
from dyntie_cli.errors import DyntieError, UsageError
from dyntie_cli.settings import RunSettings, resolve
from tests.conftest import SHARED, invoke
from tests.conftest import rows as _rows

FIXTURES = Path(__file__).parent / "fixtures" / "glue"
GLUE = SHARED / "glue"
needs_glue = pytest.mark.skipif(
    not (GLUE / "RTE" / "train.tsv").is_file(), reason="../shared/data/glue is absent"
)

# Row counts documented in ../shared/data/PROVENANCE.md (train, dev)
GLUE_ROWS = {
    "cola": (8551, 1043),
    "sst2": (67349, 872),
    "rte": (2490, 277),
    "mrpc": (3668, 408),
    "wnli": (635, 71),
    "stsb": (5749, 1500),
}


def _cfg(task: str, preset: str = "bert-tiny", **data) -> RunSettings:
    pairs = [("data_dir", str(FIXTURES)), *((f"data.{k}", v) for k, v in data.items())]
    return resolve(GlueBackbone, PRESETS[preset], dataset=task, sources=[pairs])



# -- TSV quirks -----------------------------------------------------------------------------------------


def test_mrpc_bom_is_stripped_and_quotes_are_literal():
    path = FIXTURES / "MRPC" / "train.tsv"
    assert path.read_bytes().startswith(b"\xef\xbb\xbf")  # the fixture keeps the real file's BOM
    examples, bad = read_glue_tsv(path, get_task("mrpc"))
    assert bad == 0 and len(examples) == 120  # every line after the header is one row
    assert examples.texts[0][0].startswith('Amrozi accused his brother , whom he called " the witness "')
    assert examples.labels[:2] == [1.0, 0.0]
    # the quirk is real: a quoting CSV reader merges lines in this very file
    with path.open(encoding="utf-8-sig", newline="") as f:
        assert len(list(csv.reader(f, delimiter="\t"))) - 1 < 120


def test_cola_has_no_header_so_the_first_line_is_data():
    examples, bad = read_glue_tsv(FIXTURES / "CoLA" / "train.tsv", get_task("cola"))
    assert bad == 0 and len(examples) == 120
    assert examples.texts[0] == ("Our friends won't buy this analysis, let alone the next one we propose.",)
    assert set(examples.labels) == {0.0, 1.0}


def test_label_strings_map_to_the_hubs_class_ids():
    rte, _ = read_glue_tsv(FIXTURES / "RTE" / "dev.tsv", get_task("rte"))
    assert (
        rte.labels[0] == 1.0
    )  # first dev row is not_entailment; the hub's ids: entailment 0, not_entailment 1
    assert get_task("mnli").labels == ("entailment", "neutral", "contradiction")
    stsb, _ = read_glue_tsv(FIXTURES / "STS-B" / "dev.tsv", get_task("stsb"))
    assert stsb.labels[:2] == [5.0, 4.75] and get_task("stsb").regression


def test_a_file_with_many_unreadable_rows_is_rejected(tmp_path):
    bad = tmp_path / "train.tsv"
    bad.write_text("index\tsentence1\tsentence2\tlabel\n" + "0\tonly two\tcolumns\n" * 5)
    with pytest.raises(DyntieError, match="unknown label"):
        read_glue_tsv(bad, get_task("rte"))


@needs_glue
@pytest.mark.parametrize("task", sorted(GLUE_ROWS))
def test_real_glue_files_parse_to_their_documented_row_counts(task):
    t = get_task(task)
    folder = find_task_folder(GLUE, t)
    counts = []
    for name in ("train.tsv", t.dev_file):
        examples, bad = read_glue_tsv(folder / name, t)
        assert bad == 0
        counts.append(len(examples))
    assert tuple(counts) == GLUE_ROWS[task]


def test_task_table_names_and_folder_spellings():
    assert {"rte", "mrpc", "cola", "sst2", "qnli", "wnli", "stsb", "mnli", "qqp"} <= set(TASKS)
    assert get_task("SST-2") is get_task("sst2") and get_task("STS-B").name == "stsb"
    assert get_task("cola").metrics == ("accuracy", "mcc") and "f1" in get_task("mrpc").metrics
    assert "f1" in get_task("qqp").metrics
    with pytest.raises(UsageError, match="--task"):
        get_task("squad")


# -- splits ---------------------------------------------------------------------------------------------


def test_hold_out_is_disjoint_seeded_and_independent_of_the_run_seed():
    train, val = hold_out(1000, 0.1)
    assert len(val) == 100 and not set(train) & set(val) and len(set(train) | set(val)) == 1000
    again_train, again_val = hold_out(1000, 0.1)
    assert (again_val == val).all() and (again_train == train).all()


def test_roles_validation_is_carved_from_train_and_test_is_glue_dev():
    data = load_glue_data(
        "rte", data_dir=FIXTURES, tokenizer="auto", max_seq_len=64, batch_size=4, eval_batch_size=8
    )
    assert data.test_split == "validation"  # the registry records: the final score is GLUE's dev split
    sizes = {role: len(enc) for role, enc in data.splits.items()}
    assert sizes == {"train": 108, "validation": 12, "test": 40}
    dev, _ = read_glue_tsv(FIXTURES / "RTE" / "dev.tsv", get_task("rte"))
    assert torch.equal(data.splits["test"].labels, torch.tensor(dev.labels).long())
    assert sum(len(b["labels"]) for b in data.eval_batches("test")) == 40
    assert sum(len(b["labels"]) for b in data.eval_batches("validation", 5)) == 5
    assert "hold-out of train" in data.source and "dev" in data.source


def test_max_train_samples_limits_train_but_not_the_hold_out():
    data = load_glue_data(
        "rte",
        data_dir=FIXTURES,
        tokenizer="auto",
        max_seq_len=64,
        batch_size=4,
        eval_batch_size=8,
        max_train_samples=20,
    )
    assert len(data.splits["train"]) == 20 and len(data.splits["validation"]) == 12


def test_train_batches_follow_the_generator_and_pad_per_batch():
    data = load_glue_data(
        "mrpc", data_dir=FIXTURES, tokenizer="auto", max_seq_len=32, batch_size=6, eval_batch_size=8
    )
    first = data.train_batch(torch.Generator().manual_seed(3))
    again = data.train_batch(torch.Generator().manual_seed(3))
    other = data.train_batch(torch.Generator().manual_seed(4))
    assert all(torch.equal(first[k], again[k]) for k in first)
    assert not torch.equal(first["input_ids"], other["input_ids"])
    assert set(first) == {"input_ids", "attention_mask", "token_type_ids", "labels"}
    ids, mask, types = first["input_ids"], first["attention_mask"], first["token_type_ids"]
    assert ids.shape[1] <= 32 and (ids[:, 0] == 101).all()  # [CLS] first, truncated to max_seq_len
    assert (ids[mask == 0] == 0).all() and mask[
        :, -1
    ].any()  # [PAD]=0, and padded only to the batch's longest
    assert (types[mask == 1] == 1).any()  # two segments: the second has type id 1


def test_qnli_without_train_is_a_clear_error():
    with pytest.raises(DyntieError, match=r"has no train.tsv"):
        load_glue_data(
            "qnli", data_dir=FIXTURES, tokenizer="auto", max_seq_len=32, batch_size=4, eval_batch_size=8
        )


def test_offline_without_data_dir_names_the_fix(runner, tmp_path):
    """A task dyntie does not ship needs --data-dir offline (RTE ships: tests/test_first_hour.py)."""
    result = invoke(
        runner,
        "finetune",
        "glue",
        "--task",
        "mrpc",
        "--preset",
        "bert-tiny",
        "--db",
        tmp_path / "r.duckdb",
        "--quiet",
    )
    assert result.exit_code == 1 and "Traceback" not in result.output
    assert "--data-dir" in result.stderr and "--task rte" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1
    result = invoke(runner, "finetune", "glue", "--task", "squad", "--db", tmp_path / "r.duckdb", "--quiet")
    assert result.exit_code == 2 and "rte" in result.stderr


# -- tokenizer ------------------------------------------------------------------------------------------


def test_packaged_vocab_gives_bert_base_uncased_ids():
    wp = get_wordpiece("auto")
    assert wp.vocab_size == 30522 and wp.pad_id == 0
    enc = wp.tokenizer.encode("Hello, World!", "Naïve café")
    assert enc.ids == [101, 7592, 1010, 2088, 999, 102, 15743, 7668, 102]  # lower-cased, accents stripped
    assert enc.type_ids == [0] * 6 + [1] * 3


def test_tokenizer_from_a_local_folder_and_a_missing_one(tmp_path):
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "hello", "world"]
    (tmp_path / "vocab.txt").write_text("\n".join(vocab))
    wp = get_wordpiece(str(tmp_path))
    assert wp.vocab_size == 7 and wp.tokenizer.encode("hello there world").ids == [2, 5, 1, 6, 3]
    with pytest.raises(DyntieError, match="data.tokenizer"):
        get_wordpiece(str(tmp_path / "nope"))


# -- metrics and the reward -------------------------------------------------------------------------------


def test_metrics_match_hand_computed_values():
    preds, labels = torch.tensor([1, 1, 0, 0, 1]), torch.tensor([1, 0, 0, 1, 1])  # tp 2, tn 1, fp 1, fn 1
    assert matthews_corrcoef(preds, labels) == pytest.approx(1 / 6)
    assert f1_binary(preds, labels) == pytest.approx(2 / 3)
    assert matthews_corrcoef(torch.ones(4), torch.tensor([1, 0, 1, 0])) == 0.0  # constant predictor
    x, y = torch.tensor([1.0, 2.0, 2.0, 3.0]), torch.tensor([1.0, 3.0, 2.0, 4.0])
    # ranks with the tie averaged: x -> 1, 2.5, 2.5, 4; y -> 1, 3, 2, 4
    assert spearman(x, y) == pytest.approx(
        pearson(torch.tensor([1, 2.5, 2.5, 4]), torch.tensor([1.0, 3, 2, 4]))
    )
    assert spearman(x, y) == pytest.approx(0.9486832980505138)
    assert pearson(x, 2 * x + 1) == pytest.approx(1.0)


def _model_and_batch(task: str):
    backbone = GlueBackbone()
    cfg = _cfg(task)
    data = backbone.load_data(cfg)
    torch.manual_seed(0)
    model = backbone.build_model(cfg, data).eval()
    return backbone, model, data, data.train_batch(torch.Generator().manual_seed(0))


def test_reward_is_exp_cross_entropy_of_the_batch_not_accuracy():
    backbone, model, _, batch = _model_and_batch("rte")
    with torch.no_grad():
        logits = model(
            input_ids=batch["input_ids"],
            attention_mask=batch["attention_mask"],
            token_type_ids=batch["token_type_ids"],
        ).logits
    ce = F.cross_entropy(logits, batch["labels"])
    assert backbone.reward_ppl(model, batch) == pytest.approx(math.exp(float(ce)), rel=1e-5)
    # more confident in the same predictions: accuracy is unchanged, exp(CE) must move
    with torch.no_grad():
        model.classifier.weight.mul_(50)
    assert backbone.reward_ppl(model, batch) != pytest.approx(math.exp(float(ce)), rel=1e-3)


def test_evaluate_reports_task_metrics_and_stsb_is_a_regression():
    backbone, model, data, _ = _model_and_batch("cola")
    out = backbone.evaluate(model, data.eval_batches("validation"))
    assert set(out) == {"loss", "ppl", "accuracy", "mcc"} and out["ppl"] == pytest.approx(
        math.exp(out["loss"])
    )
    backbone, model, data, batch = _model_and_batch("stsb")
    assert model.config.num_labels == 1 and batch["labels"].dtype == torch.float32
    out = backbone.evaluate(model, data.eval_batches("test"))
    assert set(out) == {"loss", "ppl", "pearson", "spearman"}
    preds = torch.cat(
        [
            model(**{k: v for k, v in b.items() if k != "labels"}).logits.squeeze(-1)
            for b in data.eval_batches("test")
        ]
    ).detach()
    assert out["loss"] == pytest.approx(float(F.mse_loss(preds, data.splits["test"].labels)), rel=1e-4)


@pytest.mark.parametrize("task", list(TASKS))
def test_each_task_is_judged_by_a_metric_it_evaluates(task):
    headline = GlueBackbone().headline(_cfg(task))
    assert headline.metric in {"loss", "ppl", *TASKS[task].metrics}
    # CoLA by its official Matthews correlation; STS-B, a regression, by exp(MSE); every other task by accuracy
    assert headline == {"cola": ("mcc", True), "stsb": ("ppl", False)}.get(task, ("accuracy", True))


def test_blocks_are_the_encoder_layers_and_presets_have_the_documented_shapes():
    backbone, model, _, _ = _model_and_batch("rte")
    assert backbone.blocks(model) == list(model.bert.encoder.layer) and len(backbone.blocks(model)) == 4
    shapes = {n: (p.model["num_hidden_layers"], p.model["hidden_size"]) for n, p in PRESETS.items()}
    assert shapes == {"bert-tiny": (4, 64), "bert-cpu": (12, 128), "bert-paper": (24, 1024)}


# -- real runs through the CLI ----------------------------------------------------------------------------


def _finetune(runner, tmp: Path, *args):
    result = invoke(
        runner,
        "finetune",
        "glue",
        "--preset",
        "bert-tiny",
        "--db",
        tmp / "r.duckdb",
        "--out",
        tmp / "runs",
        "--quiet",
        "--max-steps",
        6,
        "--decide-every",
        2,
        "--set",
        "train.eval_every=3",
        *args,
    )
    assert result.exit_code == 0, result.stderr or result.output
    return next(line.split(": ", 1)[1] for line in result.stdout.splitlines() if line.startswith("run_id: "))


@needs_glue
@pytest.mark.parametrize(
    "task, metrics",
    [
        ("rte", {"accuracy"}),
        ("mrpc", {"accuracy", "f1"}),
        ("cola", {"accuracy", "mcc"}),
        ("sst2", {"accuracy"}),
    ],
)
def test_finetune_on_the_real_glue_files(task, metrics, runner, tmp_path):
    run_id = _finetune(
        runner, tmp_path, "--task", task, "--data-dir", GLUE, "--set", "data.max_train_samples=64"
    )
    db = tmp_path / "r.duckdb"
    assert _rows(db, "SELECT dataset, test_split FROM runs")[0] == (task, "validation")
    headline = ("mcc", True) if task == "cola" else ("accuracy", True)
    assert _rows(db, "SELECT metric, higher_is_better FROM runs")[0] == headline
    for split, step in (("validation", 3), ("test", 6)):
        names = {
            n
            for (n,) in _rows(
                db,
                "SELECT name FROM metrics WHERE run_id = ? AND split = ? AND step = ?",
                run_id,
                split,
                step,
            )
        }
        assert metrics | {"loss", "ppl"} <= names, (split, names)
    rewards = _rows(db, "SELECT reward, ppl FROM decisions WHERE run_id = ? AND ppl IS NOT NULL", run_id)
    assert len(rewards) == 2 and all(ppl > 1.0 for _, ppl in rewards)  # exp(CE) of 2 classes starts near 2


def test_final_score_is_computed_on_glue_dev_and_validation_on_the_hold_out(runner, tmp_path, monkeypatch):
    served: list[tuple[str, int]] = []
    original = GlueData.eval_batches

    def recording(self, split, max_items=None):
        batches = list(original(self, split, max_items))
        served.append((split, sum(len(b["labels"]) for b in batches)))
        yield from batches

    monkeypatch.setattr(GlueData, "eval_batches", recording)
    _finetune(runner, tmp_path, "--task", "rte", "--data-dir", FIXTURES, "--set", "train.test_items=0")
    # validation at step 3 and at the end: the 12-row hold-out of train; then once the 40-row dev split
    assert served == [("validation", 12), ("validation", 12), ("test", 40)]


def test_init_from_a_local_pretrained_folder_uses_its_tokenizer(runner, tmp_path):
    from transformers import BertConfig, BertForSequenceClassification

    folder = tmp_path / "pretrained"
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *"abcdefghijklmnopqrstuvwxyz"]
    config = BertConfig(
        vocab_size=len(vocab),
        hidden_size=32,
        num_hidden_layers=3,
        num_attention_heads=2,
        intermediate_size=64,
        max_position_embeddings=128,
    )
    BertForSequenceClassification(config).save_pretrained(folder)
    (folder / "vocab.txt").write_text("\n".join(vocab) + "\n")
    result = invoke(
        runner,
        "finetune",
        "glue",
        "--task",
        "mrpc",
        "--init",
        folder,
        "--preset",
        "bert-tiny",
        "--data-dir",
        FIXTURES,
        "--db",
        tmp_path / "r.duckdb",
        "--out",
        tmp_path / "runs",
        "--max-steps",
        4,
        "--decide-every",
        2,
    )
    assert result.exit_code == 0, result.stderr or result.output
    data = load_glue_data(
        "mrpc",
        data_dir=FIXTURES,
        tokenizer="auto",
        max_seq_len=32,
        batch_size=4,
        eval_batch_size=8,
        init=str(folder),
    )
    assert (
        data.vocab_size == len(vocab) and str(folder / "vocab.txt") in data.source
    )  # the model's own vocabulary
    config_row = _rows(tmp_path / "r.duckdb", "SELECT config FROM runs")[0][0]
    assert str(folder) in config_row
    missing = invoke(
        runner,
        "finetune",
        "glue",
        "--task",
        "mrpc",
        "--init",
        tmp_path / "nope",
        "--preset",
        "bert-tiny",
        "--data-dir",
        FIXTURES,
        "--db",
        tmp_path / "r.duckdb",
        "--quiet",
    )
    assert missing.exit_code == 1 and "save_pretrained" in missing.stderr
