"""KV-cache decoding and the Engine against the plain full-sequence forward."""

from __future__ import annotations

import pytest
import torch

from shared.nanochat.engine import Engine, KVCache, sample_next_token, use_calculator

# sequence_len 512 -> short window 128, so prompts past 128 tokens exercise the sliding windows.
WINDOWED = dict(sequence_len=512, window_pattern="SSL", n_layer=5)


@pytest.mark.parametrize("backend", ["sdpa", "math", "flex"])
def test_cached_logits_equal_full_forward(make_model, backend):
    model = make_model(**WINDOWED)
    model.attn_backend = backend
    assert model.windows[:2] == [128, 128]
    idx = torch.randint(0, 300, (2, 200))
    with torch.no_grad():  # FlexAttention has no CPU backward; under grad it defers to SDPA
        full = model(idx)
    cache = KVCache.for_model(model, batch_size=2, max_len=256)
    pieces, pos = [], 0
    for n in [150, 1, 1, 30, 1, 17]:  # prefill, single tokens, and a chunk after decoding began
        pieces.append(model(idx[:, pos : pos + n], kv_cache=cache))
        pos += n
    assert cache.pos == 200
    cached = torch.cat(pieces, dim=1)
    assert torch.allclose(cached, full, atol=1e-4), (cached - full).abs().max()


def test_cache_keeps_smear_state(make_model):
    model = make_model(**WINDOWED)
    idx = torch.randint(0, 300, (1, 10))
    cache = KVCache.for_model(model, 1, 16)
    model(idx[:, :9], kv_cache=cache)
    assert torch.allclose(
        cache.prev_embedding[0, 0],
        torch.nn.functional.rms_norm(model.transformer.wte.weight[idx[0, 8]], (64,)),
    )
    last = model(idx[:, 9:], kv_cache=cache)
    # Without the cached previous embedding the smear term would be missing.
    cache2 = KVCache.for_model(model, 1, 16)
    model(idx[:, :9], kv_cache=cache2)
    cache2.prev_embedding = None
    assert not torch.allclose(last, model(idx[:, 9:], kv_cache=cache2), atol=1e-4)


def test_expand_copies_batch_one_cache(make_model):
    model = make_model()
    idx = torch.randint(0, 300, (1, 12))
    small = KVCache.for_model(model, 1, 12)
    model(idx, kv_cache=small)
    big = small.expand(3, 20)
    assert (big.batch_size, big.max_len, big.pos) == (3, 20, 12)
    nxt = torch.tensor([[5], [6], [7]])
    out = model(nxt, kv_cache=big)[:, -1]
    for row in range(3):
        full = model(torch.cat([idx, nxt[row : row + 1]], dim=1))[:, -1]
        assert torch.allclose(out[row], full[0], atol=1e-4)


def greedy_rollout(model, prompt, n):
    ids = list(prompt)
    for _ in range(n):
        ids.append(int(model(torch.tensor([ids]))[0, -1].argmax()))
    return ids[len(prompt) :]


def test_greedy_generate_equals_argmax_rollout(make_model):
    model = make_model(**WINDOWED)
    prompt = torch.randint(0, 300, (140,)).tolist()  # crosses the 128-token window while decoding
    want = greedy_rollout(model, prompt, 12)
    engine = Engine(model)
    cols = list(engine.generate(prompt, num_samples=2, max_tokens=12, temperature=0.0))
    assert len(cols) == 12
    assert [c[0] for c, _ in cols] == want and [c[1] for c, _ in cols] == want
    assert all(m == [1, 1] for _, m in cols)


def test_sampling_is_seeded_and_rows_differ(make_model):
    model = make_model()
    engine = Engine(model)

    def run(seed):
        return engine.generate_batch([1, 2, 3], num_samples=4, max_tokens=8, temperature=1.0, seed=seed)

    a, b, c = run(7), run(7), run(8)
    assert a == b and a != c
    assert len({tuple(s) for s in a[0]}) > 1  # independent samples per row
    assert all(len(s) == 11 and m == [0, 0, 0] + [1] * 8 for s, m in zip(*a, strict=True))


def test_stop_tokens_end_rows(make_model):
    model = make_model()
    engine = Engine(model)
    first = next(iter(engine.generate([4, 5], max_tokens=5, temperature=0.0)))[0][0]
    cols = list(engine.generate([4, 5], max_tokens=5, temperature=0.0, stop_token_ids=[first]))
    assert len(cols) == 1
    seqs, _ = engine.generate_batch([4, 5], max_tokens=5, temperature=0.0, stop_token_ids=[first])
    assert seqs == [[4, 5]]  # the stop token itself is not returned


def test_context_limit_stops_generation(make_model):
    model = make_model()  # sequence_len 64
    cols = list(Engine(model).generate(list(range(60)), temperature=0.0))
    assert len(cols) == 4


