"""The nanochat GPT for transformers (`AutoModelForCausalLM` with `trust_remote_code=True`).

Copied into every export folder; depends only on torch and transformers. Same state-dict keys as
nanochat's checkpoints (model.safetensors loads as is) and the same math: normalized token
embedding, smear of the previous token, x0/resid lambdas, RoPE (base `rope_theta`, rotation by
-theta, halves layout), QK RMS-norm after RoPE times `qk_scale`, GQA, per-layer sliding windows
(a query at t sees keys t-w..t), value embeddings with per-kv-head gates on alternating layers,
ReLU^2 MLP, backout of the middle residual, untied lm_head over the padded vocabulary, logits
cropped to the vocabulary and soft-capped.

No KV cache: every forward runs the whole sequence (generate() works, re-reading the prefix each
step). Batches must be unpadded (all sequences the same length): an attention_mask with zeros is
refused rather than silently ignored.
"""

from __future__ import annotations

from typing import cast

import torch
import torch.nn.functional as F
from torch import nn
from transformers import GenerationMixin, PreTrainedModel
from transformers.modeling_outputs import CausalLMOutput

from .configuration_ncp_nanochat import NanochatConfig


def _norm(x: torch.Tensor) -> torch.Tensor:
    return F.rms_norm(x, (x.size(-1),))


def _rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    d = x.shape[-1] // 2
    x1, x2 = x[..., :d], x[..., d:]
    return torch.cat([x1 * cos + x2 * sin, x2 * cos - x1 * sin], dim=-1)


def _rotary_tables(t: int, head_dim: int, base: float, device, dtype) -> tuple[torch.Tensor, torch.Tensor]:
    inv_freq = 1.0 / (base ** (torch.arange(0, head_dim, 2, dtype=torch.float32, device=device) / head_dim))
    freqs = torch.outer(torch.arange(t, dtype=torch.float32, device=device), inv_freq)
    return freqs.cos()[None, :, None, :].to(dtype), freqs.sin()[None, :, None, :].to(dtype)


class _Linear(nn.Linear):
    def __init__(self, in_features: int, out_features: int) -> None:
        super().__init__(in_features, out_features, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight.to(dtype=x.dtype))


class _Attention(nn.Module):
    def __init__(self, config: NanochatConfig, layer: int) -> None:
        super().__init__()
        self.n_head, self.n_kv_head, self.head_dim = config.n_head, config.n_kv_head, config.head_dim
        self.window = config.window_sizes[layer]
        self.qk_scale = config.qk_scale
        self.ve_channels = config.ve_gate_channels
        kv = config.n_kv_head * config.head_dim
        self.c_q = _Linear(config.n_embd, config.n_head * config.head_dim)
        self.c_k = _Linear(config.n_embd, kv)
        self.c_v = _Linear(config.n_embd, kv)
        self.c_proj = _Linear(config.n_embd, config.n_embd)
        has_ve = layer in config.value_embed_layers
        self.ve_gate = _Linear(config.ve_gate_channels, config.n_kv_head) if has_ve else None

    def forward(self, x, ve, cos, sin):
        b, t, _ = x.shape
        q = self.c_q(x).view(b, t, self.n_head, self.head_dim)
        k = self.c_k(x).view(b, t, self.n_kv_head, self.head_dim)
        v = self.c_v(x).view(b, t, self.n_kv_head, self.head_dim)
        if ve is not None and self.ve_gate is not None:
            gate = 3 * torch.sigmoid(self.ve_gate(x[..., : self.ve_channels]))  # (B, T, Hkv)
            v = v + gate.unsqueeze(-1) * ve.view(b, t, self.n_kv_head, self.head_dim)
        q, k = _rotary(q, cos, sin), _rotary(k, cos, sin)
        q, k = _norm(q) * self.qk_scale, _norm(k) * self.qk_scale
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)  # (B, H, T, D)
        if self.n_kv_head != self.n_head:
            rep = self.n_head // self.n_kv_head
            k, v = k.repeat_interleave(rep, dim=1), v.repeat_interleave(rep, dim=1)
        if self.window >= t - 1:  # no query is far enough along to lose a key to the window
            y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        else:
            rows = torch.arange(t, device=x.device)[:, None]
            cols = torch.arange(t, device=x.device)[None, :]
            mask = (cols <= rows) & (rows - cols <= self.window)
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        return self.c_proj(y.transpose(1, 2).contiguous().view(b, t, -1))


