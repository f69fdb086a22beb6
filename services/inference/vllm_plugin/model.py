"""The full nanochat architecture as a native vLLM model (paged KV cache, prefix caching,
continuous batching, CUDA graphs / torch.compile).

Everything the reference GPT does is here: RMS-normed embedding, smear, x0/resid lambdas, value
embeddings with per-kv-head gates, RoPE with the reference's sign convention (rotation by
-theta), QK RMS-norm after RoPE and the 1.2 scale, per-layer sliding windows, ReLU^2 MLP, backout
of the middle residual, untied lm_head over the padded vocab, logits cropped and soft-capped.

Smear in vLLM. Position t mixes in the *pre-smear* embedding of position t-1 of the same
sequence. vLLM flattens a batch of sequences into one token stream and a decode step only sees
the new token, so the previous embedding has to come from per-sequence state. We keep that state
in the paged KV cache itself: one extra vLLM Attention layer ("smear_prev") with a sliding window
of 2 whose values are the pre-smear embeddings and whose query/key make the score of the
previous position +M and of the current one -M (M = 1e4, from the parity of `positions`). The
softmax weight of the current position is exp(-2M) = 0 exactly in fp32/bf16/fp16, so the layer
returns x[t-1] bit-exactly, and paging, prefix caching, chunked prefill, preemption and CUDA
graphs all work because it is an ordinary attention layer. At t = 0 the window holds only the
token itself; `positions > 0` masks that case, as the reference skips position 0.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
import torch.nn.functional as F
from torch import nn
from vllm.compilation.decorators import support_torch_compile
from vllm.config import VllmConfig
from vllm.distributed import get_pp_group, get_tensor_model_parallel_world_size

try:  # where current vLLM keeps the Attention layer (tested with 0.32)
    from vllm.model_executor.layers.attention import Attention
except ImportError:  # older releases
    from vllm.attention import Attention  # type: ignore[no-redef]
from vllm.model_executor.layers.linear import (
    ColumnParallelLinear,
    QKVParallelLinear,
    ReplicatedLinear,
    RowParallelLinear,
)
from vllm.model_executor.layers.logits_processor import LogitsProcessor
from vllm.model_executor.layers.vocab_parallel_embedding import ParallelLMHead, VocabParallelEmbedding
from vllm.model_executor.model_loader.weight_utils import default_weight_loader
from vllm.sequence import IntermediateTensors

# Score of the previous position in the smear layer; the current position gets -SMEAR_SCORE.
SMEAR_SCORE = 1.0e4


def norm(x: torch.Tensor) -> torch.Tensor:
    # Same call as the reference: no weight, eps = dtype's default.
    return F.rms_norm(x, (x.size(-1),))


def rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Reference RoPE (rotation by -theta, halves layout). x: (N, H, D); cos/sin: (N, 1, D/2)."""
    d = x.shape[-1] // 2
    x1, x2 = x[..., :d], x[..., d:]
    return torch.cat([x1 * cos + x2 * sin, x2 * cos - x1 * sin], dim=-1)


def vllm_window(left: int, max_model_len: int) -> int | None:
    """Reference window (previous tokens attended) -> vLLM's (tokens attended, self included)."""
    return None if left + 1 >= max_model_len else left + 1


class NanochatAttention(nn.Module):
    def __init__(self, config, layer: int, cache_config, quant_config, max_model_len: int, prefix: str):
        super().__init__()
        self.n_head, self.n_kv_head, self.head_dim = config.n_head, config.n_kv_head, config.head_dim
        self.q_size = self.n_head * self.head_dim
        self.kv_size = self.n_kv_head * self.head_dim
        self.qk_scale = config.qk_scale
        self.ve_channels = config.ve_gate_channels
        self.c_qkv = QKVParallelLinear(
            config.n_embd,
            self.head_dim,
            self.n_head,
            self.n_kv_head,
            bias=False,
            quant_config=quant_config,
            prefix=f"{prefix}.c_qkv",
        )
        self.c_proj = RowParallelLinear(
            self.q_size, config.n_embd, bias=False, quant_config=quant_config, prefix=f"{prefix}.c_proj"
        )
        self.ve_gate = (
            ReplicatedLinear(self.ve_channels, self.n_kv_head, bias=False, prefix=f"{prefix}.ve_gate")
            if layer in config.value_embed_layers
            else None
        )
        self.attn = Attention(
            self.n_head,
            self.head_dim,
            self.head_dim**-0.5,
            num_kv_heads=self.n_kv_head,
            cache_config=cache_config,
            quant_config=quant_config,
            per_layer_sliding_window=vllm_window(config.window_sizes[layer], max_model_len),
            prefix=f"{prefix}.attn",
        )

    def forward(self, x, ve, cos, sin):
        n = x.shape[0]
        qkv, _ = self.c_qkv(x)
        q, k, v = qkv.split([self.q_size, self.kv_size, self.kv_size], dim=-1)
        if self.ve_gate is not None:
            gate, _ = self.ve_gate(x[:, : self.ve_channels])
            gate = 3 * torch.sigmoid(gate)  # (N, n_kv_head)
            v = v.view(n, self.n_kv_head, self.head_dim) + gate.unsqueeze(-1) * ve.view(n, self.n_kv_head, -1)
            v = v.reshape(n, self.kv_size)
        q = norm(rotary(q.view(n, self.n_head, self.head_dim), cos, sin)) * self.qk_scale
        k = norm(rotary(k.view(n, self.n_kv_head, self.head_dim), cos, sin)) * self.qk_scale
        y = self.attn(q.reshape(n, self.q_size), k.reshape(n, self.kv_size), v)
        out, _ = self.c_proj(y)
        return out


