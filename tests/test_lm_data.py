"""Language-modelling data: corpora and their carving, tokenizers and their caches, LM batches."""

from __future__ import annotations

import contextlib
import hashlib
import json
import lzma
import shutil
import socket
from importlib import resources
from pathlib import Path

import numpy as np
import pytest
import torch

from dyntie_cli.backbones import text_corpora, text_tokenizers
from dyntie_cli.backbones.common import hub_reachable
from dyntie_cli.backbones.lm_data import LMData, load_lm_data
from dyntie_cli.backbones.text_corpora import EOS_TOKEN, load_corpus
from dyntie_cli.backbones.text_tokenizers import LMTokenizer, get_tokenizer
from dyntie_cli.errors import DyntieError, UsageError

FIXTURES = Path(__file__).parent / "fixtures"
SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
WIKI_FIXTURE = FIXTURES / "wikitext2_valid_head.tokens"
GPT2_FIXTURE = FIXTURES / "gpt2"

# Documented in backbones/data/wikitext-2/ATTRIBUTION.txt and the data bundle's PROVENANCE.md.
WIKITEXT2_LINES = {"train": 36_718, "valid": 3_760, "test": 4_358}
WIKITEXT2_TOKENS_WITH_EOS = {"train": 2_088_628, "valid": 217_646, "test": 245_569}
WIKITEXT2_VALID_GPT2_TOKENS = 258_659