def test_sample_next_token_filters():
    logits = torch.tensor([[0.0, 5.0, 4.9, -3.0, 1.0]]).repeat(2000, 1)
    g = torch.Generator().manual_seed(0)
    assert sample_next_token(logits[:2], g, temperature=0.0).flatten().tolist() == [1, 1]
    top2 = sample_next_token(logits, g, temperature=1.0, top_k=2).flatten()
    assert set(top2.tolist()) == {1, 2}
    # Token 1 holds 0.518 of the mass: top_p 0.6 keeps token 2 as well (0.987), nothing else.
    nucleus = sample_next_token(logits, g, temperature=1.0, top_p=0.6).flatten()
    assert set(nucleus.tolist()) == {1, 2}
    assert set(sample_next_token(logits, g, temperature=1.0, top_p=0.5).flatten().tolist()) == {1}
    everything = sample_next_token(logits, g, temperature=3.0).flatten()
    assert set(everything.tolist()) == {0, 1, 2, 3, 4}
    with pytest.raises(ValueError, match="temperature"):
        sample_next_token(logits, g, temperature=-1.0)


@pytest.mark.parametrize(
    "expr, want",
    [
        ("2+3*4", 14),
        ("(1,000 + 24) / 4", 256.0),
        ("7 // 2 - -1", 4),
        ("10 % 4", 2),
        ("'strawberry'.count('r')", 3),
        ("2**10", None),  # power: unbounded cost, refused like the reference
        ("__import__('os').system('true')", None),
        ("open('x')", None),
        ("1/0", None),
        ("abc", None),
        ("9" * 30 + "*" + "9" * 30, None),
        ("'a' * 3", None),
        ("", None),
    ],
)
def test_calculator(expr, want):
    assert use_calculator(expr) == want


def successor_model(make_model, vocab_size, successor: dict[int, int]):
    """A real GPT whose weights make greedy decoding follow `successor` (next token depends only on
    the current one): blocks write nothing (zero output projections), smear/backout are off, each
    chain token gets a one-hot embedding and lm_head maps it to its successor's row."""
    model = make_model(perturb=False, vocab_size=vocab_size)
    d = model.config.n_embd
    assert len(successor) <= d
    with torch.no_grad():
        model.backout_lambda.zero_()
        model.transformer.wte.weight.zero_()
        model.lm_head.weight.zero_()
        for j, (tok, nxt) in enumerate(successor.items()):
            model.transformer.wte.weight[tok, j] = 1.0
            model.lm_head.weight[nxt, j] = 20.0
    return model


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    from shared.nanochat.tokenizer import train_tokenizer

    texts = ["the calculator says 2+3 is 5 and 12*4 is 48. " * 3, "hello world, numbers 123 456"] * 5
    return train_tokenizer(texts, vocab_size=300)


def test_calculator_tool_output_is_forced(make_model, tokenizer):
    sp = tokenizer.encode_special
    expr = tokenizer.encode("2+3")
    chain = [7, sp("<|python_start|>"), *expr, sp("<|python_end|>")]
    successor = dict(zip(chain[:-1], chain[1:], strict=True))
    successor[chain[-1]] = 9  # whatever the model wants after python_end is overridden by the tool
    successor[sp("<|output_end|>")] = sp("<|assistant_end|>")
    model = successor_model(make_model, tokenizer.vocab_size, successor)
    engine = Engine(model, tokenizer)

    cols = list(engine.generate([3, 7], num_samples=2, max_tokens=40, temperature=0.0))
    tokens = [c[0] for c, _ in cols]
    masks = [m[0] for _, m in cols]
    result = tokenizer.encode("5")
    forced = [sp("<|output_start|>"), *result, sp("<|output_end|>")]
    assert tokens == chain[1:] + forced + [sp("<|assistant_end|>")]
    assert masks == [1] * (len(chain) - 1) + [0] * len(forced) + [1]
    assert all(c[0] == c[1] for c, _ in cols)  # both rows ran the tool

    seqs, seq_masks = engine.generate_batch([3, 7], max_tokens=40, temperature=0.0)
    assert seqs[0] == [3, 7] + tokens[:-1]  # the terminating <|assistant_end|> is dropped
    assert seq_masks[0] == [0, 0] + masks[:-1]
    assert tokenizer.decode(seqs[0][2:]).endswith(
        "<|python_start|>2+3<|python_end|><|output_start|>5<|output_end|>"
    )


def test_bos_stops_by_default(make_model, tokenizer):
    bos = tokenizer.encode_special("<|bos|>")
    model = successor_model(make_model, tokenizer.vocab_size, {7: 11, 11: bos})
    cols = list(Engine(model, tokenizer).generate([7], max_tokens=10, temperature=0.0))
    assert [c[0] for c, _ in cols] == [11, bos]
