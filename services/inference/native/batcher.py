"""Continuous batching for the native server: one decode step for all running sequences.

Requests arrive from many HTTP handlers; a single scheduler thread owns the model. A new request
is prefilled alone with the model's own KV-cache path (GPT.forward + engine.KVCache), its cache
copied into free rows ("slots") of a shared cache, and from then on it advances together with
every other running sequence: one batched forward per generated token, each row at its own
position (per-row RoPE offset, per-row causal + sliding-window mask). Finished rows free their
slot at once, so waiting requests join mid-flight. Sampling, stop tokens and the calculator tool
follow engine.Engine; each sample has its own seeded generator.
"""

from __future__ import annotations

import logging
import queue
import threading
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from shared.nanochat.engine import KVCache, sample_next_token, use_calculator
from shared.nanochat.gpt import QK_SCALE, SOFTCAP, VE_GATE_CHANNELS, apply_rotary, norm

log = logging.getLogger("ncp.native")


@dataclass(frozen=True)
class SamplingParams:
    max_tokens: int
    temperature: float = 1.0
    top_k: int | None = None
    top_p: float | None = None
    seed: int | None = None
    n: int = 1

    def __post_init__(self) -> None:
        if self.max_tokens < 1:
            raise ValueError(f"max_tokens must be >= 1, got {self.max_tokens}")
        if self.temperature < 0:
            raise ValueError(f"temperature must be >= 0, got {self.temperature}")
        if self.top_k is not None and self.top_k < 0:
            raise ValueError(f"top_k must be >= 0, got {self.top_k}")
        if self.top_p is not None and not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.n < 1:
            raise ValueError(f"n must be >= 1, got {self.n}")


# Event callback: (choice index, token id or None, finish reason or None). Called on the
# scheduler thread; the server hops back to its event loop.
EventFn = Callable[[int, int | None, str | None], None]


@dataclass
class GenerationRequest:
    prompt: list[int]
    params: SamplingParams
    on_event: EventFn
    cancelled: threading.Event = field(default_factory=threading.Event)


@dataclass
class _Row:
    request: GenerationRequest
    index: int  # choice index within the request
    rng: torch.Generator
    length: int  # tokens in the cache
    next_token: int = -1  # last emitted token, fed at the next step
    generated: int = 0
    forced: deque = field(default_factory=deque)
    in_python: bool = False
    expr: list[int] = field(default_factory=list)


