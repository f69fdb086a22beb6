"""Bits per byte: a loss that does not depend on the tokenizer's vocabulary.

bpb = sum of target-token nats / (ln 2 * sum of the targets' UTF-8 byte lengths). Special tokens
have byte length 0 in `token_bytes` and are excluded from both sums, as are ignored targets (< 0).
Under a process group the two sums are all-reduced, so every rank returns the global value.
"""

from __future__ import annotations

import math
from collections.abc import Iterable

import torch
import torch.distributed as dist
from torch import Tensor


@torch.no_grad()
def evaluate_bpb(
    model, batches: Iterable[tuple[Tensor, Tensor]] | Iterable[tuple], steps: int, token_bytes: Tensor
) -> float:
    """Evaluate `steps` batches of (inputs (B, T), targets (B, T)) (extra tuple items, e.g. a
    loader state, are ignored). Returns inf when no target byte was seen."""
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    device = next(model.parameters()).device
    token_bytes = token_bytes.to(device)
    total_nats = torch.zeros((), dtype=torch.float64, device=device)
    total_bytes = torch.zeros((), dtype=torch.int64, device=device)
    it = iter(batches)
    for _ in range(steps):
        try:
            batch = next(it)
        except StopIteration:
            break  # a finite validation split may hold fewer batches than asked for
        x, y = batch[0].to(device), batch[1].to(device)
        nats = model(x, y, loss_reduction="none").view(-1).double()  # (B*T,)
        y = y.reshape(-1)
        valid = y >= 0
        nbytes = torch.where(valid, token_bytes[y.clamp_min(0)], torch.zeros_like(y, dtype=token_bytes.dtype))
        total_nats += (nats * (nbytes > 0)).sum()
        total_bytes += nbytes.sum().to(torch.int64)
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(total_nats)
        dist.all_reduce(total_bytes)
    if total_bytes.item() == 0:
        return float("inf")
    return total_nats.item() / (math.log(2) * total_bytes.item())
