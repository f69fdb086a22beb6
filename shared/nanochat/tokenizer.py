"""Byte-level BPE tokenizer in the GPT-4 style: trained with rustbpe, run with `tokenizers`.

Facts kept from the reference (karpathy/nanochat): 9 special tokens appended *after* the BPE
vocabulary (so `<|bos|>` is id `vocab_size - 9`), the GPT-4 split regex with numbers split as
`\\p{N}{1,2}`, documents capped at 10,000 characters for training. Training is upstream's own
trainer (rustbpe); its mergeable ranks become a `tokenizers` BPE with the ids tiktoken would give
(bpe_ranks.py), so a tokenizer trained here and one imported from a nanochat run behave alike.
The saved `tokenizer.json` is a plain `tokenizers` file, so `transformers.PreTrainedTokenizerFast`
and vLLM load the same folder; `tokenizer_config.json` carries the chat template and the bos/eos
tokens they need.

Byte-level means every UTF-8 byte is a base token, so encode/decode round-trips any text.

The BOS rule, written once (`prompt_ids`): a raw-text prompt is `<|bos|>` + its BPE ids, because
every pretraining document started that way; a chat prompt gets its `<|bos|>` from the chat
template. The saved tokenizer.json carries the same rule as its post-processor, so vLLM and
transformers (which add special tokens to raw completions and not to rendered chats) agree.
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import cast

from tokenizers import Tokenizer as HFTokenizer
from tokenizers import processors

from shared.nanochat.bpe_ranks import build_hf_tokenizer, unicode_to_byte

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


class Tokenizer:
    """The platform's tokenizer: BPE ids for text, specials only through `encode_special`."""

    def __init__(self, hf: HFTokenizer):
        missing = [s for s in SPECIAL_TOKENS if hf.token_to_id(s) is None]
        if missing:
            raise ValueError(f"tokenizer lacks the special tokens {missing}")
        bos_id = hf.token_to_id(BOS)
        # The BOS rule for engines that tokenize raw prompts themselves (see the module doc);
        # our own encode never adds special tokens.
        hf.post_processor = processors.TemplateProcessing(
            single=f"{BOS} $A", pair=f"{BOS} $A $B", special_tokens=[(BOS, bos_id)]
        )
        # Takes `hf` over. encode_special_tokens is runtime state, never saved: files keep
        # special-token matching on (the chat template renders specials as text), while text
        # passed to `encode` is data ("<|bos|>" typed by a user stays plain bytes).
        self._hf = hf
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
            # Raw prompts get <|bos|> (prompt_ids); the chat template writes its own and servers
            # render chats without adding special tokens.
            "add_bos_token": True,
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
        _atomic_write(directory / TOKENIZER_FILE, self._hf.to_str())
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
        table = unicode_to_byte()
        return bytes(table[c] for c in piece)

    @property
    def special_ids(self) -> dict[str, int]:
        return dict(self._special_ids)

    @classmethod
    def from_ranks(
        cls, mergeable_ranks: dict[bytes, int], pattern: str, special_tokens: dict[str, int]
    ) -> Tokenizer:
        """The tokenizer giving tiktoken's ids for Encoding(pattern, mergeable_ranks, specials)."""
        return cls(build_hf_tokenizer(mergeable_ranks, pattern, special_tokens))


class TokenizerMismatch(ValueError):
    """A tokenizer does not belong to a model (vocab size or special-token ids differ)."""


def prompt_ids(tok: Tokenizer, text: str) -> list[int]:
    """The BOS rule for a raw-text prompt (completions, base-model samples): <|bos|> + its ids."""
    return cast(list[int], tok.encode(text, prepend=tok.bos_token_id))


def check_vocab_fits(tok: Tokenizer, vocab_size: int, *, tokenizer_name: str, model_name: str) -> None:
    """Refuse a tokenizer/model pair that would index outside the embedding or read specials as
    other tokens, before any work starts. `*_name` say where each came from in the message."""
    if tok.vocab_size != vocab_size:
        raise TokenizerMismatch(
            f"tokenizer {tokenizer_name} has {tok.vocab_size} tokens but model {model_name} was "
            f"trained with vocab_size {vocab_size}: they do not belong together"
        )
    # Specials are the last ids (upstream and ours); a tokenizer with them elsewhere was not the
    # one the model's chat turns were trained with.
    want = list(range(vocab_size - len(SPECIAL_TOKENS), vocab_size))
    got = [tok.encode_special(s) for s in SPECIAL_TOKENS]
    if got != want:
        raise TokenizerMismatch(
            f"tokenizer {tokenizer_name} has its special tokens at ids {got}, model {model_name} "
            f"(vocab_size {vocab_size}) expects {want}"
        )


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
    """Train byte-level BPE on `texts` with rustbpe (upstream's trainer); specials take the last 9
    ids. Saved to `out_dir` if given.

    A corpus too small to yield `vocab_size - 9` merges gives a smaller vocabulary: the result's
    `vocab_size` is the truth, callers size the model from it.
    """
    import rustbpe  # imported here: only training needs it

    cfg = TokenizerTrainConfig(vocab_size=vocab_size, doc_cap=doc_cap, max_chars=max_chars)
    n_docs = 0

    def counted() -> Iterator[str]:
        nonlocal n_docs
        for doc in capped_texts(texts, cfg.doc_cap, cfg.max_chars):
            n_docs += 1
            yield doc

    trainer = rustbpe.Tokenizer()
    trainer.train_from_iterator(counted(), cfg.vocab_size - len(SPECIAL_TOKENS), pattern=SPLIT_PATTERN)
    if n_docs == 0:
        raise ValueError("train_tokenizer got no texts: the corpus is empty")
    ranks = {bytes(t): r for t, r in trainer.get_mergeable_ranks()}
    # Appended after the ranks so the specials sit at the end of the id space, as in the reference.
    tok = Tokenizer.from_ranks(
        ranks, SPLIT_PATTERN, {s: len(ranks) + i for i, s in enumerate(SPECIAL_TOKENS)}
    )
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
