"""Optimizer state written by N ranks -> the same state for M ranks.

MuonAdamW (ours and upstream's, same layout) shards its state ZeRO-2 style; what rank r of W
holds, per parameter group of the state_dict:
- AdamW tensor of shape (R, ...): `exp_avg`/`exp_avg_sq` of rows [r*R/W, (r+1)*R/W) when W > 1,
  numel >= 1024 and W divides R; otherwise the whole tensor on every rank. `step` is a count.
- Muon group of K same-shape (m, n) matrices: state on the group's first parameter only,
  `momentum_buffer` (C, m, n) and `second_momentum_buffer` (C, m, 1) or (C, 1, n) for the
  matrices [r*C, r*C + C) with C = ceil(K / W) (C = K when W = 1); slots past K are zero padding.
Resharding rebuilds each full tensor from the N shards and cuts it again for M. The state_dict
keys are positions in the group order of `build_param_groups` (upstream's order), which is how
the shapes of every position are known.
"""

from __future__ import annotations

import math
from typing import Any

import torch

from shared.nanochat.optim import SMALL_PARAM_NUMEL

ADAMW_KEYS = ("exp_avg", "exp_avg_sq")
MUON_KEYS = ("momentum_buffer", "second_momentum_buffer")


class ReshardError(ValueError):
    """Optimizer shards that do not fit the model's parameter groups or each other."""


def group_layout(config) -> list[tuple[str, list[tuple[int, ...]]]]:
    """(kind, parameter shapes) of every optimizer group of GPT(config), in state_dict order."""
    from shared.nanochat.gpt import GPT
    from shared.nanochat.optim import OptimizerConfig, build_param_groups

    with torch.device("meta"):
        model = GPT(config)
    return [
        (g["kind"], [tuple(p.shape) for p in g["params"]])
        for g in build_param_groups(model, OptimizerConfig())
    ]


def adamw_sharded(shape: tuple[int, ...], world: int) -> bool:
    """Whether MuonAdamW on `world` ranks keeps a row shard (not the whole tensor) of this param."""
    return world > 1 and math.prod(shape) >= SMALL_PARAM_NUMEL and shape[0] % world == 0


def muon_chunk(k: int, world: int) -> int:
    return k if world == 1 else math.ceil(k / world)


def _check_groups(shards: list[dict], layout) -> list[list[int]]:
    """Each group's state_dict positions (from rank 0), after checking every shard agrees."""
    positions = []
    for r, shard in enumerate(shards):
        if not isinstance(shard, dict) or "state" not in shard or "param_groups" not in shard:
            raise ReshardError(f"shard of rank {r} is not an optimizer state_dict")
        groups = shard["param_groups"]
        if len(groups) != len(layout):
            raise ReshardError(
                f"shard of rank {r} has {len(groups)} parameter groups, the model's optimizer has {len(layout)}"
            )
        for g, (group, (kind, shapes)) in enumerate(zip(groups, layout, strict=True)):
            if len(group["params"]) != len(shapes) or group.get("kind", kind) != kind:
                raise ReshardError(
                    f"shard of rank {r}, group {g}: {group.get('kind')} with {len(group['params'])} "
                    f"params, the model's is {kind} with {len(shapes)}"
                )
            if r == 0:
                positions.append(list(group["params"]))
            elif list(group["params"]) != positions[g]:
                raise ReshardError(f"shards of rank 0 and {r} number group {g}'s params differently")
    return positions


def _gather(pieces: list[torch.Tensor], want: tuple[int, ...], what: str) -> torch.Tensor:
    for t in pieces:
        if tuple(t.shape) != tuple(pieces[0].shape):
            raise ReshardError(f"{what}: ranks hold differently shaped pieces")
    full = torch.cat(pieces, dim=0) if len(pieces) > 1 else pieces[0]
    if tuple(full.shape) != want:
        raise ReshardError(f"{what}: the shards join to {tuple(full.shape)}, expected {want}")
    return full


def reshard_optimizer_states(shards: list[dict], layout, world_size: int) -> list[dict]:
    """The `world_size` per-rank state_dicts equivalent to `shards` (one per writing rank)."""
    if not shards:
        raise ReshardError("no optimizer shards to reshard")
    if world_size < 1:
        raise ValueError(f"world_size must be >= 1, got {world_size}")
    n, m = len(shards), world_size
    positions = _check_groups(shards, layout)
    out: list[dict[str, Any]] = [{"state": {}, "param_groups": shards[0]["param_groups"]} for _ in range(m)]
    for (kind, shapes), pos in zip(layout, positions, strict=True):
        if kind == "adamw":
            for shape, i in zip(shapes, pos, strict=True):
                states = [s["state"].get(i) for s in shards]
                if all(st is None for st in states):
                    continue  # never stepped
                if any(st is None for st in states):
                    raise ReshardError(f"param {i}: some ranks have optimizer state, others not")
                was = adamw_sharded(shape, n)
                full = {
                    k: _gather([st[k] for st in states] if was else [states[0][k]], shape, f"param {i} {k}")
                    for k in ADAMW_KEYS
                }
                rows = shape[0] // m
                for r in range(m):
                    piece = {
                        k: v[r * rows : (r + 1) * rows] if adamw_sharded(shape, m) else v
                        for k, v in full.items()
                    }
                    out[r]["state"][i] = {
                        "step": states[0]["step"],
                        **{k: v.clone() for k, v in piece.items()},
                    }
            continue
        # muon: the whole group's state lives on its first parameter
        i, k_params = pos[0], len(shapes)
        states = [s["state"].get(i) for s in shards]
        if all(st is None for st in states):
            continue
        if any(st is None for st in states):
            raise ReshardError(f"muon group at param {i}: some ranks have state, others not")
        c_old, c_new = muon_chunk(k_params, n), muon_chunk(k_params, m)
        for key in MUON_KEYS:
            pieces = [st[key] for st in states]
            tail = tuple(pieces[0].shape[1:])
            joined = _gather(pieces, (c_old * n, *tail), f"muon group at param {i} {key}")[:k_params]
            padded = torch.zeros((c_new * m, *tail), dtype=joined.dtype)
            padded[:k_params] = joined
            for r in range(m):
                out[r]["state"].setdefault(i, {})[key] = padded[r * c_new : (r + 1) * c_new].clone()
        for r in range(m):  # any other per-group entries (none today) are replicated
            for key, v in states[0].items():
                out[r]["state"][i].setdefault(key, v)
    return out
