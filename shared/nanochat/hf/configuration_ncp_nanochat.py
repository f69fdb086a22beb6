"""transformers configuration of an exported nanochat model (model_type "ncp_nanochat").

Copied into every export folder; depends only on transformers. The field names are nanochat's
GPTConfig; `attribute_map` exposes the Hugging Face names (hidden_size, num_attention_heads, ...)
that vLLM and generic tools read. Its own model_type: transformers >= 5 ships an unrelated
"nanochat" model type.
"""

from __future__ import annotations

from transformers import PretrainedConfig


class NanochatConfig(PretrainedConfig):
    model_type = "ncp_nanochat"
    attribute_map = {
        "hidden_size": "n_embd",
        "num_attention_heads": "n_head",
        "num_key_value_heads": "n_kv_head",
        "num_hidden_layers": "n_layer",
    }

    def __init__(
        self,
        sequence_len: int = 2048,
        vocab_size: int = 32768,
        padded_vocab_size: int | None = None,
        n_layer: int = 12,
        n_head: int = 6,
        n_kv_head: int = 6,
        n_embd: int = 768,
        head_dim: int | None = None,
        window_pattern: str = "SSSL",
        window_sizes: list[int] | None = None,
        value_embed_layers: list[int] | None = None,
        max_position_embeddings: int | None = None,
        intermediate_size: int | None = None,
        rope_theta: float = 100000.0,
        logit_softcap: float = 15.0,
        qk_scale: float = 1.2,
        ve_gate_channels: int = 12,
        smear_channels: int = 24,
        backout_layer: int | None = None,
        tie_word_embeddings: bool = False,
        **kwargs,
    ):
        self.sequence_len = sequence_len
        self.vocab_size = vocab_size
        self.padded_vocab_size = padded_vocab_size or -(-vocab_size // 64) * 64
        self.n_layer = n_layer
        self.n_head = n_head
        self.n_kv_head = n_kv_head
        self.n_embd = n_embd
        self.head_dim = head_dim or n_embd // n_head
        self.window_pattern = window_pattern
        # Per layer: how many *previous* tokens a position may attend to (flash-attn's left
        # window); >= sequence_len means full context.
        self.window_sizes = list(window_sizes) if window_sizes is not None else [sequence_len] * n_layer
        self.value_embed_layers = (
            list(value_embed_layers)
            if value_embed_layers is not None
            else [i for i in range(n_layer) if i % 2 == (n_layer - 1) % 2]
        )
        self.max_position_embeddings = max_position_embeddings or sequence_len
        self.intermediate_size = intermediate_size or 4 * n_embd
        self.rope_theta = rope_theta
        self.logit_softcap = logit_softcap
        self.qk_scale = qk_scale
        self.ve_gate_channels = ve_gate_channels
        self.smear_channels = smear_channels
        self.backout_layer = n_layer // 2 if backout_layer is None else backout_layer
        super().__init__(**kwargs)
        # After the base class, which (transformers 4.x) would reset it to its own default.
        self.tie_word_embeddings = tie_word_embeddings
