"""Upstream nanochat artifacts, built the way upstream builds them, so CI needs no download.

- `upstream_encoding`: RustBPETokenizer.train_from_iterator (rustbpe ranks -> tiktoken Encoding
  with the 9 specials after the ranks); `write_upstream_tokenizer` pickles it as
  `tokenizer/tokenizer.pkl` and writes `token_bytes.pt` as tok_train.py does.
- `write_upstream_checkpoint`: checkpoint_manager.save_checkpoint's files (model, meta without
  our "files"/"format" keys, one optim shard per rank) and base_train.py's meta keys.
- `run_optimizer`: MuonAdamW on 1..N real ranks (gloo processes) to get genuine sharded state.
"""

from __future__ import annotations

import copy
import json
import os
import pickle
import socket
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from shared.nanochat.config import GPTConfig
from shared.nanochat.tokenizer import SPECIAL_TOKENS, SPLIT_PATTERN

TINY = GPTConfig(
    sequence_len=32, vocab_size=300, n_layer=2, n_head=2, n_kv_head=2, n_embd=64, window_pattern="L"
)


def upstream_encoding(texts, vocab_size: int):
    import rustbpe
    import tiktoken

    trainer = rustbpe.Tokenizer()
    trainer.train_from_iterator(iter(texts), vocab_size - len(SPECIAL_TOKENS), pattern=SPLIT_PATTERN)
    ranks = {bytes(k): v for k, v in trainer.get_mergeable_ranks()}
    specials = {name: len(ranks) + i for i, name in enumerate(SPECIAL_TOKENS)}
    return tiktoken.Encoding(
        name="rustbpe", pat_str=trainer.get_pattern(), mergeable_ranks=ranks, special_tokens=specials
    )


def write_upstream_tokenizer(tok_dir: Path, enc) -> None:
    tok_dir.mkdir(parents=True, exist_ok=True)
    with open(tok_dir / "tokenizer.pkl", "wb") as f:
        pickle.dump(enc, f)
    specials = set(enc.special_tokens_set)
    special_ids = {enc.encode_single_token(s) for s in specials}
    lengths = [0 if i in special_ids else len(enc.decode_single_token_bytes(i)) for i in range(enc.n_vocab)]
    torch.save(torch.tensor(lengths, dtype=torch.int32), tok_dir / "token_bytes.pt")


def write_upstream_checkpoint(
    ckpt_dir: Path, step: int, model_state: dict, config: GPTConfig, optim_shards: list[dict] | None = None
) -> None:
    ckpt_dir.mkdir(parents=True, exist_ok=True)
    torch.save(model_state, ckpt_dir / f"model_{step:06d}.pt")
    meta = {
        "step": step,
        "val_bpb": 1.25,
        "model_config": config.to_dict(),
        "user_config": {"depth": config.n_layer},
        "device_batch_size": 4,
        "max_seq_len": config.sequence_len,
        "total_batch_size": 512,
        "dataloader_state_dict": {"pq_idx": 0, "rg_idx": 1, "epoch": 1},
        "loop_state": {"min_val_bpb": 1.25, "smooth_train_loss": 3.5, "total_training_time": 12.0},
    }
    (ckpt_dir / f"meta_{step:06d}.json").write_text(json.dumps(meta, indent=2))
    for rank, shard in enumerate(optim_shards or []):
        torch.save(shard, ckpt_dir / f"optim_{step:06d}_rank{rank:d}.pt")


def write_upstream_base_dir(root: Path, texts: list[str]) -> Path:
    """A small nanochat base dir at `root`: the tokenizer (pickle + token bytes) trained on `texts`
    and a TINY base checkpoint d2 at step 3 (no optimizer shards: the platform tests need the
    layout, tests/data/test_nanochat_import.py covers sharded optimizer state)."""
    write_upstream_tokenizer(root / "tokenizer", upstream_encoding(texts, vocab_size=TINY.vocab_size))
    write_upstream_checkpoint(root / "base_checkpoints" / "d2", 3, tiny_state(), TINY)
    return root


def tiny_state(config: GPTConfig = TINY, seed: int = 0) -> dict:
    from shared.nanochat.gpt import GPT

    torch.manual_seed(seed)
    model = GPT(config)
    model.init_weights()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.02)
    return {k: v.clone() for k, v in model.state_dict().items()}


# ------------------------------------------------------------------ optimizer on real ranks


def _grad(step: int, rank: int, shape, idx: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(100_000 * step + 1000 * rank + idx)
    return torch.randn(shape, generator=gen) * 0.1


def _run_rank(rank: int, world: int, port: int, config: GPTConfig, job: dict, out: str) -> None:
    from shared.nanochat.gpt import GPT
    from shared.nanochat.optim import MuonAdamW, OptimizerConfig, build_param_groups

    torch.set_num_threads(1)
    if world > 1:
        os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
        dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        model = GPT(config)
        model.init_weights()
        model.load_state_dict(job["model_state"])
        opt = MuonAdamW(build_param_groups(model, OptimizerConfig()))
        if job.get("optim_shards"):
            # a copy: load_state_dict keeps the given tensors, which mp.spawn shares with the
            # caller (and the single-rank run is the caller): stepping would change its shards
            opt.load_state_dict(copy.deepcopy(job["optim_shards"][rank]))
        params = list(model.parameters())
        for step, per_rank in job["steps"]:
            for i, p in enumerate(params):  # per_rank: each rank its own gradient, as in training
                p.grad = _grad(step, rank if per_rank else 0, p.shape, i)
            opt.step()
        torch.save(opt.state_dict(), f"{out}.optim{rank}")
        if rank == 0:
            torch.save({k: v.clone() for k, v in model.state_dict().items()}, f"{out}.model")
        if world > 1:
            dist.barrier()
    finally:
        if world > 1:
            dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_optimizer(
    world: int,
    model_state: dict,
    steps: list[tuple[int, bool]],
    out: Path,
    *,
    optim_shards: list[dict] | None = None,
    config: GPTConfig = TINY,
) -> tuple[dict, list[dict]]:
    """MuonAdamW over `world` ranks from `model_state` (+ per-rank `optim_shards`) for `steps`
    ((step, per_rank_gradients) pairs); returns (model state, one optimizer state_dict per rank)."""
    job = {"model_state": model_state, "optim_shards": optim_shards, "steps": steps}
    if world == 1:
        _run_rank(0, 1, 0, config, job, str(out))
    else:
        mp.spawn(_run_rank, args=(world, _free_port(), config, job, str(out)), nprocs=world, join=True)
    shards = [torch.load(f"{out}.optim{r}", weights_only=True) for r in range(world)]
    return torch.load(f"{out}.model", weights_only=True), shards
