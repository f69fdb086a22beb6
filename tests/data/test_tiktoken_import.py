"""Upstream's tokenizer in the platform: the restricted pickle reader, the rank -> tokenizers
conversion (identical ids to tiktoken for every input, specials included) and rustbpe training."""

from __future__ import annotations

import os
import pickle
import random

import pytest
import tiktoken
from hypothesis import given, settings
from hypothesis import strategies as st
from tokenizers import Tokenizer as HFTokenizer

from shared.nanochat.bpe_ranks import reference_encode
from shared.nanochat.corpus import iter_shard_texts, split_shards
from shared.nanochat.tiktoken_pickle import PickleRefused, loads_encoding, read_encoding
from shared.nanochat.tokenizer import SPECIAL_TOKENS, Tokenizer, token_bytes, train_tokenizer
from tests.upstream import upstream_encoding, write_upstream_tokenizer

TEXTS = [
    "",
    "Hello world! This is a test.\nNumbers: 123, 4567, 89, 3.14159, 1,000,000 and 2026-12-01\n",
    "Contractions: I'm, you're, it's, WE'LL, They've. Special chars: @#$%^&*()",
    "Unicode: 你好世界 🌍 e\u0301 \u200b\x00 Ünïcödé ǅ Ⅻ ٣ \U0001f600\U0001f469\u200d\U0001f52c",
    "whitespace runs:  a   b    c\t\t\td\n\n\n\r\n  \u00a0\u3000  \n    indented\n        more  ",
    "<|bos|> <|user_start|>not special<|assistant_end|><|output_end|>",
    "digits 0 00 000 0000 12345678901234567890 -7 +8 ½ ² ٣٤",
    "mixed'case'S 'll 've 're 'd 'm 't \"quoted\" — dashes – and … ellipses",
]


@pytest.fixture(scope="module")
def enc(demo_dir):
    train, _ = split_shards(demo_dir)
    return upstream_encoding(list(iter_shard_texts(train)), vocab_size=2048)


@pytest.fixture(scope="module")
def converted(enc, tmp_path_factory):
    d = tmp_path_factory.mktemp("upstream_tok")
    write_upstream_tokenizer(d, enc)
    e = read_encoding(d / "tokenizer.pkl")
    return Tokenizer.from_ranks(e.mergeable_ranks, e.pat_str, e.special_tokens)


def _corpus_docs(demo_dir) -> list[str]:
    _, val = split_shards(demo_dir)
    return list(iter_shard_texts(val))


def test_pickle_reads_back_what_tiktoken_pickled(enc, tmp_path):
    for protocol in (2, 3, 4, 5):
        got = loads_encoding(pickle.dumps(enc, protocol=protocol))
        assert got.name == "rustbpe" and got.pat_str == enc._pat_str
        assert got.mergeable_ranks == enc._mergeable_ranks and got.special_tokens == enc._special_tokens
        assert got.n_vocab == enc.n_vocab


def test_identical_ids_on_text(enc, converted, demo_dir):
    assert converted.vocab_size == enc.n_vocab
    docs = TEXTS + _corpus_docs(demo_dir)
    assert converted.encode(docs) == enc.encode_ordinary_batch(docs)
    for text in TEXTS:
        assert converted.decode(converted.encode(text)) == text


@settings(max_examples=300, deadline=None)
@given(st.text(max_size=120))
def test_identical_ids_on_any_unicode(enc, converted, text):
    assert converted.encode(text) == enc.encode_ordinary(text)


def test_identical_ids_on_glued_tokens_and_runs(enc, converted):
    # strings made of vocabulary pieces stress the merge order (ties between splits of one token)
    rng = random.Random(0)
    pieces = [t for t in enc._mergeable_ranks if len(t) > 1]
    glued = [b"".join(rng.choice(pieces) for _ in range(rng.randint(2, 9))).decode("utf-8", "replace")
             for _ in range(3000)]  # fmt: skip
    runs = [c * n for c in (" ", "\n", "\t", "0", "9", "a", "=", "é", "你") for n in range(1, 40)]
    texts = glued + runs
    assert converted.encode(texts) == enc.encode_ordinary_batch(texts)


def test_specials_have_upstreams_ids_in_code_and_in_the_saved_file(enc, converted, tmp_path):
    for s in SPECIAL_TOKENS:
        assert converted.encode_special(s) == enc.encode_single_token(s)
    assert converted.bos_token_id == enc.encode_single_token("<|bos|>") == enc.n_vocab - 9
    # The saved tokenizer.json (vLLM, transformers, the chat template) matches special strings as
    # specials, like tiktoken's encode(allowed_special="all").
    converted.save(tmp_path)
    hf = HFTokenizer.from_file(str(tmp_path / "tokenizer.json"))
    for text in TEXTS + ["<|bos|><|user_start|>hi 12<|user_end|><|assistant_start|>ok<|assistant_end|>"]:
        assert hf.encode(text, add_special_tokens=False).ids == enc.encode(text, allowed_special="all")


