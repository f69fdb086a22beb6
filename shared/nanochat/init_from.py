"""Starting a training run from another run's checkpoint (a registered model, issue #13).

The run takes the checkpoint's weights and, with `resume_optimizer="saved"`, its optimizer state:
each rank's shard as saved when the run has as many ranks as the checkpoint's writer, else the
shards rebuilt and cut again for this run's ranks (optim_reshard.py). A checkpoint without
optimizer state and "saved" is refused before anything is built, saying to use "fresh".

`plan_init` decides what will happen from the checkpoint's files alone (no weights read); the
worker calls it before launching the trainer (to refuse early and to say in the job's events what
will be loaded) and the trainer calls it again and follows it, so both say the same thing.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from shared.nanochat.checkpoint import (
    CheckpointError,
    checkpoint_meta,
    latest_step,
    load_optimizer_shard,
    saved_world_size,
)


class InitError(ValueError):
    """The init checkpoint cannot start this run as asked; the message says what to change."""


@dataclass(frozen=True)
class InitPlan:
    checkpoint_dir: Path
    step: int
    optimizer: str  # "saved" | "fresh"
    saved_world: int  # ranks that wrote the checkpoint's optimizer state; 0 = none saved
    world: int  # ranks of this run

    @property
    def resharded(self) -> bool:
        return self.optimizer == "saved" and self.saved_world != self.world

    def describe(self) -> str:
        if self.optimizer == "fresh":
            return "weights only, fresh optimizer"
        if self.resharded:
            return f"weights + optimizer state resharded {self.saved_world} -> {self.world} ranks"
        return f"weights + optimizer state ({self.world} rank{'s' if self.world > 1 else ''}, as saved)"

    def to_dict(self) -> dict[str, Any]:
        return {
            "checkpoint_dir": str(self.checkpoint_dir),
            "step": self.step,
            "optimizer": self.optimizer,
            "saved_world_size": self.saved_world,
            "world_size": self.world,
            "resharded": self.resharded,
            "loaded": self.describe(),
        }


def plan_init(checkpoint_dir, step: int | None, optimizer: str, world: int) -> InitPlan:
    """What starting from checkpoint `step` (None = newest complete) of `checkpoint_dir` on `world`
    ranks loads; raises InitError (or CheckpointError) when it cannot, before any weights are read."""
    if optimizer not in ("saved", "fresh"):
        raise InitError(f"resume_optimizer: {optimizer!r} is not 'saved' or 'fresh'")
    d = Path(checkpoint_dir)
    if step is None:
        step = latest_step(d) if d.is_dir() else None
        if step is None:
            raise InitError(f"init_checkpoint_dir: no complete checkpoint in {d}")
    checkpoint_meta(d, step)  # complete, every listed file present with its size
    saved = saved_world_size(d, step)
    if optimizer == "saved" and saved == 0:
        raise InitError(
            f"{d} step {step} has no optimizer state to continue with: use resume.optimizer=fresh "
            "(resume_optimizer='fresh': its weights with a new optimizer)"
        )
    return InitPlan(d, step, optimizer, saved, world)


def _to_device(obj: Any, device: torch.device) -> Any:
    if isinstance(obj, torch.Tensor):
        return obj.to(device)
    if isinstance(obj, dict):
        return {k: _to_device(v, device) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_to_device(v, device) for v in obj]
    return obj


def init_optimizer_state(plan: InitPlan, model_config, rank: int, device) -> dict:
    """This rank's optimizer state_dict for a "saved" plan: its own shard when the rank counts
    agree, else every shard read (on the CPU) and resharded for `plan.world` ranks."""
    from shared.nanochat.optim_reshard import group_layout, reshard_optimizer_states

    if plan.optimizer != "saved":
        raise InitError("init_optimizer_state: the plan loads no optimizer state (fresh)")
    if not plan.resharded:
        return load_optimizer_shard(plan.checkpoint_dir, plan.step, rank, device)
    shards = [load_optimizer_shard(plan.checkpoint_dir, plan.step, r, "cpu") for r in range(plan.saved_world)]
    try:
        mine = reshard_optimizer_states(shards, group_layout(model_config), plan.world)[rank]
    except ValueError as e:
        raise CheckpointError(
            f"{plan.checkpoint_dir} step {plan.step}: cannot reshard its optimizer state: {e}"
        ) from None
    return _to_device(mine, torch.device(device))
