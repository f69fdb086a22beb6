"""Byte-level BPE tokenizer in the GPT-4 style, trained and run with Hugging Face `tokenizers`.

Facts kept from the reference (karpathy/nanochat): 9 special tokens appended *after* the BPE
vocabulary (so `<|bos|>` is id `vocab_size - 9`), the GPT-4 split regex with numbers split as
`\\p{N}{1,2}`, documents capped at 10,000 characters for training. The saved `tokenizer.json` is a
plain `tokenizers` file, so `transformers.PreTrainedTokenizerFast` and vLLM load the same folder;
`tokenizer_config.json` carries the chat template and the bos/eos tokens they need.

Byte-level means every UTF-8 byte is a base token, so encode/decode round-trips any text.
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

from tokenizers import AddedToken, Regex, decoders, models, pre_tokenizers, trainers
from tokenizers import Tokenizer as HFTokenizer

SPECIAL_TOKENS: list[str] = [
    "<|bos|>",  # every document starts with it; the loader packs rows on it
    "<|user_start|>",
    "<|user_end|>",
    "<|assistant_start|>",
    "<|assistant_end|>",
    "<|python_start|>",  # assistant calls the python tool
    "<|python_end|>",
    "<|output_start|>",  # tool output fed back (never supervised)
    "<|output_end|>",
]
BOS = "<|bos|>"
# What a chat model emits when its turn is over: the stop token servers need as `eos_token`.
EOS = "<|assistant_end|>"

# GPT-4's pattern with \p{N}{1,2} instead of {1,3}: fewer vocab slots spent on numbers at 32K.
SPLIT_PATTERN = r"""'(?i:[sdmt]|ll|ve|re)|[^\r\n\p{L}\p{N}]?+\p{L}+|\p{N}{1,2}| ?[^\s\p{L}\p{N}]++[\r\n]*|\s*[\r\n]|\s+(?!\S)|\s+"""
DEFAULT_VOCAB_SIZE = 32768
DEFAULT_DOC_CAP = 10_000  # chars per training document
DEFAULT_MAX_CHARS = 2_000_000_000  # training budget in chars

TOKENIZER_FILE = "tokenizer.json"
CONFIG_FILE = "tokenizer_config.json"


def _byte_decoder() -> dict[str, int]:
    """Inverse of the GPT-2 byte->printable-char table that byte-level BPE stores tokens in."""
    keep = list(range(ord("!"), ord("~") + 1)) + list(range(0xA1, 0xAC + 1)) + list(range(0xAE, 0xFF + 1))
    chars = keep[:]
    n = 0
    for b in range(256):
        if b not in keep:
            keep.append(b)
            chars.append(256 + n)
            n += 1
    return {chr(c): b for b, c in zip(keep, chars, strict=True)}


def _build_pipeline(model: models.Model) -> HFTokenizer:
    tok = HFTokenizer(model)
    tok.normalizer = None
    # Split on the regex first (isolated keeps every char), then map bytes to printable chars.
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(SPLIT_PATTERN), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    tok.decoder = decoders.ByteLevel()
    return tok


