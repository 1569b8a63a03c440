"""BERT's WordPiece tokenizer for GLUE: the packaged bert-base-uncased vocabulary, a local folder, or the hub."""

from __future__ import annotations

import json
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors

from dyntie_cli.errors import DyntieError

from .common import HUB_ID, hub_reachable


@dataclass(frozen=True)
class WordPiece:
    tokenizer: Tokenizer
    description: str
    pad_id: int

    @property
    def vocab_size(self) -> int:
        return max(self.tokenizer.get_vocab(with_added_tokens=True).values()) + 1


DEFAULT_TOKENIZER = "bert-base-uncased"


def get_wordpiece(spec: str, init: str = "") -> WordPiece:
    """The tokenizer named by ``spec`` (``data.tokenizer``).

    ``auto``: the tokenizer of the ``model.init`` folder when it has one (a pretrained model must keep its
    vocabulary), else ``bert-base-uncased``. ``bert-base-uncased`` is built from the vocabulary dyntie ships
    (the same 30,522 entries as the hub's), so it works offline. A path loads a folder or file holding
    ``tokenizer.json`` or BERT's ``vocab.txt``; another name loads from the hub when it is reachable.
    """
    spec = spec.strip() or "auto"
    if spec == "auto":
        spec = init if init and _tokenizer_file(Path(init).expanduser()) else DEFAULT_TOKENIZER
    if spec == DEFAULT_TOKENIZER:
        vocab = (
            resources.files(__package__ or "dyntie_cli.backbones")
            / "data"
            / "bert-base-uncased"
            / "vocab.txt"
        )
        with resources.as_file(vocab) as path:
            return _wrap(
                _from_vocab(path, lowercase=True), f"{DEFAULT_TOKENIZER} WordPiece (packaged vocab.txt)"
            )
    path = Path(spec).expanduser()
    if path.exists():
        return _local_wordpiece(path)
    if HUB_ID.fullmatch(spec) and hub_reachable():
        try:
            return _wrap(Tokenizer.from_pretrained(spec), f"{spec} (Hugging Face hub)")
        except Exception as exc:
            raise DyntieError(
                f"Could not load tokenizer {spec!r} from the hub: pass --set data.tokenizer=PATH."
            ) from exc
    raise DyntieError(
        f"Tokenizer {spec!r} is no local file or folder (and not reachable on the hub): pass --set "
        "data.tokenizer=PATH to a folder with vocab.txt or tokenizer.json, or use bert-base-uncased."
    )


def _tokenizer_file(path: Path) -> Path | None:
    if path.is_file():
        return path if path.suffix in (".json", ".txt") else None
    for name in ("tokenizer.json", "vocab.txt"):
        if (path / name).is_file():
            return path / name
    return None


def _local_wordpiece(path: Path) -> WordPiece:
    file = _tokenizer_file(path)
    if file is None:
        raise DyntieError(
            f"{path} holds no tokenizer.json or vocab.txt: point --set data.tokenizer at BERT's files."
        )
    if file.suffix == ".json":
        try:
            return _wrap(Tokenizer.from_file(str(file)), f"local {file}")
        except Exception as exc:
            raise DyntieError(f"{file} is not a tokenizers JSON file: pass a valid tokenizer.json.") from exc
    return _wrap(_from_vocab(file, lowercase=_lowercase(file.parent)), f"WordPiece from local {file}")


def _lowercase(folder: Path) -> bool:
    """``do_lower_case`` of a saved tokenizer's config; uncased (True) when the config does not say."""
    config = folder / "tokenizer_config.json"
    try:
        return bool(json.loads(config.read_text()).get("do_lower_case", True)) if config.is_file() else True
    except (OSError, ValueError):
        return True


def _from_vocab(vocab_file: Path, *, lowercase: bool) -> Tokenizer:
    """BERT's tokenizer from its vocab.txt: the normalizer, pre-tokenizer and [CLS]/[SEP] template BERT uses.

    Built with `tokenizers` directly: transformers 5's ``BertTokenizerFast(vocab_file=...)`` silently ignores
    the file and keeps only the five special tokens, which turns every word into [UNK].
    """
    try:
        vocab = models.WordPiece.read_file(str(vocab_file))
    except Exception as exc:
        raise DyntieError(
            f"{vocab_file} is not a WordPiece vocab.txt (one token a line): pass BERT's."
        ) from exc
    missing = [t for t in ("[CLS]", "[SEP]", "[UNK]", "[PAD]") if t not in vocab]
    if missing:
        raise DyntieError(f"{vocab_file} lacks the BERT tokens {', '.join(missing)}: pass a BERT vocab.txt.")
    tokenizer = Tokenizer(models.WordPiece(vocab, unk_token="[UNK]"))
    # strip_accents=None follows lowercase, which is what BERT's uncased models were trained with
    tokenizer.normalizer = normalizers.BertNormalizer(lowercase=lowercase)
    tokenizer.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tokenizer.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]",
        pair="[CLS] $A [SEP] $B:1 [SEP]:1",
        special_tokens=[("[CLS]", vocab["[CLS]"]), ("[SEP]", vocab["[SEP]"])],
    )
    tokenizer.decoder = decoders.WordPiece()
    return tokenizer


def _wrap(tokenizer: Tokenizer, description: str) -> WordPiece:
    # A saved tokenizer.json may carry its own padding/truncation; GlueData pads per batch and truncates.
    tokenizer.no_padding()
    tokenizer.no_truncation()
    pad = tokenizer.token_to_id("[PAD]")
    return WordPiece(tokenizer, description, 0 if pad is None else pad)