class _MLP(nn.Module):
    def __init__(self, config: NanochatConfig) -> None:
        super().__init__()
        self.c_fc = _Linear(config.n_embd, config.intermediate_size)
        self.c_proj = _Linear(config.intermediate_size, config.n_embd)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.c_proj(F.relu(self.c_fc(x)).square())


class _Block(nn.Module):
    def __init__(self, config: NanochatConfig, layer: int) -> None:
        super().__init__()
        self.attn = _Attention(config, layer)
        self.mlp = _MLP(config)

    def forward(self, x, ve, cos, sin):
        x = x + self.attn(_norm(x), ve, cos, sin)
        return x + self.mlp(_norm(x))


class NanochatForCausalLM(PreTrainedModel, GenerationMixin):
    config_class = NanochatConfig
    base_model_prefix = "model"  # no key starts with it: checkpoint keys are used as they are
    _no_split_modules = ["_Block"]
    main_input_name = "input_ids"

    def __init__(self, config: NanochatConfig) -> None:
        super().__init__(config)
        pv, kv = config.padded_vocab_size, config.n_kv_head * config.head_dim
        self.transformer = nn.ModuleDict(
            {
                "wte": nn.Embedding(pv, config.n_embd),
                "h": nn.ModuleList([_Block(config, i) for i in range(config.n_layer)]),
            }
        )
        self.lm_head = _Linear(config.n_embd, pv)
        self.resid_lambdas = nn.Parameter(torch.ones(config.n_layer))
        self.x0_lambdas = nn.Parameter(torch.zeros(config.n_layer))
        self.smear_gate = _Linear(config.smear_channels, 1)
        self.smear_lambda = nn.Parameter(torch.zeros(1))
        self.backout_lambda = nn.Parameter(torch.zeros(1))
        self.value_embeds = nn.ModuleDict({str(i): nn.Embedding(pv, kv) for i in config.value_embed_layers})
        self.post_init()

    def _init_weights(self, module: nn.Module) -> None:
        # Only for weights a folder lacks; exported folders carry every tensor.
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)

    def get_input_embeddings(self) -> nn.Module:
        return self.transformer["wte"]

    def get_output_embeddings(self) -> nn.Module:
        return self.lm_head

    def prepare_inputs_for_generation(self, input_ids, **kwargs):
        # The whole sequence each step (no cache). generate() derives a padding mask from
        # pad_token_id, which is <|bos|> here, a real token: that mask is not passed on.
        return {"input_ids": input_ids}

    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        labels: torch.LongTensor | None = None,
        return_dict: bool | None = None,
        **kwargs,
    ) -> CausalLMOutput | tuple:
        if input_ids is None:
            raise ValueError("input_ids is required")
        if attention_mask is not None and not bool(attention_mask.bool().all()):
            raise ValueError("padded batches are not supported: pass sequences of one length")
        cfg = self.config
        b, t = input_ids.shape
        x = _norm(self.transformer["wte"](input_ids))  # (B, T, C)
        dtype = x.dtype
        cos, sin = _rotary_tables(t, cfg.head_dim, cfg.rope_theta, x.device, dtype)
        if t > 1:  # smear: position t mixes in the embedding of t-1, gated
            gate = self.smear_lambda.to(dtype) * torch.sigmoid(
                self.smear_gate(x[:, 1:, : cfg.smear_channels])
            )
            x = torch.cat([x[:, :1], x[:, 1:] + gate * x[:, :-1]], dim=1)
        x0, x_mid = x, None
        blocks = cast(nn.ModuleList, self.transformer["h"])
        for i, block in enumerate(blocks):
            x = self.resid_lambdas[i].to(dtype) * x + self.x0_lambdas[i].to(dtype) * x0
            ve = self.value_embeds[str(i)](input_ids).to(dtype) if str(i) in self.value_embeds else None
            x = block(x, ve, cos, sin)
            if i == cfg.backout_layer:
                x_mid = x
        if x_mid is not None:
            x = x - self.backout_lambda.to(dtype) * x_mid
        logits = self.lm_head(_norm(x))[..., : cfg.vocab_size].float()
        logits = cfg.logit_softcap * torch.tanh(logits / cfg.logit_softcap)
        loss = None
        if labels is not None:
            loss = F.cross_entropy(
                logits[:, :-1].reshape(-1, logits.size(-1)), labels[:, 1:].reshape(-1), ignore_index=-100
            )
        if return_dict is False:
            return (loss, logits) if loss is not None else (logits,)
        return CausalLMOutput(loss=loss, logits=logits)