class Tokenizer:
    """The platform's tokenizer: BPE ids for text, specials only through `encode_special`."""

    def __init__(self, hf: HFTokenizer):
        missing = [s for s in SPECIAL_TOKENS if hf.token_to_id(s) is None]
        if missing:
            raise ValueError(f"tokenizer lacks the special tokens {missing}")
        # Saved files keep special-token matching on (the chat template renders specials as text),
        # but text passed to `encode` is data: "<|bos|>" typed by a user must stay plain bytes.
        self._file_json = hf.to_str()
        self._hf = HFTokenizer.from_str(self._file_json)
        self._hf.encode_special_tokens = True
        self._special_ids = {s: i for s in SPECIAL_TOKENS if (i := hf.token_to_id(s)) is not None}
        self.vocab_size: int = self._hf.get_vocab_size(with_added_tokens=True)
        self.bos_token_id: int = self._special_ids[BOS]

    # ---- persistence -------------------------------------------------------------------------
    @classmethod
    def load(cls, directory: Path) -> Tokenizer:
        path = Path(directory) / TOKENIZER_FILE
        if not path.is_file():
            raise FileNotFoundError(f"no {TOKENIZER_FILE} in tokenizer directory {directory}")
        try:
            hf = HFTokenizer.from_file(str(path))
        except Exception as e:  # tokenizers raises a bare Exception on a bad file
            raise ValueError(f"cannot load tokenizer {path}: {e}") from e
        return cls(hf)

    def save(self, directory: Path) -> None:
        """Write tokenizer.json + tokenizer_config.json atomically (each file temp + rename)."""
        from shared.nanochat.chat_format import CHAT_TEMPLATE

        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        config = {
            "tokenizer_class": "PreTrainedTokenizerFast",
            "bos_token": BOS,
            "eos_token": EOS,
            "pad_token": BOS,  # never trained on; servers want some pad token
            "add_bos_token": False,  # the chat template writes <|bos|> itself
            "add_eos_token": False,
            "clean_up_tokenization_spaces": False,
            "model_max_length": 1_000_000,
            "chat_template": CHAT_TEMPLATE,
            "additional_special_tokens": SPECIAL_TOKENS[1:],
        }
        special_map = {
            "bos_token": BOS,
            "eos_token": EOS,
            "pad_token": BOS,
            "additional_special_tokens": SPECIAL_TOKENS[1:],
        }
        _atomic_write(directory / TOKENIZER_FILE, self._file_json)
        _atomic_write(directory / "special_tokens_map.json", json.dumps(special_map, indent=2))
        _atomic_write(directory / CONFIG_FILE, json.dumps(config, indent=2))

    # ---- encode / decode ---------------------------------------------------------------------
    def encode_special(self, name: str) -> int:
        if name not in self._special_ids:
            raise ValueError(f"unknown special token {name!r}; known: {SPECIAL_TOKENS}")
        return self._special_ids[name]

    def _prepend_id(self, prepend: int | str | None) -> int | None:
        if prepend is None or isinstance(prepend, int):
            return prepend
        return self.encode_special(prepend)

    def encode(
        self, text: str | list[str], prepend: int | str | None = None, num_threads: int = 0
    ) -> list[int] | list[list[int]]:
        """Token ids of `text` (specials in the text stay plain text). A list is encoded in one call
        to the Rust batch encoder, which runs on its own thread pool without the GIL; num_threads=1
        encodes one by one on the calling thread (the single-threaded baseline)."""
        pre = self._prepend_id(prepend)
        head = [pre] if pre is not None else []
        if isinstance(text, str):
            return head + self._hf.encode(text, add_special_tokens=False).ids
        if not isinstance(text, list):
            raise ValueError(f"encode takes a str or list[str], got {type(text).__name__}")
        if num_threads == 1:
            encs = [self._hf.encode(t, add_special_tokens=False) for t in text]
        else:
            # encode_batch_fast skips char offsets (tokenizers >= 0.21); same ids as encode_batch.
            batch = getattr(self._hf, "encode_batch_fast", self._hf.encode_batch)
            encs = batch(text, add_special_tokens=False)
        return [head + e.ids for e in encs]

    def __call__(self, *args, **kwargs):
        return self.encode(*args, **kwargs)

    def decode(self, ids: list[int]) -> str:
        return self._hf.decode(list(ids), skip_special_tokens=False)

    def id_to_token(self, token_id: int) -> str | None:
        return self._hf.id_to_token(token_id)

    def token_to_bytes(self, token_id: int) -> bytes:
        """Raw bytes of one id (b'' for specials); decoding to str would corrupt partial UTF-8."""
        piece = self._hf.id_to_token(token_id)
        if piece is None:
            raise ValueError(f"token id {token_id} out of range 0..{self.vocab_size - 1}")
        if token_id in self._special_ids.values():
            return b""
        table = _byte_table()
        return bytes(table[c] for c in piece)

    @property
    def special_ids(self) -> dict[str, int]:
        return dict(self._special_ids)


@lru_cache(maxsize=1)
def _byte_table() -> dict[str, int]:
    return _byte_decoder()


