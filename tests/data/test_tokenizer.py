from __future__ import annotations

import json

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from tokenizers import Tokenizer as HFTokenizer

from shared.nanochat.tokenizer import (
    SPECIAL_TOKENS,
    Tokenizer,
    capped_texts,
    compression_report,
    token_bytes,
    train_tokenizer,
)

TRICKY = [
    "",
    "Hello world! This is a test.\nNumbers: 123, 4567, 89\n",
    "Contractions: I'm, you're, it's. Special chars: @#$%^&*()",
    "Unicode: 你好世界 🌍 e\u0301 \u200b\x00 \r\n\t  trailing   ",
    "<|bos|> <|user_start|>not special<|assistant_end|>",
]


def test_vocab_and_special_ids(tok):
    assert tok.vocab_size == 512
    # Specials are appended after the BPE vocab, bos first, as in the reference.
    assert [tok.encode_special(s) for s in SPECIAL_TOKENS] == list(range(503, 512))
    assert tok.bos_token_id == 503
    for s in SPECIAL_TOKENS:
        assert tok.decode([tok.encode_special(s)]) == s


def test_specials_in_text_are_plain_text(tok):
    ids = tok.encode("<|bos|><|assistant_end|>")
    assert not set(ids) & set(tok.special_ids.values())
    assert tok.decode(ids) == "<|bos|><|assistant_end|>"


def test_special_token_is_atomic_in_saved_file(tok, tmp_path):
    # The saved tokenizer.json (what vLLM/transformers use) matches specials as single ids.
    tok.save(tmp_path)
    hf = HFTokenizer.from_file(str(tmp_path / "tokenizer.json"))
    ids = hf.encode("<|user_start|>hi<|user_end|>", add_special_tokens=False).ids
    assert ids[0] == tok.encode_special("<|user_start|>") and ids[-1] == tok.encode_special("<|user_end|>")
    assert ids[1:-1] == tok.encode("hi")


@pytest.mark.parametrize("text", TRICKY)
def test_roundtrip_fixed(tok, text):
    assert tok.decode(tok.encode(text)) == text


@settings(max_examples=150, deadline=None)
@given(st.text(max_size=200))
def test_roundtrip_property(tok, text):
    ids = tok.encode(text)
    assert all(0 <= i < tok.vocab_size for i in ids)
    assert tok.decode(ids) == text


def test_batch_encode_prepend_matches_single(tok):
    texts = TRICKY[1:]
    batch = tok.encode(texts, prepend="<|bos|>")
    assert batch == [[tok.bos_token_id] + tok.encode(t) for t in texts]
    assert tok.encode(texts, prepend=tok.bos_token_id, num_threads=1) == batch


def test_numbers_split_in_pairs(tok):
    for tid in tok.encode("0123456789 31415926535"):
        piece = tok.decode([tid])
        assert sum(c.isdigit() for c in piece) <= 2, piece


def test_save_load_and_config(tok, tmp_path):
    tok.save(tmp_path)
    again = Tokenizer.load(tmp_path)
    for t in TRICKY:
        assert again.encode(t) == tok.encode(t)
    cfg = json.loads((tmp_path / "tokenizer_config.json").read_text())
    assert cfg["bos_token"] == "<|bos|>" and cfg["eos_token"] == "<|assistant_end|>"
    assert "<|assistant_start|>" in cfg["chat_template"]


def test_load_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="tokenizer.json"):
        Tokenizer.load(tmp_path)
    (tmp_path / "tokenizer.json").write_text("{not json")
    with pytest.raises(ValueError, match="cannot load tokenizer"):
        Tokenizer.load(tmp_path)


def test_token_bytes(tok):
    tb = token_bytes(tok)
    assert tb.shape == (tok.vocab_size,) and tb.dtype == torch.int32
    assert all(tb[tok.encode_special(s)] == 0 for s in SPECIAL_TOKENS)
    assert (tb[:256] == 1).all()  # the byte alphabet
    for text in TRICKY:
        assert int(tb[tok.encode(text)].sum()) == len(text.encode("utf-8"))


def test_vocab_too_small():
    with pytest.raises(ValueError, match="vocab_size"):
        train_tokenizer(["hello world"], vocab_size=264)


def test_empty_corpus():
    with pytest.raises(ValueError, match="empty"):
        train_tokenizer([], vocab_size=300)


def test_doc_cap_and_budget():
    assert list(capped_texts(["abcdef", "ghij", "klm"], doc_cap=3, max_chars=5)) == ["abc", "ghi"]
    # Training honours the cap: a tokenizer trained on capped docs never saw the tail merge.
    tok = train_tokenizer(["ab" * 10 + "zq" * 500], vocab_size=300, doc_cap=20)
    assert len(tok.encode("zqzq")) == 4


def test_compression_report(tok, demo_dir):
    from shared.nanochat.corpus import iter_shard_texts, split_shards

    _, val = split_shards(demo_dir)
    rep = compression_report(tok, list(iter_shard_texts(val)))
    assert rep["tokens"] > 0 and 1.5 < rep["bytes_per_token"] < 8
    with pytest.raises(ValueError):
        compression_report(tok, ["", ""])


def test_loads_in_transformers_with_chat_template(tok, tmp_path):
    # vLLM loads the tokenizer folder through transformers: same ids, specials, chat template.
    from transformers import AutoTokenizer

    from shared.nanochat.chat_format import render_for_completion

    tok.save(tmp_path)
    hf = AutoTokenizer.from_pretrained(str(tmp_path))
    assert type(hf).__name__ in ("PreTrainedTokenizerFast", "TokenizersBackend")
    assert hf.bos_token_id == tok.bos_token_id
    assert hf.eos_token_id == tok.encode_special("<|assistant_end|>")
    assert len(hf) == tok.vocab_size
    for text in TRICKY[1:4]:
        assert hf.encode(text, add_special_tokens=False) == tok.encode(text)
        assert hf.decode(tok.encode(text)) == text
    messages = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "What is 2+2?"},
        {"role": "assistant", "content": "4"},
        {"role": "user", "content": "And 3+3?"},
    ]
    ids = hf.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
    ids = ids["input_ids"] if isinstance(ids, dict) or hasattr(ids, "keys") else ids
    assert list(ids) == render_for_completion(tok, messages)


def test_small_corpus_gives_smaller_vocab_with_specials_last():
    tok = train_tokenizer(["ab ab ab cd"], vocab_size=1000)
    assert 256 + 9 <= tok.vocab_size < 1000
    assert tok.encode_special("<|output_end|>") == tok.vocab_size - 1
    assert tok.bos_token_id == tok.vocab_size - 9
    with pytest.raises(ValueError, match="str or list"):
        tok.encode(b"bytes")
    with pytest.raises(ValueError, match="unknown special token"):
        tok.encode_special("<|eot|>")