class Batcher:
    def __init__(self, model, tokenizer, *, max_batch: int = 16):
        if max_batch < 1:
            raise ValueError(f"max_batch must be >= 1, got {max_batch}")
        self.model, self.tok, self.max_batch = model, tokenizer, max_batch
        cfg = model.config
        self.max_len = cfg.sequence_len
        self.dtype = model.compute_dtype or model.transformer.wte.weight.dtype
        device = model.get_device()
        shape = (cfg.n_layer, max_batch, self.max_len, cfg.n_kv_head, cfg.head_dim)
        self.k = torch.zeros(shape, dtype=self.dtype, device=device)
        self.v = torch.zeros(shape, dtype=self.dtype, device=device)
        self.prev = torch.zeros(max_batch, cfg.n_embd, dtype=self.dtype, device=device)
        self.windows = cfg.window_sizes()
        self.stops = {tokenizer.encode_special("<|assistant_end|>"), tokenizer.encode_special("<|bos|>")}
        self.special = {n: tokenizer.encode_special(n) for n in
                        ("<|python_start|>", "<|python_end|>", "<|output_start|>", "<|output_end|>")}  # fmt: skip
        self.rows: dict[int, _Row] = {}
        self.free = list(range(max_batch))[::-1]
        self.waiting: queue.Queue[GenerationRequest] = queue.Queue()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="native-batcher", daemon=True)
        self.steps = 0  # decode steps run (observability/tests)
        self.max_rows_seen = 0

    # --- public ------------------------------------------------------------------------------
    def start(self) -> None:
        self._thread.start()

    def close(self) -> None:
        self._stop.set()
        self.waiting.put(None)  # type: ignore[arg-type]  # wakes the loop
        self._thread.join(timeout=30)

    def submit(self, request: GenerationRequest) -> None:
        if len(request.prompt) >= self.max_len:
            raise ValueError(
                f"prompt of {len(request.prompt)} tokens leaves no room in the context of {self.max_len}"
            )
        if request.params.n > self.max_batch:
            raise ValueError(f"n={request.params.n} exceeds the server's batch size {self.max_batch}")
        self.waiting.put(request)

    # --- scheduler -----------------------------------------------------------------------------
    def _loop(self) -> None:
        pending: deque[GenerationRequest] = deque()
        while not self._stop.is_set():
            try:
                block = not self.rows and not pending
                item = self.waiting.get(block=block, timeout=None if block else 0)
                if item is not None:
                    pending.append(item)
                while True:
                    item = self.waiting.get_nowait()
                    if item is not None:
                        pending.append(item)
            except queue.Empty:
                pass
            try:
                while pending and len(self.free) >= pending[0].params.n:
                    self._prefill(pending.popleft())
                self._drop_cancelled()
                if self.rows:
                    self._decode()
            except Exception as e:  # a bug must fail the requests, never hang them
                log.exception("batch step failed")
                for slot in list(self.rows):
                    self._finish(slot, "error")
                while pending:
                    pending.popleft().on_event(0, None, f"error: {e}")

    def _emit(self, slot: int, token: int) -> None:
        """Record a chosen token for a row; finish the row if it stops."""
        row = self.rows[slot]
        row.request.on_event(row.index, token, None)
        row.next_token = token
        row.generated += 1
        self._tool(row, token)
        if token in self.stops:
            self._finish(slot, "stop")
        elif row.generated >= row.request.params.max_tokens or row.length + 1 >= self.max_len:
            self._finish(slot, "length")

    def _tool(self, row: _Row, token: int) -> None:
        sp = self.special
        if token == sp["<|python_start|>"]:
            row.in_python, row.expr = True, []
        elif token == sp["<|python_end|>"] and row.in_python:
            row.in_python = False
            result = use_calculator(self.tok.decode(row.expr)) if row.expr else None
            if result is not None:
                row.forced.extend(
                    [sp["<|output_start|>"], *self.tok.encode(str(result)), sp["<|output_end|>"]]
                )
        elif row.in_python:
            row.expr.append(token)

    def _finish(self, slot: int, reason: str) -> None:
        row = self.rows.pop(slot)
        self.free.append(slot)
        row.request.on_event(row.index, None, reason)

    def _drop_cancelled(self) -> None:
        for slot in [s for s, r in self.rows.items() if r.request.cancelled.is_set()]:
            self._finish(slot, "cancelled")

    def _choose(self, row: _Row, logits: torch.Tensor) -> int:
        if row.forced:
            return row.forced.popleft()
        p = row.request.params
        return int(sample_next_token(logits[None], row.rng, p.temperature, p.top_k or None, p.top_p)[0, 0])

    @torch.inference_mode()
    def _prefill(self, req: GenerationRequest) -> None:
        if req.cancelled.is_set():
            req.on_event(0, None, "cancelled")
            return
        n_prompt = len(req.prompt)
        cache = KVCache.for_model(self.model, 1, n_prompt, dtype=self.dtype)
        ids = torch.tensor([req.prompt], dtype=torch.long, device=self.k.device)
        logits = self.model(ids, kv_cache=cache)[0, -1]
        assert cache.prev_embedding is not None  # set by every forward with a cache
        seed = req.params.seed
        for i in range(req.params.n):
            slot = self.free.pop()
            self.k[:, slot, :n_prompt] = cache.k[:, 0, :n_prompt]
            self.v[:, slot, :n_prompt] = cache.v[:, 0, :n_prompt]
            self.prev[slot] = cache.prev_embedding[0, -1]
            rng = torch.Generator(device=self.k.device)
            if seed is None:
                rng.seed()
            else:
                rng.manual_seed(seed + i)
            self.rows[slot] = _Row(req, i, rng, n_prompt)
            self._emit(slot, self._choose(self.rows[slot], logits))

    @torch.inference_mode()
    def _decode(self) -> None:
        slots = sorted(self.rows)
        self.steps += 1
        self.max_rows_seen = max(self.max_rows_seen, len(slots))
        device = self.k.device
        rows_t = torch.tensor(slots, dtype=torch.long, device=device)
        tokens = torch.tensor([self.rows[s].next_token for s in slots], dtype=torch.long, device=device)
        pos = torch.tensor([self.rows[s].length for s in slots], dtype=torch.long, device=device)
        logits = self.step_logits(rows_t, tokens, pos)
        for slot in slots:
            self.rows[slot].length += 1
        for j, slot in enumerate(slots):
            self._emit(slot, self._choose(self.rows[slot], logits[j]))

    def step_logits(self, rows: torch.Tensor, tokens: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
        """One token per row at per-row positions `pos`; writes K/V at `pos`. -> (b, vocab) fp32."""
        m, dtype = self.model, self.dtype
        cfg = m.config
        idx = tokens[:, None]  # (b, 1)
        x = norm(m.transformer.wte(idx).to(dtype))  # (b, 1, C) pre-smear embedding
        prev = self.prev[rows][:, None]
        self.prev[rows] = x[:, 0]
        x = m._smear(x, prev)
        cos = m.cos[0, pos].to(dtype)[:, None]  # (b, 1, 1, D/2)
        sin = m.sin[0, pos].to(dtype)[:, None]
        kv_len = int(pos.max()) + 1
        j = torch.arange(kv_len, device=pos.device)
        causal = j[None, :] <= pos[:, None]  # (b, kv_len)
        x0, x_mid = x, x
        for i, block in enumerate(m.transformer.h):
            x = m.resid_lambdas[i].to(dtype) * x + m.x0_lambdas[i].to(dtype) * x0
            ve = m.value_embeds[str(i)](idx).to(dtype) if str(i) in m.value_embeds else None
            mask = causal & (pos[:, None] - j[None, :] <= self.windows[i])
            x = x + self._attend(block.attn, i, norm(x), ve, cos, sin, rows, pos, kv_len, mask)
            x = x + block.mlp(norm(x))
            if i == cfg.backout_layer:
                x_mid = x
        x = norm(x - m.backout_lambda.to(dtype) * x_mid)
        logits = m.lm_head(x)[:, 0, : cfg.vocab_size].float()
        return SOFTCAP * torch.tanh(logits / SOFTCAP)

    def _attend(self, attn, layer, x, ve, cos, sin, rows, pos, kv_len, mask):
        b = x.shape[0]
        q = attn.c_q(x).view(b, 1, attn.n_head, attn.head_dim)
        k = attn.c_k(x).view(b, 1, attn.n_kv_head, attn.head_dim)
        v = attn.c_v(x).view(b, 1, attn.n_kv_head, attn.head_dim)
        if ve is not None:
            gate = 3 * torch.sigmoid(attn.ve_gate(x[..., :VE_GATE_CHANNELS]))
            v = v + gate.unsqueeze(-1) * ve.view(b, 1, attn.n_kv_head, attn.head_dim)
        q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
        q, k = norm(q) * QK_SCALE, norm(k) * QK_SCALE
        self.k[layer, rows, pos] = k[:, 0]
        self.v[layer, rows, pos] = v[:, 0]
        keys = self.k[layer, rows, :kv_len].transpose(1, 2)  # (b, Hkv, L, D)
        values = self.v[layer, rows, :kv_len].transpose(1, 2)
        y = F.scaled_dot_product_attention(
            q.transpose(1, 2), keys, values, attn_mask=mask[:, None, None, :],
            enable_gqa=attn.n_head != attn.n_kv_head,
        )  # fmt: skip
        return attn.c_proj(y.transpose(1, 2).reshape(b, 1, -1))
