"""train() on 2 gloo ranks: sharded optimizer, per-rank loader state, and exact resume."""

from __future__ import annotations

import json
import os
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from shared.nanochat.checkpoint import load_checkpoint

WORLD = 2


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _rank_main(rank: int, port: int, cfg, stop_after: int | None, out: str) -> None:
    os.environ.update(
        RANK=str(rank),
        LOCAL_RANK=str(rank),
        WORLD_SIZE=str(WORLD),
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
    )
    torch.set_num_threads(1)
    from shared.nanochat.device import cleanup_distributed
    from shared.nanochat.train import TrainHooks, train

    polls = {"n": 0}

    def should_stop() -> bool:
        polls["n"] += 1
        return stop_after is not None and polls["n"] > stop_after

    try:
        result = train(cfg, TrainHooks(should_stop=should_stop))
        with open(f"{out}.rank{rank}", "w") as f:
            json.dump({"losses": result.losses, "step": result.step, "stopped": result.stopped}, f)
        dist.barrier()
    finally:
        cleanup_distributed()


def _run(cfg, tmp_path, name: str, stop_after: int | None = None) -> list[dict]:
    out = str(tmp_path / name)
    mp.spawn(_rank_main, args=(_free_port(), cfg, stop_after, out), nprocs=WORLD, join=True)
    return [json.loads(open(f"{out}.rank{r}").read()) for r in range(WORLD)]


@pytest.mark.slow
def test_two_rank_training_resumes_exactly(tiny_config, tmp_path):
    full_cfg = tiny_config(num_iterations=5, checkpoint_dir=str(tmp_path / "full"))
    full = _run(full_cfg, tmp_path, "full")
    assert full[0]["losses"] == full[1]["losses"]  # the logged loss is the mean over ranks

    cfg = tiny_config(num_iterations=5, checkpoint_dir=str(tmp_path / "split"))
    first = _run(cfg, tmp_path, "first", stop_after=2)
    assert first[0]["stopped"] and first[0]["step"] == 2
    _, shard1, meta = load_checkpoint(cfg.checkpoint_dir, 2, load_optimizer=True, rank=1)
    assert meta["world_size"] == 2
    assert [s["rank"] for s in meta["dataloader_states"]] == [0, 1]
    second = _run(cfg, tmp_path, "second")
    assert first[0]["losses"] + second[0]["losses"] == full[0]["losses"]

    a, _, _ = load_checkpoint(tmp_path / "full", 5)
    b, _, _ = load_checkpoint(tmp_path / "split", 5)
    for k in a:
        assert torch.equal(a[k], b[k]), k