def _atomic_write(path: Path, text: str) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def capped_texts(
    texts: Iterable[str], doc_cap: int = DEFAULT_DOC_CAP, max_chars: int = DEFAULT_MAX_CHARS
) -> Iterator[str]:
    """Documents cut to `doc_cap` chars, stopping once `max_chars` were yielded (tok_train budget)."""
    seen = 0
    for text in texts:
        if text is None:
            continue
        doc = text[:doc_cap]
        seen += len(doc)
        yield doc
        if seen >= max_chars:
            return


@dataclass(frozen=True)
class TokenizerTrainConfig:
    vocab_size: int = DEFAULT_VOCAB_SIZE
    doc_cap: int = DEFAULT_DOC_CAP
    max_chars: int = DEFAULT_MAX_CHARS

    def __post_init__(self):
        if self.vocab_size < 256 + len(SPECIAL_TOKENS):
            raise ValueError(
                f"vocab_size must be at least {256 + len(SPECIAL_TOKENS)} (256 bytes + "
                f"{len(SPECIAL_TOKENS)} specials), got {self.vocab_size}"
            )
        if self.doc_cap <= 0:
            raise ValueError(f"doc_cap must be positive, got {self.doc_cap}")
        if self.max_chars <= 0:
            raise ValueError(f"max_chars must be positive, got {self.max_chars}")


def train_tokenizer(
    texts: Iterable[str],
    vocab_size: int = DEFAULT_VOCAB_SIZE,
    out_dir: Path | None = None,
    *,
    doc_cap: int = DEFAULT_DOC_CAP,
    max_chars: int = DEFAULT_MAX_CHARS,
) -> Tokenizer:
    """Train byte-level BPE on `texts`; specials take the last 9 ids. Saved to `out_dir` if given.

    A corpus too small to yield `vocab_size - 9` merges gives a smaller vocabulary: the result's
    `vocab_size` is the truth, callers size the model from it.
    """
    cfg = TokenizerTrainConfig(vocab_size=vocab_size, doc_cap=doc_cap, max_chars=max_chars)
    hf = _build_pipeline(models.BPE())
    trainer = trainers.BpeTrainer(
        vocab_size=cfg.vocab_size - len(SPECIAL_TOKENS),
        min_frequency=0,
        show_progress=False,
        special_tokens=[],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    n_docs = 0

    def counted() -> Iterator[str]:
        nonlocal n_docs
        for doc in capped_texts(texts, cfg.doc_cap, cfg.max_chars):
            n_docs += 1
            yield doc

    hf.train_from_iterator(counted(), trainer=trainer)
    if n_docs == 0:
        raise ValueError("train_tokenizer got no texts: the corpus is empty")
    # Appended after training so the specials sit at the end of the id space, as in the reference.
    hf.add_special_tokens([AddedToken(s, special=True, normalized=False) for s in SPECIAL_TOKENS])
    tok = Tokenizer(hf)
    if out_dir is not None:
        tok.save(Path(out_dir))
    return tok


def token_bytes(tok: Tokenizer):
    """(vocab_size,) int32 tensor: UTF-8 byte length of each id, 0 for specials (bits-per-byte)."""
    import torch  # the tokenizer itself must not need torch (data workers, CPU-only CLI)

    return torch.tensor([len(tok.token_to_bytes(i)) for i in range(tok.vocab_size)], dtype=torch.int32)


def compression_report(tok: Tokenizer, texts: Iterable[str]) -> dict:
    """Bytes per token over `texts` (e.g. the validation shard): higher = better compression."""
    docs = [t for t in texts if t]
    if not docs:
        raise ValueError("compression_report got no non-empty texts")
    n_bytes = sum(len(t.encode("utf-8")) for t in docs)
    encoded: list[list[int]] = tok.encode(docs)  # type: ignore[assignment]  # list in, list of lists out
    n_tokens = sum(len(ids) for ids in encoded)
    return {
        "docs": len(docs),
        "bytes": n_bytes,
        "tokens": n_tokens,
        "bytes_per_token": n_bytes / max(n_tokens, 1),
        "vocab_size": tok.vocab_size,
    }
