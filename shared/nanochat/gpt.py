"""The nanochat GPT: every architectural feature of the reference, with identical state-dict keys.

Features (MODEL_SPEC): RoPE (base 1e5, the reference's rotate-by-minus-theta convention), QK
RMS-norm after RoPE with a 1.2 scale on q and k, GQA, per-layer sliding windows, ReLU^2 MLP, no
biases, weightless pre-norm RMSNorm, normalized token embedding, smear (previous token's embedding
gated into the current one), x0 / resid lambdas, value embeddings on alternating layers, backout of
the mid-network residual, untied lm_head, fp32 logits soft-capped at 15 and cropped to the vocab.

Build anywhere (including `torch.device("meta")`), then `to_empty(device=...)` + `init_weights()`:
`__init__` only creates shapes; all values, the rotary tables included, are set in `init_weights`.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import cast

import torch
import torch.nn as nn
import torch.nn.functional as F

from shared.nanochat.attention import (
    BACKENDS,
    attention,
    attention_with_cache,
    select_backend,
    sliding_block_masks,
)
from shared.nanochat.config import GPTConfig

ROPE_BASE = 100_000
SOFTCAP = 15.0
QK_SCALE = 1.2
SMEAR_CHANNELS = 24
VE_GATE_CHANNELS = 12
# The rotary table is over-computed so prompts somewhat longer than training still decode.
ROTARY_OVERCOMPUTE = 10


def norm(x: torch.Tensor) -> torch.Tensor:
    """RMSNorm without a learnable weight."""
    return F.rms_norm(x, (x.size(-1),))


class Linear(nn.Linear):
    """Bias-free Linear whose fp32 master weight is cast to the activation dtype at use, so the
    matmul runs in bf16 without autocast while the optimizer keeps full-precision weights."""

    def __init__(self, in_features: int, out_features: int) -> None:
        super().__init__(in_features, out_features, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight.to(dtype=x.dtype))


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x (B, T, H, D); cos/sin (1, T, 1, D/2). Halves are rotated by -theta (the reference's sign,
    the transpose of the textbook form): required for reference checkpoints to mean the same."""
    d = x.shape[-1] // 2
    x1, x2 = x[..., :d], x[..., d:]
    return torch.cat([x1 * cos + x2 * sin, x2 * cos - x1 * sin], dim=-1)


def rotary_tables(seq_len: int, head_dim: int, device=None) -> tuple[torch.Tensor, torch.Tensor]:
    inv_freq = 1.0 / (
        ROPE_BASE ** (torch.arange(0, head_dim, 2, dtype=torch.float32, device=device) / head_dim)
    )
    freqs = torch.outer(torch.arange(seq_len, dtype=torch.float32, device=device), inv_freq)
    return freqs.cos()[None, :, None, :], freqs.sin()[None, :, None, :]


class CausalSelfAttention(nn.Module):
    def __init__(self, config: GPTConfig, layer_idx: int) -> None:
        super().__init__()
        self.layer_idx = layer_idx
        self.n_head = config.n_head
        self.n_kv_head = config.n_kv_head
        self.head_dim = config.head_dim
        self.c_q = Linear(config.n_embd, config.n_head * self.head_dim)
        self.c_k = Linear(config.n_embd, config.kv_dim)
        self.c_v = Linear(config.n_embd, config.kv_dim)
        self.c_proj = Linear(config.n_embd, config.n_embd)
        self.ve_gate = (
            Linear(VE_GATE_CHANNELS, config.n_kv_head) if config.has_value_embed(layer_idx) else None
        )

    def forward(self, x, ve, cos, sin, window: int, backend: str, kv_cache=None, block_mask=None):
        b, t, _ = x.shape  # x is the block's normalized input (B, T, C)
        q = self.c_q(x).view(b, t, self.n_head, self.head_dim)
        k = self.c_k(x).view(b, t, self.n_kv_head, self.head_dim)
        v = self.c_v(x).view(b, t, self.n_kv_head, self.head_dim)
        if ve is not None:
            # Value residual (ResFormer): per-kv-head gate in (0, 3) read from the first channels.
            assert self.ve_gate is not None  # ve is only passed to layers built with a gate
            gate = 3 * torch.sigmoid(self.ve_gate(x[..., :VE_GATE_CHANNELS]))  # (B, T, Hkv)
            v = v + gate.unsqueeze(-1) * ve.view(b, t, self.n_kv_head, self.head_dim)
        q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
        q, k = norm(q) * QK_SCALE, norm(k) * QK_SCALE
        if kv_cache is None:
            y = attention(q, k, v, window=window, backend=backend, block_mask=block_mask)
        else:
            k_cache, v_cache = kv_cache.layer(self.layer_idx)
            y = attention_with_cache(q, k, v, k_cache, v_cache, kv_cache.pos, window=window, backend=backend)
        return self.c_proj(y.contiguous().view(b, t, -1))