@pytest.fixture(autouse=True)
def cache_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Every test gets its own cache and runs offline, so no test reads a stale cache or touches the network."""
    cache = tmp_path / "cache"
    monkeypatch.setenv("DYNTIE_CACHE", str(cache))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    return cache


@pytest.fixture
def no_network(monkeypatch: pytest.MonkeyPatch) -> None:
    def refuse(*args: object, **kwargs: object) -> None:
        raise AssertionError("the code tried to open a network connection")

    monkeypatch.setattr(socket, "create_connection", refuse)


@pytest.fixture(scope="module")
def wiki_head() -> str:
    """The first 200 KB of the embedded WikiText-2 train split: enough to train a small BPE quickly."""
    return text_corpora._embedded_wikitext2("wiki.train.tokens")[:200_000]


@pytest.fixture(scope="module")
def gpt2() -> LMTokenizer:
    return get_tokenizer(str(GPT2_FIXTURE), "")


def embedded_bytes(name: str) -> bytes:
    resource = resources.files("dyntie_cli.backbones") / "data" / "wikitext-2" / f"wiki.{name}.tokens.xz"
    return lzma.decompress(resource.read_bytes())


# -- the embedded WikiText-2 ---------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["train", "valid", "test"])
def test_embedded_wikitext2_has_the_documented_lines_and_tokens(name: str) -> None:
    lines = embedded_bytes(name).decode("utf-8").split("\n")
    assert lines.pop() == ""  # the file ends in a newline
    assert len(lines) == WIKITEXT2_LINES[name]
    # The official count: whitespace tokens plus one <eos> per line.
    assert sum(len(line.split()) + 1 for line in lines) == WIKITEXT2_TOKENS_WITH_EOS[name]


@pytest.mark.parametrize("name", ["train", "valid", "test"])
def test_embedded_wikitext2_is_byte_identical_to_the_official_files(name: str) -> None:
    data = embedded_bytes(name)
    sums = SHARED_DATA / "SHA256SUMS"
    if sums.is_file():
        expected = dict(reversed(line.split()) for line in sums.read_text().splitlines() if line.strip())
        assert hashlib.sha256(data).hexdigest() == expected[f"./wikitext-2/wiki.{name}.tokens"]
    elif (SHARED_DATA / "wikitext-2").is_dir():
        assert data == (SHARED_DATA / "wikitext-2" / f"wiki.{name}.tokens").read_bytes()
    else:
        pytest.skip("the offline data bundle ../shared/data is not present")


def test_wikitext2_by_default_is_the_embedded_copy_with_named_splits() -> None:
    corpus = load_corpus("wikitext-2")
    assert corpus.splits["validation"] == embedded_bytes("valid").decode("utf-8")
    assert corpus.splits["test"] == embedded_bytes("test").decode("utf-8")
    assert "<unk>" in corpus.splits["train"]  # kept as plain text
    assert "embedded" in corpus.source and "carved" not in corpus.source


# -- carving missing splits ---------------------------------------------------------------------------


def test_a_lone_train_file_gives_validation_and_test_from_its_end(tmp_path: Path) -> None:
    text = WIKI_FIXTURE.read_text(encoding="utf-8")
    (tmp_path / "wiki.train.tokens.xz").write_bytes(lzma.compress(text.encode("utf-8")))  # .xz accepted

    corpus = load_corpus("wikitext-2", tmp_path)
    train, validation, test = (corpus.splits[s] for s in ("train", "validation", "test"))

    assert train + validation + test == text  # contiguous, disjoint, nothing lost, in order
    assert validation.count("\n") == test.count("\n") == 15  # 5% of 300 lines each
    assert train.endswith("\n") and validation.endswith("\n")  # cut on line boundaries
    assert "validation and test carved from train" in corpus.source
    assert load_corpus("wikitext-2", tmp_path) == corpus  # deterministic


def test_lm1b_without_train_carves_it_from_dev_and_keeps_test_whole(tmp_path: Path) -> None:
    dev = (FIXTURES / "lm1b_dev_head.tokens").read_text(encoding="utf-8")
    test = (FIXTURES / "lm1b_test_head.tokens").read_text(encoding="utf-8")
    (tmp_path / "1b_benchmark.dev.tokens").write_text(dev, encoding="utf-8")
    (tmp_path / "1b_benchmark.test.tokens").write_text(test, encoding="utf-8")

    corpus = load_corpus("lm1b", tmp_path)

    assert corpus.splits["test"] == test
    assert corpus.splits["train"] + corpus.splits["validation"] == dev
    assert corpus.splits["validation"].count("\n") == 12  # 10% of dev's 120 lines stay validation
    assert "train carved from validation" in corpus.source and "no train file" in corpus.source
    assert load_corpus("1-billion", tmp_path) == corpus


def test_lambada_with_only_test_carves_train_from_a_disjoint_part(tmp_path: Path) -> None:
    shutil.copy(FIXTURES / "lambada_test_head.jsonl", tmp_path / "lambada_test.jsonl")
    rows = [json.loads(line)["text"] for line in (tmp_path / "lambada_test.jsonl").read_text().splitlines()]

    corpus = load_corpus("lambada", tmp_path)
    passages = {split: text.split(EOS_TOKEN)[:-1] for split, text in corpus.splits.items()}

    assert passages["train"] == rows[:10]
    assert passages["validation"] == rows[10:11]
    assert passages["test"] == rows[11:]
    assert not set(passages["train"]) & set(passages["test"])
    assert "train and validation carved from test" in corpus.source


def test_malformed_lambada_row_names_its_line(tmp_path: Path) -> None:
    (tmp_path / "lambada_test.jsonl").write_text('{"text": "fine"}\n{"words": "no text"}\n', encoding="utf-8")
    with pytest.raises(DyntieError, match='line 2 is not a JSON object with a "text" field'):
        load_corpus("lambada", tmp_path)


def test_wikitext103_local_folder_without_train_keeps_the_official_test_split(tmp_path: Path) -> None:
    lines = WIKI_FIXTURE.read_text(encoding="utf-8").splitlines(keepends=True)
    (tmp_path / "wiki.valid.tokens").write_text("".join(lines[:200]), encoding="utf-8")
    (tmp_path / "wiki.test.tokens").write_text("".join(lines[200:]), encoding="utf-8")

    corpus = load_corpus("wikitext-103", tmp_path)

    assert corpus.splits["test"] == "".join(lines[200:])
    assert corpus.splits["train"] == "".join(lines[:180])
    assert corpus.splits["validation"] == "".join(lines[180:200])


def test_too_little_text_to_carve_is_a_clear_error(tmp_path: Path) -> None:
    (tmp_path / "tiny.txt").write_text("one line\n", encoding="utf-8")
    with pytest.raises(DyntieError, match="too few to carve"):
        load_corpus(f"text:{tmp_path / 'tiny.txt'}")


# -- text:PATH ----------------------------------------------------------------------------------------


def test_text_file_is_train_with_carved_evaluation_splits(tmp_path: Path) -> None:
    path = tmp_path / "corpus.txt"
    path.write_text("".join(f"line {i}\n" for i in range(100)), encoding="utf-8")

    corpus = load_corpus(f"text:{path}")

    assert corpus.splits["train"] == "".join(f"line {i}\n" for i in range(90))
    assert corpus.splits["validation"] == "".join(f"line {i}\n" for i in range(90, 95))
    assert corpus.splits["test"] == "".join(f"line {i}\n" for i in range(95, 100))
    assert str(path) in corpus.source


def test_text_folder_with_split_files_uses_them(tmp_path: Path) -> None:
    for name, text in {"train.txt": "a b\n" * 40, "validation.txt": "c d\n", "test.txt": "e f\n"}.items():
        (tmp_path / name).write_text(text, encoding="utf-8")

    corpus = load_corpus(f"text:{tmp_path}")

    assert corpus.splits == {"train": "a b\n" * 40, "validation": "c d\n", "test": "e f\n"}
    assert "carved" not in corpus.source


def test_text_folder_of_plain_files_concatenates_them_in_name_order(tmp_path: Path) -> None:
    (tmp_path / "b.txt").write_text("".join(f"b{i}\n" for i in range(20)), encoding="utf-8")
    (tmp_path / "a.txt").write_text("".join(f"a{i}\n" for i in range(19)) + "a19", encoding="utf-8")

    corpus = load_corpus(f"text:{tmp_path}")

    joined = "".join(corpus.splits[s] for s in ("train", "validation", "test"))
    assert joined == "".join(f"a{i}\n" for i in range(20)) + "".join(f"b{i}\n" for i in range(20))
    assert corpus.splits["test"] == "b18\nb19\n"


def test_text_path_errors_name_the_fix(tmp_path: Path) -> None:
    with pytest.raises(DyntieError, match="does not exist"):
        load_corpus(f"text:{tmp_path / 'missing.txt'}")
    with pytest.raises(DyntieError, match="holds no .txt files"):
        load_corpus(f"text:{tmp_path}")


# -- names, offline behaviour ---------------------------------------------------------------------------


def test_unknown_dataset_lists_the_known_names() -> None:
    with pytest.raises(UsageError) as info:
        load_corpus("wikitext-3")
    message = str(info.value)
    assert all(name in message for name in ("wikitext-2", "wikitext-103", "lambada", "lm1b", "text:PATH"))
    assert info.value.exit_code == 2


@pytest.mark.usefixtures("no_network")
@pytest.mark.parametrize(
    ("dataset", "expected"),
    [
        ("wikitext-103", "wiki.train.tokens/wiki.valid.tokens/wiki.test.tokens"),
        ("lambada", "lambada_test.jsonl"),
    ],
)
def test_offline_without_local_data_says_how_to_get_it(dataset: str, expected: str) -> None:
    with pytest.raises(DyntieError) as info:
        load_corpus(dataset)
    message = str(info.value)
    assert "--data-dir DIR" in message and expected in message and "internet" in message
    assert "\n" not in message


def test_lm1b_without_data_dir_names_the_files() -> None:
    with pytest.raises(DyntieError, match="--data-dir DIR holding 1b_benchmark.train.tokens"):
        load_corpus("lm1b")


def test_empty_data_dir_names_the_expected_files(tmp_path: Path) -> None:
    with pytest.raises(DyntieError, match="holds no wikitext-103 files: put wiki.train.tokens"):
        load_corpus("wikitext-103", tmp_path)
    with pytest.raises(DyntieError, match="does not exist"):
        load_corpus("wikitext-103", tmp_path / "nowhere")


@pytest.mark.usefixtures("no_network")
def test_offline_variables_skip_the_network_check(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("HF_HUB_OFFLINE")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    assert hub_reachable() is False


def test_hub_check_connects_when_no_offline_variable_is_set(monkeypatch: pytest.MonkeyPatch) -> None:
    calls = []

    def connect(address: tuple[str, int], timeout: float) -> contextlib.nullcontext[None]:
        calls.append((address, timeout))
        return contextlib.nullcontext()

    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    monkeypatch.delenv("HF_DATASETS_OFFLINE", raising=False)
    monkeypatch.delenv("HF_ENDPOINT", raising=False)
    monkeypatch.setattr(socket, "create_connection", connect)
    assert hub_reachable() is True
    assert calls == [(("huggingface.co", 443), 2.0)]


# -- tokenizers -----------------------------------------------------------------------------------------


def test_bpe_is_trained_once_then_loaded_from_the_cache(
    wiki_head: str, cache_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    first = get_tokenizer("bpe:512", wiki_head)
    sample = wiki_head[:5_000]

    assert first.vocab_size == 512 and first.eos_id is not None
    assert first.decode(first.encode(sample)) == sample  # byte-level: lossless
    assert len(list((cache_dir / "tokenizers").glob("bpe512-*.json"))) == 1

    def no_training(*args: object) -> None:
        raise AssertionError("the cached tokenizer was trained again")

    monkeypatch.setattr(text_tokenizers, "_train_bpe", no_training)
    second = get_tokenizer("bpe:512", wiki_head)
    assert second.fingerprint == first.fingerprint
    assert np.array_equal(second.encode(sample), first.encode(sample))


def test_bpe_cache_is_keyed_on_the_training_text_and_size(wiki_head: str, cache_dir: Path) -> None:
    get_tokenizer("bpe:400", wiki_head[:50_000])
    get_tokenizer("bpe:400", wiki_head[50_000:100_000])
    get_tokenizer("bpe:420", wiki_head[:50_000])
    assert len(list((cache_dir / "tokenizers").glob("*.json"))) == 3


def test_bpe_does_not_learn_the_document_separator_as_text() -> None:
    text = f"{EOS_TOKEN}".join(["the cat sat on the mat . "] * 200)
    tokenizer = get_tokenizer("bpe:300", text)
    vocab = tokenizer.tokenizer.get_vocab()
    assert [token for token in vocab if "endoftext" in token or "<|" in token] == [EOS_TOKEN]
    assert list(tokenizer.encode(f"mat .{EOS_TOKEN}the")).count(tokenizer.eos_id) == 1


@pytest.mark.parametrize("spec", ["bpe:abc", "bpe:100"])
def test_bad_bpe_spec_is_a_usage_error(spec: str) -> None:
    with pytest.raises(UsageError, match="bpe:N"):
        get_tokenizer(spec, "some text")


def test_local_gpt2_vocab_and_merges_give_gpt2_ids(gpt2: LMTokenizer) -> None:
    assert gpt2.encode("Hello world").tolist() == [15496, 995]
    assert gpt2.encode(EOS_TOKEN).tolist() == [50256]
    assert gpt2.vocab_size == 50257 and gpt2.eos_id == 50256
    assert gpt2.encode("x").dtype == np.uint16


def test_gpt2_token_count_of_wikitext2_valid_matches_the_documented_count(gpt2: LMTokenizer) -> None:
    assert len(gpt2.encode(load_corpus("wikitext-2").splits["validation"])) == WIKITEXT2_VALID_GPT2_TOKENS


def test_chunked_encoding_equals_encoding_the_whole_text(gpt2: LMTokenizer) -> None:
    text = WIKI_FIXTURE.read_text(encoding="utf-8")
    whole = gpt2.tokenizer.encode(text, add_special_tokens=False).ids
    assert gpt2.encode(text).tolist() == whole
    small_chunks = text_tokenizers._chunks(text, 64)
    assert len(small_chunks) > 1000 and "".join(small_chunks) == text
    assert [i for e in gpt2.tokenizer.encode_batch(small_chunks) for i in e.ids] == whole


def test_gpt2_tokenizer_json_matches_vocab_and_merges_without_its_saved_truncation(gpt2: LMTokenizer) -> None:
    shared = SHARED_DATA / "tokenizers" / "gpt2"
    if not (shared / "tokenizer.json").is_file():
        pytest.skip("the offline data bundle ../shared/data is not present")
    from_json = get_tokenizer(str(shared / "tokenizer.json"), "")
    text = WIKI_FIXTURE.read_text(encoding="utf-8")[:20_000]
    # That tokenizer.json was saved with truncation at 50 tokens; the loader must switch it off.
    assert len(from_json.encode(text)) > 50
    assert np.array_equal(from_json.encode(text), gpt2.encode(text))


def test_tokenizer_folder_without_files_names_what_it_needs(tmp_path: Path) -> None:
    with pytest.raises(DyntieError, match="vocab.json\\+merges.txt"):
        get_tokenizer(str(tmp_path), "")
    with pytest.raises(DyntieError, match="does not exist"):
        get_tokenizer(str(tmp_path / "nope" / "deeper" / "tok"), "")


@pytest.mark.usefixtures("no_network")
def test_hub_tokenizer_offline_says_to_pass_a_local_path() -> None:
    with pytest.raises(DyntieError, match="--set data.tokenizer=PATH"):
        get_tokenizer("gpt2", "")


# -- batches --------------------------------------------------------------------------------------------


def make_data(
    n_train: int = 1000, seq_len: int = 16, batch_size: int = 4, eval_batch_size: int = 3
) -> LMData:
    """Token ids equal to their positions, so every window shows where it was cut from."""
    splits = {s: np.arange(n_train, dtype=np.uint16) for s in ("train", "validation", "test")}
    return LMData(
        splits, seq_len=seq_len, batch_size=batch_size, eval_batch_size=eval_batch_size, vocab_size=n_train
    )


def test_train_batches_are_corpus_windows_with_labels_shifted_by_one() -> None:
    data = make_data()
    batch = data.train_batch(torch.Generator().manual_seed(0))

    assert batch["input_ids"].shape == batch["labels"].shape == (4, 16)
    assert batch["input_ids"].dtype == batch["labels"].dtype == torch.long
    for inputs, labels in zip(batch["input_ids"], batch["labels"], strict=True):
        start = int(inputs[0])
        assert inputs.tolist() == list(range(start, start + 16))
        assert labels.tolist() == list(range(start + 1, start + 17))


def test_train_batches_follow_the_generator_and_reach_the_last_token() -> None:
    data = make_data(n_train=20, seq_len=16, batch_size=8)
    first = data.train_batch(torch.Generator().manual_seed(3))
    again = data.train_batch(torch.Generator().manual_seed(3))
    assert torch.equal(first["input_ids"], again["input_ids"])

    generator = torch.Generator().manual_seed(0)
    starts = {int(data.train_batch(generator)["input_ids"][i, 0]) for _ in range(20) for i in range(8)}
    assert starts == {0, 1, 2, 3}  # every window of 17 tokens in 20, and none past the end


def test_train_batches_of_real_text_are_windows_of_the_corpus(gpt2: LMTokenizer) -> None:
    ids = gpt2.encode(WIKI_FIXTURE.read_text(encoding="utf-8"))
    data = LMData({"train": ids}, seq_len=32, batch_size=4, eval_batch_size=4, vocab_size=gpt2.vocab_size)
    windows = np.lib.stride_tricks.sliding_window_view(ids.astype(np.int64), 33)
    batch = data.train_batch(torch.Generator().manual_seed(1))
    full = torch.cat([batch["input_ids"], batch["labels"][:, -1:]], dim=1).numpy()
    assert torch.equal(batch["input_ids"][:, 1:], batch["labels"][:, :-1])
    for row in full:
        assert (windows == row).all(axis=1).any()


@pytest.mark.parametrize(("max_items", "scored"), [(None, 999), (150, 150), (10**6, 999), (0, 0)])
def test_eval_batches_score_every_token_once_in_order(max_items: int | None, scored: int) -> None:
    data = make_data(n_train=1000, seq_len=64, eval_batch_size=3)
    batches = list(data.eval_batches("validation", max_items))

    inputs = np.concatenate([b["input_ids"].reshape(-1).numpy() for b in batches]) if batches else []
    labels = np.concatenate([b["labels"].reshape(-1).numpy() for b in batches]) if batches else []
    assert list(labels) == list(range(1, scored + 1))  # each token after the first, exactly once
    assert list(inputs) == list(range(scored))
    assert all(b["input_ids"].shape[0] <= 3 and b["input_ids"].shape[1] <= 64 for b in batches)
    assert [b["labels"].shape for b in batches] == [b["input_ids"].shape for b in batches]


def test_eval_batches_put_the_partial_window_last_and_alone() -> None:
    data = make_data(n_train=1000, seq_len=64, eval_batch_size=3)
    shapes = [tuple(b["input_ids"].shape) for b in data.eval_batches("test")]
    assert shapes == [(3, 64)] * 5 + [(1, 39)]  # 15 full windows of 64 + 39 = 999 scored tokens


def test_lm_data_reports_its_shape() -> None:
    data = make_data(seq_len=16, batch_size=4)
    assert data.items_per_batch() == 64
    assert data.test_split == "test"
    assert data.num_tokens == {"train": 1000, "validation": 1000, "test": 1000}


def test_the_held_out_slice_is_the_end_of_train_and_training_never_samples_it() -> None:
    splits = {s: np.arange(1000, dtype=np.uint16) for s in ("train", "validation", "test")}
    data = LMData(splits, seq_len=16, batch_size=8, eval_batch_size=3, vocab_size=1000, heldout_tokens=100)
    held = [b for b in data.heldout_batches()]
    assert np.concatenate([b["input_ids"].reshape(-1).numpy() for b in held]).tolist() == list(range(900, 999))
    assert np.concatenate([b["labels"].reshape(-1).numpy() for b in held]).tolist() == list(range(901, 1000))
    assert [b["input_ids"].tolist() for b in data.heldout_batches()] == [b["input_ids"].tolist() for b in held]
    generator = torch.Generator().manual_seed(0)
    seen = {int(t) for _ in range(300) for t in data.train_batch(generator)["labels"].reshape(-1)}
    assert max(seen) == 899 and data.num_tokens["train"] == 900  # the windows end where the slice begins
    assert data.num_tokens["validation"] == data.num_tokens["test"] == 1000  # never carved from
    with pytest.raises(DyntieError, match="holds no held-out slice"):
        make_data().heldout_batches()
    with pytest.raises(DyntieError, match=r"data.heldout_tokens=990 cannot be carved .*set a smaller"):
        LMData(splits, seq_len=16, batch_size=8, eval_batch_size=3, vocab_size=1000, heldout_tokens=990)


def test_training_split_shorter_than_a_window_is_a_clear_error() -> None:
    with pytest.raises(DyntieError, match="shorter sequence length"):
        LMData({"train": np.arange(16)}, seq_len=16, batch_size=1, eval_batch_size=1, vocab_size=16)


# -- the entry point --------------------------------------------------------------------------------------


def test_load_lm_data_caches_token_arrays_for_a_fast_second_run(
    tmp_path: Path, cache_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    corpus = tmp_path / "wiki.txt"
    shutil.copy(WIKI_FIXTURE, corpus)
    options = {"tokenizer": "bpe:300", "seq_len": 32, "batch_size": 2, "eval_batch_size": 2}

    first = load_lm_data(f"text:{corpus}", **options)
    assert len(list((cache_dir / "tokens").glob("*.npy"))) == 3

    def no_encoding(self: LMTokenizer, text: str) -> np.ndarray:
        raise AssertionError("the cached token arrays were not used")

    monkeypatch.setattr(LMTokenizer, "encode", no_encoding)
    second = load_lm_data(f"text:{corpus}", **options)
    assert all(np.array_equal(first.tokens[s], second.tokens[s]) for s in ("train", "validation", "test"))
    assert first.vocab_size == 300 and first.tokens["train"].dtype == np.uint16
    assert sum(first.num_tokens.values()) > 20_000
    assert str(corpus) in first.source and "bpe:300" in first.source

    short = load_lm_data(f"text:{corpus}", max_train_tokens=500, **options)
    assert short.num_tokens["train"] == 500 and "truncated" in short.source
    assert np.array_equal(short.tokens["train"], first.tokens["train"][:500])