def test_token_bytes_equal_upstreams(enc, converted, tmp_path):
    import torch

    write_upstream_tokenizer(tmp_path, enc)
    assert torch.equal(token_bytes(converted), torch.load(tmp_path / "token_bytes.pt", weights_only=True))


def test_reference_encoder_is_tiktoken(enc):
    for text in TEXTS:
        assert reference_encode(enc._mergeable_ranks, enc._pat_str, text) == enc.encode_ordinary(text)


def test_training_is_upstreams_rustbpe(demo_dir):
    """train_tokenizer is upstream's trainer: the same ranks, hence tiktoken's ids for everything."""
    train, _ = split_shards(demo_dir)
    texts = list(iter_shard_texts(train))
    ours = train_tokenizer(texts, vocab_size=1024)
    theirs = upstream_encoding(texts, vocab_size=1024)
    assert ours.vocab_size == theirs.n_vocab == 1024
    docs = TEXTS + _corpus_docs(demo_dir)
    assert ours.encode(docs) == theirs.encode_ordinary_batch(docs)
    assert [ours.encode_special(s) for s in SPECIAL_TOKENS] == [
        theirs.encode_single_token(s) for s in SPECIAL_TOKENS
    ]


# ------------------------------------------------------------------ the restricted unpickler


class _Evil:
    def __init__(self, cmd):
        self.cmd = cmd

    def __reduce__(self):
        return (os.system, (self.cmd,))


class _EvilEval:
    def __reduce__(self):
        return (eval, ("__import__('os').system('true')",))


def _as_encoding(state) -> bytes:
    """A pickle shaped like tiktoken's (Encoding.__new__(), then __setstate__(state)) with any
    state: GLOBAL + EMPTY_TUPLE + NEWOBJ, the state's own opcodes, BUILD, STOP."""
    return b"\x80\x02ctiktoken.core\nEncoding\n)\x81" + pickle.dumps(state, protocol=2)[2:-1] + b"b."


class _CallsEncoding:
    def __reduce__(self):  # REDUCE: call the class, which tiktoken's pickles never do
        return (tiktoken.core.Encoding, ("x",))


def test_malicious_pickle_is_refused_and_never_runs(tmp_path):
    marker = tmp_path / "pwned"
    path = tmp_path / "tokenizer.pkl"
    path.write_bytes(pickle.dumps(_Evil(f"touch {marker}")))
    with pytest.raises(PickleRefused, match=r"asks for (posix|os)\.system.*nothing was executed"):
        read_encoding(path)
    with pytest.raises(PickleRefused, match=r"builtins\.eval"):
        loads_encoding(pickle.dumps(_EvilEval()))
    # hidden inside a genuine-looking Encoding state: refused at the nested global all the same
    state = {
        "name": "x",
        "pat_str": "a",
        "mergeable_ranks": {b"a": _Evil(f"touch {marker}")},
        "special_tokens": {},
    }
    with pytest.raises(PickleRefused, match=r"(posix|os)\.system"):
        loads_encoding(_as_encoding(state))
    assert not marker.exists()
    # calling the class (REDUCE) is not how tiktoken pickles: refused, nothing constructed
    with pytest.raises(PickleRefused, match="only be rebuilt by __setstate__"):
        loads_encoding(pickle.dumps(_CallsEncoding()))


def test_other_pickles_are_refused_with_a_clear_error(enc):
    with pytest.raises(PickleRefused, match="holds a dict, not a tiktoken Encoding"):
        loads_encoding(pickle.dumps({"mergeable_ranks": {}}))
    with pytest.raises(PickleRefused, match=r"copy_?reg\._reconstructor"):
        loads_encoding(pickle.dumps(enc, protocol=0))  # old protocols need more globals
    with pytest.raises(PickleRefused, match="not a readable pickle"):
        loads_encoding(pickle.dumps(enc)[:100])
    with pytest.raises(PickleRefused, match="lacks"):
        loads_encoding(_as_encoding({"name": "x", "pat_str": "a"}))
    with pytest.raises(PickleRefused, match="mergeable_ranks must map bytes to int"):
        loads_encoding(_as_encoding({"pat_str": "a", "mergeable_ranks": {"a": 0}, "special_tokens": {}}))
    # an encoding tiktoken pickles by its registered name carries no vocabulary
    registered = tiktoken.Encoding(
        "ncp_test_registered", pat_str="a", mergeable_ranks={b"a": 0}, special_tokens={}
    )
    tiktoken.registry.ENCODINGS[registered.name] = registered
    try:
        data = pickle.dumps(registered)
    finally:
        del tiktoken.registry.ENCODINGS[registered.name]
    with pytest.raises(PickleRefused, match="registered encoding 'ncp_test_registered'"):
        loads_encoding(data)