class MLP(nn.Module):
    def __init__(self, config: GPTConfig) -> None:
        super().__init__()
        self.c_fc = Linear(config.n_embd, 4 * config.n_embd)
        self.c_proj = Linear(4 * config.n_embd, config.n_embd)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.c_proj(F.relu(self.c_fc(x)).square())


class Block(nn.Module):
    def __init__(self, config: GPTConfig, layer_idx: int) -> None:
        super().__init__()
        self.attn = CausalSelfAttention(config, layer_idx)
        self.mlp = MLP(config)

    def forward(self, x, ve, cos, sin, window: int, backend: str, kv_cache=None, block_mask=None):
        x = x + self.attn(norm(x), ve, cos, sin, window, backend, kv_cache, block_mask)
        return x + self.mlp(norm(x))


class GPT(nn.Module):
    cos: torch.Tensor  # (1, T_rot, 1, head_dim / 2) rotary tables, non-persistent buffers
    sin: torch.Tensor

    def __init__(
        self, config: GPTConfig, *, attn_backend: str = "auto", compute_dtype: torch.dtype | None = None
    ) -> None:
        """`compute_dtype`: activation dtype (e.g. bf16); None = the embedding's dtype (fp32 default).
        With bf16/fp32 compute, init_weights stores the embeddings in it, as the reference does."""
        super().__init__()
        self.config = config
        if attn_backend != "auto" and attn_backend not in BACKENDS:
            raise ValueError(f"attn_backend must be 'auto' or one of {BACKENDS}, got {attn_backend!r}")
        self._attn_backend = attn_backend
        self.compute_dtype = compute_dtype
        self.windows = config.window_sizes()
        pv = config.padded_vocab_size
        self.transformer = nn.ModuleDict(
            {
                "wte": nn.Embedding(pv, config.n_embd),
                "h": nn.ModuleList([Block(config, i) for i in range(config.n_layer)]),
            }
        )
        self.lm_head = Linear(config.n_embd, pv)
        self.resid_lambdas = nn.Parameter(torch.empty(config.n_layer))
        self.x0_lambdas = nn.Parameter(torch.empty(config.n_layer))
        self.smear_gate = Linear(SMEAR_CHANNELS, 1)
        self.smear_lambda = nn.Parameter(torch.empty(1))
        self.backout_lambda = nn.Parameter(torch.empty(1))
        self.value_embeds = nn.ModuleDict(
            {
                str(i): nn.Embedding(pv, config.kv_dim)
                for i in range(config.n_layer)
                if config.has_value_embed(i)
            }
        )
        # Derived from the config, so not saved (the reference's checkpoints do not hold them either).
        rot_len = config.sequence_len * ROTARY_OVERCOMPUTE
        half = config.head_dim // 2
        self.register_buffer("cos", torch.empty(1, rot_len, 1, half), persistent=False)
        self.register_buffer("sin", torch.empty(1, rot_len, 1, half), persistent=False)
        # Attention backends and FlexAttention masks per (T, device, dtype); see _attention_setup.
        self._attn_setup: dict[tuple, tuple[list[str], dict]] = {}

    # --- initialisation --------------------------------------------------------------------------
    @torch.no_grad()
    def init_weights(self) -> None:
        """The reference's init: embeddings normal (std 0.8), lm_head normal (std 0.001), block
        matrices uniform with std 1/sqrt(d) (c_fc at 0.4x), output projections zero, gates small
        positive, lambdas on their per-layer ramps."""
        cfg = self.config
        nn.init.normal_(self.wte.weight, mean=0.0, std=0.8)
        nn.init.normal_(self.lm_head.weight, mean=0.0, std=0.001)
        bound = 3**0.5 * cfg.n_embd**-0.5  # uniform(-a, a) has std a/sqrt(3): same std as normal(1/sqrt(d))
        for block in self.blocks:
            for w in (block.attn.c_q.weight, block.attn.c_k.weight, block.attn.c_v.weight):
                nn.init.uniform_(w, -bound, bound)
            nn.init.zeros_(block.attn.c_proj.weight)
            nn.init.uniform_(block.mlp.c_fc.weight, -0.4 * bound, 0.4 * bound)
            nn.init.zeros_(block.mlp.c_proj.weight)
            if block.attn.ve_gate is not None:
                nn.init.uniform_(block.attn.ve_gate.weight, 0.0, 0.02)
        denom = max(cfg.n_layer - 1, 1)
        ramp = torch.arange(cfg.n_layer, dtype=torch.float32, device=self.resid_lambdas.device) / denom
        self.resid_lambdas.copy_(1.15 - 0.10 * ramp)
        self.x0_lambdas.copy_(0.20 - 0.15 * ramp)
        nn.init.zeros_(self.smear_lambda)
        nn.init.constant_(self.backout_lambda, 0.2)
        nn.init.uniform_(self.smear_gate.weight, 0.0, 0.02)
        for w in self.value_embeds.parameters():
            nn.init.uniform_(w, -bound, bound)
        self.init_rotary()
        self._attn_setup.clear()
        # Embeddings are lookups: storing them in the compute dtype saves memory and the optimizer
        # copes. fp16 is the exception: GradScaler cannot unscale fp16 gradients.
        if self.compute_dtype is not None and self.compute_dtype != torch.float16:
            self.wte.to(dtype=self.compute_dtype)
            for ve in self.value_embeds.values():
                ve.to(dtype=self.compute_dtype)
        device = self.cos.device
        if device.type != "meta":
            # Warm the training-shape attention setup now, in eager mode, so torch.compile of the
            # forward finds it cached (no graph break, no mask building inside the graph).
            dtype = self.compute_dtype or self.wte.weight.dtype
            self._build_attention_setup(self.config.sequence_len, device, dtype, True)

    @torch.no_grad()
    def init_rotary(self) -> None:
        """(Re)compute the non-persistent rotary tables, e.g. after `to_empty` + `load_state_dict`."""
        cos, sin = rotary_tables(self.cos.shape[1], self.config.head_dim, device=self.cos.device)
        self.cos.copy_(cos)
        self.sin.copy_(sin)

    @property
    def wte(self) -> nn.Embedding:
        return cast(nn.Embedding, self.transformer["wte"])

    @property
    def blocks(self) -> Sequence[Block]:
        return cast(Sequence[Block], self.transformer["h"])

    @property
    def attn_backend(self) -> str:
        return self._attn_backend

    @attn_backend.setter
    def attn_backend(self, name: str) -> None:
        self._attn_backend = name
        self._attn_setup.clear()

    # --- helpers ---------------------------------------------------------------------------------
    def get_device(self) -> torch.device:
        return self.wte.weight.device

    def attention_backends(self, device=None, dtype: torch.dtype | None = None) -> list[str]:
        """The attention backend each layer uses on `device` (default: the model's) for
        training-shape input; for logs and reports."""
        device = torch.device(device) if device is not None else self.get_device()
        dtype = dtype or self.compute_dtype or self.wte.weight.dtype
        return list(self._attention_setup(self.config.sequence_len, device, dtype, True)[0])

    def _attention_setup(self, t: int, device: torch.device, dtype: torch.dtype, masks: bool):
        """(per-layer backend names, {window: FlexAttention BlockMask}) for this T/device/dtype.
        A plain dict lookup when warm, so a compiled forward has no graph break; a miss is filled
        outside the graph by `_build_attention_setup`."""
        setup = self._attn_setup.get((t, device.type, device.index, dtype, masks))
        if setup is None:
            setup = self._build_attention_setup(t, device, dtype, masks)
        return setup

    @torch.compiler.disable
    def _build_attention_setup(self, t: int, device: torch.device, dtype: torch.dtype, masks: bool):
        backends = [
            select_backend(
                device, w, self.config.sequence_len, self.attn_backend, dtype, self.config.head_dim
            )
            for w in self.windows
        ]
        if device.type == "cuda" and (t != self.config.sequence_len or not masks):
            # Compiled flex specialises on T: other lengths (eval, prompts) and KV-cache steps
            # would recompile per shape, so they take SDPA, which is just as exact.
            backends = ["sdpa" if be == "flex" else be for be in backends]
        flex_windows = [w for w, be in zip(self.windows, backends, strict=True) if be == "flex"]
        block_masks = sliding_block_masks(t, flex_windows, device) if masks and flex_windows else {}
        setup = (backends, block_masks)
        self._attn_setup[(t, device.type, device.index, dtype, masks)] = setup
        return setup

    def _smear(self, x: torch.Tensor, prev: torch.Tensor | None) -> torch.Tensor:
        """x[t] += smear_lambda * sigmoid(smear_gate(x[t, :24])) * x[t-1] on normalized embeddings;
        `prev` is the embedding before x[0] when decoding with a cache (None at sequence start)."""
        gate = self.smear_lambda.to(x.dtype) * torch.sigmoid(self.smear_gate(x[..., :SMEAR_CHANNELS]))
        if prev is None:
            if x.shape[1] == 1:
                return x
            return torch.cat([x[:, :1], x[:, 1:] + gate[:, 1:] * x[:, :-1]], dim=1)
        return x + gate * torch.cat([prev.to(x.dtype), x[:, :-1]], dim=1)

    # --- forward ---------------------------------------------------------------------------------
    def forward(
        self,
        idx: torch.Tensor,
        targets: torch.Tensor | None = None,
        kv_cache=None,
        loss_reduction: str = "mean",
    ) -> torch.Tensor:
        """idx (B, T) int64. With targets: cross-entropy (ignore_index=-1) with `loss_reduction`.
        Without: logits (B, T, vocab_size) fp32. With `kv_cache` (engine.KVCache) the tokens are
        appended at the cache's position and the cache advances by T."""
        b, t = idx.shape
        pos = 0 if kv_cache is None else kv_cache.pos
        if pos + t > self.cos.shape[1]:
            raise ValueError(f"sequence position {pos + t} exceeds the rotary table ({self.cos.shape[1]})")
        x = self.wte(idx)
        dtype = self.compute_dtype or x.dtype
        x = norm(x.to(dtype))  # (B, T, C)
        cos = self.cos[:, pos : pos + t].to(dtype)
        sin = self.sin[:, pos : pos + t].to(dtype)

        if kv_cache is None:
            x = self._smear(x, None)
        else:
            prev = kv_cache.prev_embedding
            kv_cache.prev_embedding = x[:, -1:].detach()
            x = self._smear(x, prev)

        x0 = x
        backends, masks = self._attention_setup(t, idx.device, dtype, kv_cache is None)
        x_mid = None
        for i, block in enumerate(self.blocks):
            x = self.resid_lambdas[i].to(dtype) * x + self.x0_lambdas[i].to(dtype) * x0
            ve = self.value_embeds[str(i)](idx).to(dtype) if str(i) in self.value_embeds else None
            x = block(x, ve, cos, sin, self.windows[i], backends[i], kv_cache, masks.get(self.windows[i]))
            if i == self.config.backout_layer:
                x_mid = x
        if kv_cache is not None:
            kv_cache.advance(t)
        if x_mid is not None:
            # Remove the low-level features of the mid-network residual before reading out.
            x = x - self.backout_lambda.to(dtype) * x_mid
        x = norm(x)

        logits = self.lm_head(x)[..., : self.config.vocab_size].float()
        logits = SOFTCAP * torch.tanh(logits / SOFTCAP)
        if targets is None:
            return logits
        return F.cross_entropy(
            logits.view(-1, logits.size(-1)), targets.reshape(-1), ignore_index=-1, reduction=loss_reduction
        )

    # --- counting --------------------------------------------------------------------------------
    def param_breakdown(self) -> dict[str, int]:
        """Parameter counts per group (the reference's `num_scaling_params` dict); no data is read,
        so it works on the meta device."""
        counts = {
            "wte": self.wte.weight.numel(),
            "value_embeds": sum(p.numel() for p in self.value_embeds.parameters()),
            "lm_head": self.lm_head.weight.numel(),
            "transformer_matrices": sum(p.numel() for p in self.transformer["h"].parameters()),
            "scalars": sum(
                p.numel()
                for p in (
                    self.resid_lambdas,
                    self.x0_lambdas,
                    self.smear_gate.weight,
                    self.smear_lambda,
                    self.backout_lambda,
                )
            ),
        }
        counts["total"] = sum(counts.values())
        if counts["total"] != sum(p.numel() for p in self.parameters()):
            raise RuntimeError("param_breakdown misses a parameter group")  # a new param was not classified
        return counts

    def num_scaling_params(self) -> int:
        """Transformer matrices + lm_head: the N of the compute-optimal data ratio."""
        c = self.param_breakdown()
        return c["transformer_matrices"] + c["lm_head"]

    def num_matmul_params(self) -> int:
        """Every weight that multiplies the token stream (all Linear layers, gates and lm_head
        included); embeddings are lookups and the lambdas are elementwise, so they are excluded."""
        return sum(m.weight.numel() for m in self.modules() if isinstance(m, Linear))

    def estimate_flops(self) -> int:
        """Training FLOPs per token: 6 per matmul weight + 12 * H * D * attended keys per layer."""
        cfg = self.config
        attn = sum(12 * cfg.n_head * cfg.head_dim * min(w, cfg.sequence_len) for w in self.windows)
        return 6 * self.num_matmul_params() + attn