class NanochatMLP(nn.Module):
    def __init__(self, config, quant_config, prefix: str):
        super().__init__()
        self.c_fc = ColumnParallelLinear(
            config.n_embd,
            config.intermediate_size,
            bias=False,
            quant_config=quant_config,
            prefix=f"{prefix}.c_fc",
        )
        self.c_proj = RowParallelLinear(
            config.intermediate_size,
            config.n_embd,
            bias=False,
            quant_config=quant_config,
            prefix=f"{prefix}.c_proj",
        )

    def forward(self, x):
        h, _ = self.c_fc(x)
        out, _ = self.c_proj(F.relu(h).square())
        return out


class NanochatBlock(nn.Module):
    def __init__(self, config, layer, cache_config, quant_config, max_model_len, prefix):
        super().__init__()
        self.attn = NanochatAttention(
            config, layer, cache_config, quant_config, max_model_len, f"{prefix}.attn"
        )
        self.mlp = NanochatMLP(config, quant_config, f"{prefix}.mlp")

    def forward(self, x, ve, cos, sin):
        x = x + self.attn(norm(x), ve, cos, sin)
        return x + self.mlp(norm(x))


class SmearPrevious(nn.Module):
    """Returns, for every token, the pre-smear embedding of the previous token of its sequence,
    read from the paged KV cache (see the module docstring)."""

    def __init__(self, config, cache_config, prefix: str):
        super().__init__()
        self.head_dim = config.head_dim
        if config.n_embd % self.head_dim:
            raise ValueError(f"n_embd {config.n_embd} is not a multiple of head_dim {self.head_dim}")
        self.n_heads = config.n_embd // self.head_dim
        self.attn = Attention(
            self.n_heads,
            self.head_dim,
            1.0,
            num_kv_heads=self.n_heads,
            cache_config=cache_config,
            quant_config=None,  # values must stay exact embeddings
            per_layer_sliding_window=2,
            prefix=f"{prefix}.attn",
        )

    def forward(self, x: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        n = x.shape[0]
        parity = 1.0 - 2.0 * (positions & 1).to(x.dtype)  # +1 at even positions, -1 at odd
        k = torch.zeros(n, self.n_heads, self.head_dim, dtype=x.dtype, device=x.device)
        k[:, :, 0] = parity[:, None]
        q = k * -SMEAR_SCORE  # q_t . k_s = -M * parity_t * parity_s: +M for s = t-1, -M for s = t
        return self.attn(q.view(n, -1), k.view(n, -1), x.contiguous())


# Annotations are strings here (future import), so name the dynamic (token) dimension explicitly.
@support_torch_compile(dynamic_arg_dims={"input_ids": 0, "positions": 0})
class NanochatModel(nn.Module):
    def __init__(self, *, vllm_config: VllmConfig, prefix: str = ""):
        super().__init__()
        config = vllm_config.model_config.hf_config
        cache_config, quant_config = vllm_config.cache_config, vllm_config.quant_config
        max_model_len = vllm_config.model_config.max_model_len
        if get_tensor_model_parallel_world_size() != 1 or get_pp_group().world_size != 1:
            # Value-embedding gates and smear mix across all kv heads; nanochat models fit on one GPU.
            raise ValueError(
                "the nanochat vLLM model supports tensor_parallel_size=1 and pipeline_parallel_size=1"
            )
        self.config = config
        self.smear_channels = config.smear_channels
        self.backout_layer = config.backout_layer
        kv_dim = config.n_kv_head * config.head_dim
        self.transformer = nn.ModuleDict(
            {
                "wte": VocabParallelEmbedding(
                    config.padded_vocab_size, config.n_embd, prefix=f"{prefix}.transformer.wte"
                ),
                "h": nn.ModuleList(
                    NanochatBlock(
                        config, i, cache_config, quant_config, max_model_len, f"{prefix}.transformer.h.{i}"
                    )
                    for i in range(config.n_layer)
                ),
            }
        )
        self.value_embeds = nn.ModuleDict(
            {
                str(i): VocabParallelEmbedding(
                    config.padded_vocab_size, kv_dim, prefix=f"{prefix}.value_embeds.{i}"
                )
                for i in config.value_embed_layers
            }
        )
        # One integer in the attention layer name (vLLM orders KV caches by it): n_layer, after the blocks.
        self.smear_prev = nn.ModuleDict(
            {
                str(config.n_layer): SmearPrevious(
                    config, cache_config, f"{prefix}.smear_prev.{config.n_layer}"
                )
            }
        )
        self.smear_gate = ReplicatedLinear(self.smear_channels, 1, bias=False, prefix=f"{prefix}.smear_gate")
        self.smear_lambda = nn.Parameter(torch.zeros(1))
        self.backout_lambda = nn.Parameter(torch.zeros(1))
        self.resid_lambdas = nn.Parameter(torch.ones(config.n_layer))
        self.x0_lambdas = nn.Parameter(torch.zeros(config.n_layer))
        half = torch.arange(0, config.head_dim, 2, dtype=torch.float32)
        self.register_buffer(
            "inv_freq", 1.0 / (config.rope_theta ** (half / config.head_dim)), persistent=False
        )

    def embed_input_ids(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.transformer["wte"](input_ids)

    def forward(
        self,
        input_ids: torch.Tensor,
        positions: torch.Tensor,
        intermediate_tensors: IntermediateTensors | None = None,
        inputs_embeds: torch.Tensor | None = None,
    ) -> torch.Tensor:
        # Value embeddings and smear are functions of token ids: prompt embeddings can't be served.
        x = norm(self.embed_input_ids(input_ids))  # (N, C)
        # RoPE tables computed like the reference's (fp32 outer product, cast to the compute dtype).
        freqs = positions.to(torch.float32)[:, None] * self.inv_freq[None, :]
        cos = freqs.cos().to(x.dtype)[:, None, :]
        sin = freqs.sin().to(x.dtype)[:, None, :]

        prev = self.smear_prev[str(self.config.n_layer)](x, positions)
        gate, _ = self.smear_gate(x[:, : self.smear_channels])
        gate = self.smear_lambda * torch.sigmoid(gate) * (positions > 0).to(x.dtype)[:, None]
        x = x + gate * prev
        x0 = x
        x_backout = x
        for i, block in enumerate(self.transformer["h"]):
            x = self.resid_lambdas[i] * x + self.x0_lambdas[i] * x0
            key = str(i)
            ve = self.value_embeds[key](input_ids) if key in self.value_embeds else None
            x = block(x, ve, cos, sin)
            if i == self.backout_layer:
                x_backout = x
        x = x - self.backout_lambda * x_backout
        return norm(x)


class NanochatForCausalLM(nn.Module):
    def __init__(self, *, vllm_config: VllmConfig, prefix: str = ""):
        super().__init__()
        config = vllm_config.model_config.hf_config
        self.config = config
        self.model = NanochatModel(
            vllm_config=vllm_config, prefix=f"{prefix}model" if not prefix else f"{prefix}.model"
        )
        self.lm_head = ParallelLMHead(
            config.padded_vocab_size,
            config.n_embd,
            bias=False,
            org_num_embeddings=config.padded_vocab_size,
            quant_config=vllm_config.quant_config,
            prefix=f"{prefix}lm_head" if not prefix else f"{prefix}.lm_head",
        )
        # Crop the padded vocab, then 15 * tanh(logits / 15), like the reference.
        self.logits_processor = LogitsProcessor(
            config.padded_vocab_size, org_vocab_size=config.vocab_size, soft_cap=config.logit_softcap
        )

    def embed_input_ids(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.model.embed_input_ids(input_ids)

    def forward(
        self,
        input_ids: torch.Tensor,
        positions: torch.Tensor,
        intermediate_tensors: IntermediateTensors | None = None,
        inputs_embeds: torch.Tensor | None = None,
    ) -> torch.Tensor:
        if input_ids is None:
            # Value embeddings and smear are functions of token ids, not of embeddings.
            raise ValueError("the nanochat model needs token ids; prompt embeddings are not supported")
        return self.model(input_ids, positions, intermediate_tensors, inputs_embeds)

    def compute_logits(self, hidden_states: torch.Tensor) -> torch.Tensor | None:
        return self.logits_processor(self.lm_head, hidden_states)

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> set[str]:
        """Load reference state-dict names (model.safetensors written by export.py)."""
        params = dict(self.named_parameters())
        loaded: set[str] = set()
        for name, tensor in weights:
            shard = None
            if name == "lm_head.weight":
                target = name
            else:
                target = f"model.{name}"
                for proj, shard_id in ((".attn.c_q.", "q"), (".attn.c_k.", "k"), (".attn.c_v.", "v")):
                    if proj in target:
                        target, shard = target.replace(proj, ".attn.c_qkv."), shard_id
            if target not in params:
                raise ValueError(f"unexpected tensor {name!r} in the checkpoint (no parameter {target!r})")
            param = params[target]
            loader = getattr(param, "weight_loader", default_weight_loader)
            if shard is not None:
                loader(param, tensor, shard)
            else:
                if param.shape != tensor.shape and param.numel() == tensor.numel():
                    tensor = tensor.reshape(param.shape)  # 0-d vs (1,) scalars
                loader(param, tensor)
            loaded.add(target)
        return loaded
