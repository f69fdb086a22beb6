from __future__ import annotations

import pytest

from shared.nanochat.config import GPTConfig


def test_from_depth_matches_reference_sizing():
    cfg = GPTConfig.from_depth(24)
    assert (cfg.n_embd, cfg.n_head, cfg.n_kv_head, cfg.n_layer, cfg.head_dim) == (1536, 12, 12, 24, 128)
    # 20 * 64 = 1280 is already whole heads; 26 * 64 = 1664 = 13 heads; 5 * 64 = 320 rounds up to 384.
    assert GPTConfig.from_depth(20).n_embd == 1280
    assert GPTConfig.from_depth(26).n_head == 13
    assert GPTConfig.from_depth(5).n_embd == 384
    assert GPTConfig.from_depth(12, n_kv_head=2).n_kv_head == 2


def test_windows_tile_pattern_and_last_layer_is_long():
    cfg = GPTConfig.from_depth(6, window_pattern="SSSL")
    assert cfg.short_window == 512
    assert cfg.window_sizes() == [512, 512, 512, 2048, 512, 2048]
    assert GPTConfig(sequence_len=1000, window_pattern="S", n_layer=2).window_sizes() == [256, 1000]
    assert GPTConfig(window_pattern="l").window_sizes() == [2048] * 12


def test_value_embed_layers_alternate_ending_at_last():
    assert [i for i in range(5) if GPTConfig(n_layer=5).has_value_embed(i)] == [0, 2, 4]
    assert [i for i in range(4) if GPTConfig(n_layer=4).has_value_embed(i)] == [1, 3]


def test_padded_vocab_and_roundtrip():
    cfg = GPTConfig(vocab_size=300)
    assert cfg.padded_vocab_size == 320
    assert GPTConfig(vocab_size=320).padded_vocab_size == 320
    assert GPTConfig.from_dict(cfg.to_dict()) == cfg


@pytest.mark.parametrize(
    "kwargs, field",
    [
        (dict(n_embd=100, n_head=6), "n_embd"),
        (dict(n_head=6, n_kv_head=4), "n_kv_head"),
        (dict(window_pattern="SXL"), "window_pattern"),
        (dict(window_pattern=""), "window_pattern"),
        (dict(vocab_size=264), "vocab_size"),
        (dict(n_layer=0), "n_layer"),
        (dict(sequence_len=-1), "sequence_len"),
        (dict(n_head=0), "n_head"),
    ],
)
def test_bad_config_names_the_field(kwargs, field):
    with pytest.raises(ValueError, match=field):
        GPTConfig(**kwargs)


def test_from_dict_rejects_unknown_keys():
    with pytest.raises(ValueError, match="bogus"):
        GPTConfig.from_dict({**GPTConfig().to_dict(), "bogus": 1})
