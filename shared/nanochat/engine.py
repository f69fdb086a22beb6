"""Inference: a KV cache, token sampling, and batched generation with the calculator tool.

Generation prefills the prompt once (batch 1), copies that cache into one row per sample, then
decodes all rows together. The model may call a calculator: the tokens it writes between
<|python_start|> and <|python_end|> are decoded and evaluated by a small arithmetic evaluator (an
AST walk: no `eval`), and the result is forced into the stream as
<|output_start|>result<|output_end|> with mask 0 (forced, not sampled).
"""

from __future__ import annotations

import ast
import operator
from collections import deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import torch

# --- KV cache ----------------------------------------------------------------------------------


class KVCache:
    """Per-layer keys/values (B, max_len, Hkv, D), the write position, and the previous position's
    normalized pre-smear embedding (smear mixes it into the next token)."""

    def __init__(
        self,
        batch_size: int,
        num_layers: int,
        max_len: int,
        n_kv_head: int,
        head_dim: int,
        device: torch.device | str = "cpu",
        dtype: torch.dtype = torch.float32,
    ) -> None:
        if batch_size <= 0 or max_len <= 0:
            raise ValueError(f"KVCache needs batch_size > 0 and max_len > 0, got {batch_size}, {max_len}")
        shape = (num_layers, batch_size, max_len, n_kv_head, head_dim)
        self.k = torch.zeros(shape, device=device, dtype=dtype)
        self.v = torch.zeros(shape, device=device, dtype=dtype)
        self.pos = 0
        self.prev_embedding: torch.Tensor | None = None

    @classmethod
    def for_model(cls, model, batch_size: int, max_len: int, dtype: torch.dtype | None = None) -> KVCache:
        cfg = model.config
        dtype = dtype or model.compute_dtype or model.transformer.wte.weight.dtype
        return cls(batch_size, cfg.n_layer, max_len, cfg.n_kv_head, cfg.head_dim, model.get_device(), dtype)

    @property
    def batch_size(self) -> int:
        return self.k.shape[1]

    @property
    def max_len(self) -> int:
        return self.k.shape[2]

    def layer(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.k[i], self.v[i]

    def advance(self, n: int) -> None:
        self.pos += n

    def reset(self) -> None:
        self.pos = 0
        self.prev_embedding = None

    def expand(self, batch_size: int, max_len: int | None = None) -> KVCache:
        """A new cache with this batch-1 cache's contents copied into `batch_size` rows."""
        if self.batch_size != 1:
            raise ValueError(f"KVCache.expand needs a batch-1 cache, this one has {self.batch_size} rows")
        max_len = max_len or self.max_len
        if max_len < self.pos:
            raise ValueError(f"KVCache.expand: max_len {max_len} < cached length {self.pos}")
        n_layer, _, _, hkv, d = self.k.shape
        out = KVCache(batch_size, n_layer, max_len, hkv, d, self.k.device, self.k.dtype)
        out.k[:, :, : self.pos] = self.k[:, :, : self.pos]
        out.v[:, :, : self.pos] = self.v[:, :, : self.pos]
        out.pos = self.pos
        if self.prev_embedding is not None:
            out.prev_embedding = self.prev_embedding.expand(batch_size, -1, -1).clone()
        return out


# --- sampling ----------------------------------------------------------------------------------


def sample_next_token(
    logits: torch.Tensor,
    generator: torch.Generator | None,
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float | None = None,
) -> torch.Tensor:
    """logits (B, V) -> token ids (B, 1). temperature 0 = greedy."""
    if temperature < 0:
        raise ValueError(f"temperature must be >= 0, got {temperature}")
    if top_p is not None and not 0.0 < top_p <= 1.0:
        raise ValueError(f"top_p must be in (0, 1], got {top_p}")
    if temperature == 0.0:
        return torch.argmax(logits, dim=-1, keepdim=True)
    logits = logits.float() / temperature
    if top_k is not None and 0 < top_k < logits.size(-1):
        kth = torch.topk(logits, top_k, dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p is not None and top_p < 1.0:
        sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
        cum = torch.softmax(sorted_logits, dim=-1).cumsum(dim=-1)
        # Drop a token when the mass before it already reaches top_p (the top token always stays).
        drop_sorted = (cum - torch.softmax(sorted_logits, dim=-1)) >= top_p
        drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)
        logits = logits.masked_fill(drop, float("-inf"))
    probs = torch.softmax(logits, dim=-1)
    return torch.multinomial(probs, num_samples=1, generator=generator)


# --- calculator tool -----------------------------------------------------------------------------

_BIN_OPS: dict[type, Callable[[Any, Any], Any]] = {
    ast.Add: operator.add,
    ast.Sub: operator.sub,
    ast.Mult: operator.mul,
    ast.Div: operator.truediv,
    ast.FloorDiv: operator.floordiv,
    ast.Mod: operator.mod,
}
_UNARY_OPS: dict[type, Callable[[Any], Any]] = {ast.UAdd: operator.pos, ast.USub: operator.neg}
_MAX_ABS = 1e18  # keeps a chain of multiplications from building a huge integer
_MAX_EXPR_CHARS = 200


def _eval_node(node: ast.AST):
    if isinstance(node, ast.Expression):
        return _eval_node(node.body)
    if isinstance(node, ast.Constant) and type(node.value) in (int, float, str):
        return node.value
    if isinstance(node, ast.BinOp) and type(node.op) in _BIN_OPS:
        left, right = _eval_node(node.left), _eval_node(node.right)
        if not all(isinstance(x, (int, float)) for x in (left, right)):
            raise ValueError("arithmetic on non-numbers")
        result = _BIN_OPS[type(node.op)](left, right)
        if abs(result) > _MAX_ABS:
            raise ValueError("result too large")
        return result
    if isinstance(node, ast.UnaryOp) and type(node.op) in _UNARY_OPS:
        operand = _eval_node(node.operand)
        if not isinstance(operand, (int, float)):
            raise ValueError("sign of a non-number")
        return _UNARY_OPS[type(node.op)](operand)
    if (
        # "strawberry".count("r"): the one string operation the SFT data teaches.
        isinstance(node, ast.Call)
        and isinstance(node.func, ast.Attribute)
        and node.func.attr == "count"
        and not node.keywords
        and len(node.args) == 1
    ):
        target, arg = _eval_node(node.func.value), _eval_node(node.args[0])
        if isinstance(target, str) and isinstance(arg, str):
            return target.count(arg)
    raise ValueError(f"unsupported expression element {type(node).__name__}")


def use_calculator(expr: str) -> int | float | None:
    """Evaluate `+ - * / // %`, parentheses, numbers (commas as thousands separators allowed) and
    `"str".count("s")`. Anything else, or any error, gives None (the tool stays silent)."""
    if len(expr) > _MAX_EXPR_CHARS:
        return None
    if '"' not in expr and "'" not in expr:
        expr = expr.replace(",", "")
    try:
        result = _eval_node(ast.parse(expr.strip(), mode="eval"))
    except (SyntaxError, ValueError, ZeroDivisionError, OverflowError, TypeError, RecursionError):
        return None
    return result if isinstance(result, (int, float)) and not isinstance(result, bool) else None


# --- generation --------------------------------------------------------------------------------


@dataclass
class _Row:
    forced: deque = field(default_factory=deque)  # tool output waiting to be forced in
    in_python: bool = False
    expr_tokens: list[int] = field(default_factory=list)
    done: bool = False


class Engine:
    def __init__(self, model, tokenizer=None) -> None:
        """`tokenizer` (encode/decode/encode_special) enables the calculator tool and the default
        stop tokens; without one, generation works on raw ids and stops only on `stop_token_ids`."""
        self.model = model
        self.tokenizer = tokenizer

    def _special(self, name: str) -> int | None:
        return None if self.tokenizer is None else self.tokenizer.encode_special(name)

    @torch.inference_mode()
    def generate(
        self,
        tokens: list[int],
        num_samples: int = 1,
        max_tokens: int | None = None,
        temperature: float = 1.0,
        top_k: int | None = None,
        top_p: float | None = None,
        seed: int = 42,
        stop_token_ids=(),
    ) -> Iterator[tuple[list[int], list[int]]]:
        """Yield (token_column, mask_column) per step, one entry per sample (mask 1 = sampled,
        0 = forced tool output). Stops when every row hit a stop token, after `max_tokens` steps,
        or when the context (`sequence_len`, or prompt + max_tokens) is full."""
        if not tokens or not all(isinstance(t, int) for t in tokens):
            raise ValueError("tokens must be a non-empty list of ints")
        if num_samples <= 0:
            raise ValueError(f"num_samples must be positive, got {num_samples}")
        model = self.model
        device = model.get_device()
        max_len = len(tokens) + max_tokens if max_tokens is not None else model.config.sequence_len
        if max_len <= len(tokens):
            if max_tokens is None:
                raise ValueError(f"prompt of {len(tokens)} tokens fills the model's context ({max_len})")
            return
        python_start, python_end = self._special("<|python_start|>"), self._special("<|python_end|>")
        output_start, output_end = self._special("<|output_start|>"), self._special("<|output_end|>")
        stops = {t for t in (self._special("<|assistant_end|>"), self._special("<|bos|>")) if t is not None}
        stops |= set(stop_token_ids)
        rng = torch.Generator(device=device)
        rng.manual_seed(seed)

        prefill = KVCache.for_model(model, 1, len(tokens))
        ids = torch.tensor([tokens], dtype=torch.long, device=device)
        logits = model(ids, kv_cache=prefill)[:, -1, :].expand(num_samples, -1)
        cache = prefill.expand(num_samples, max_len)
        del prefill
        rows = [_Row() for _ in range(num_samples)]

        while cache.pos < max_len and not all(r.done for r in rows):
            sampled = sample_next_token(logits, rng, temperature, top_k, top_p)[:, 0].tolist()
            column, masks = [], []
            for row, token in zip(rows, sampled, strict=True):
                if row.forced:
                    token = row.forced.popleft()
                    masks.append(0)
                else:
                    masks.append(1)
                column.append(token)
                if token in stops:
                    row.done = True
                if token == python_start:
                    row.in_python, row.expr_tokens = True, []
                elif token == python_end and row.in_python:
                    row.in_python = False
                    result = (
                        use_calculator(self.tokenizer.decode(row.expr_tokens)) if row.expr_tokens else None
                    )
                    if result is not None:
                        row.forced.extend([output_start, *self.tokenizer.encode(str(result)), output_end])
                    row.expr_tokens = []
                elif row.in_python:
                    row.expr_tokens.append(token)
            yield column, masks
            if cache.pos + 1 >= max_len or all(r.done for r in rows):
                # The last yielded token needs no forward pass: nothing will be sampled after it.
                return
            ids = torch.tensor(column, dtype=torch.long, device=device).unsqueeze(1)
            logits = model(ids, kv_cache=cache)[:, -1, :]

    def generate_batch(
        self, tokens: list[int], num_samples: int = 1, **kw
    ) -> tuple[list[list[int]], list[list[int]]]:
        """Run `generate` to the end: (sequences, masks), each prompt + generated tokens; the stop
        token that ended a row is not included. Prompt positions have mask 0."""
        stops = {t for t in (self._special("<|assistant_end|>"), self._special("<|bos|>")) if t is not None}
        stops |= set(kw.get("stop_token_ids", ()))
        seqs = [list(tokens) for _ in range(num_samples)]
        masks = [[0] * len(tokens) for _ in range(num_samples)]
        done = [False] * num_samples
        for column, mask_column in self.generate(tokens, num_samples, **kw):
            for i, (tok, m) in enumerate(zip(column, mask_column, strict=True)):
                if done[i]:
                    continue
                if tok in stops:
                    done[i] = True
                else:
                    seqs[i].append(tok)
                    masks[i].append(m)
            if all(done):
                break
        return seqs, masks
