"""Supervised fine-tuning: a base checkpoint -> a chat checkpoint (chatsft_checkpoints/<tag>).

`sft(cfg, hooks)` loads the base model *and its optimizer momenta* (MuonAdamW state; the fresh
SFT learning rates replace the saved ones, which pretraining's warmdown left near zero), trains on
best-fit packed conversations where only assistant tokens are targets, and saves checkpoints in
the reference layout. Schedule as in the reference chat_sft: LR = init_lr_frac x the base LRs,
flat, then a linear warmdown to `final_lr_frac` over the last `warmdown_ratio` of training;
Muon momentum 0.85 -> 0.95 over the first 300 steps; Muon weight decay 0.
Hooks and result are the pretraining ones (train.TrainHooks / TrainResult).
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict
from pathlib import Path

import torch
import torch.distributed as dist

from shared.nanochat.checkpoint import (
    META_FILE,
    OPTIM_FILE,
    check_state_matches,
    latest_step,
    load_checkpoint,
    model_config_from_meta,
    save_checkpoint,
)
from shared.nanochat.device import DistInfo, choose_dtype, detect_device, init_distributed
from shared.nanochat.fp8 import FP8_ALIGN, enable_fp8
from shared.nanochat.gpt import GPT
from shared.nanochat.kernel_report import graph_break_count, kernel_report
from shared.nanochat.optim import MuonAdamW, OptimizerConfig, build_param_groups, load_saved_state
from shared.nanochat.sft_config import SFTConfig
from shared.nanochat.sft_data import PackerState, build_mixture, packed_batches
from shared.nanochat.sizing import mfu
from shared.nanochat.tokenizer import Tokenizer
from shared.nanochat.train import TrainHooks, TrainResult


def lr_multiplier(progress: float, warmdown_ratio: float, final_lr_frac: float) -> float:
    """Flat, then linear to `final_lr_frac` over the last `warmdown_ratio` of progress (0..1)."""
    if warmdown_ratio == 0 or progress <= 1.0 - warmdown_ratio:
        return 1.0
    decay = min(1.0, (progress - (1.0 - warmdown_ratio)) / warmdown_ratio)
    return (1 - decay) + decay * final_lr_frac


def masked_loss(model, inputs: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, int]:
    """(mean cross-entropy over the targets that are not -1, their count). A batch with no
    targets gives (0, 0): a plain mean over zero targets would be 0/0 = NaN."""
    n = int((targets >= 0).sum())
    if n == 0:
        return torch.zeros((), device=inputs.device), 0
    return model(inputs, targets, loss_reduction="sum") / n, n


def muon_momentum(step: int) -> float:
    frac = min(step / 300, 1.0)
    return (1 - frac) * 0.85 + frac * 0.95


def _optimizer(model: GPT, cfg: SFTConfig, base_meta: dict, device: torch.device) -> MuonAdamW:
    # the base run's peak LRs (unscaled by batch size, as the reference SFT inherits them)
    base_user = base_meta.get("user_config") or base_meta.get("train_config") or {}
    defaults = OptimizerConfig()
    lrs = {
        name: getattr(cfg, name) or base_user.get(name) or getattr(defaults, name)
        for name in ("embedding_lr", "unembedding_lr", "matrix_lr", "scalar_lr")
    }
    groups = build_param_groups(model, OptimizerConfig(**lrs, weight_decay=cfg.weight_decay), lr_scale=1.0)
    for g in groups:
        g["lr"] *= cfg.init_lr_frac
        g["initial_lr"] = g["lr"]
    gpu = device.type == "cuda"
    # Compiled update kernels exactly when the forward is compiled, as in pretraining.
    return MuonAdamW(
        groups,
        ortho_dtype=torch.bfloat16 if gpu else torch.float32,
        compile_kernels=gpu if cfg.compile is None else cfg.compile,
    )


@torch.no_grad()
def _val_bpb(
    model, tokenizer, conversations, cfg: SFTConfig, seq_len: int, token_bytes, dinfo: DistInfo
) -> float | None:
    from shared.nanochat.eval.bpb import evaluate_bpb

    if len(conversations) < dinfo.world_size:
        return None
    batches = packed_batches(
        tokenizer, conversations, cfg.device_batch_size, seq_len, rank=dinfo.rank, world_size=dinfo.world_size
    )
    model.eval()
    try:
        return evaluate_bpb(model, batches, cfg.eval_batches, token_bytes)
    finally:
        model.train()


def _any_rank(flag: bool, dinfo: DistInfo) -> bool:
    """True on every rank if it is true on any (stop requests, end of epoch)."""
    if not dinfo.is_distributed:
        return flag
    t = torch.tensor([float(flag)], device=dinfo.device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item())


def _sum_over_ranks(values: list[float], dinfo: DistInfo) -> list[float]:
    if not dinfo.is_distributed:
        return values
    t = torch.tensor(values, dtype=torch.float64, device=dinfo.device)
    dist.all_reduce(t)
    return t.tolist()


def _load_start(cfg: SFTConfig, tokenizer: Tokenizer, dinfo: DistInfo, dtype: torch.dtype):
    """(model, optimizer, meta of what was loaded, base meta, resumed step or None, optimizer loaded?)."""
    out_dir = Path(cfg.out_dir)
    resume_step = latest_step(out_dir) if cfg.resume and out_dir.exists() else None
    src_dir, src_step = (
        (out_dir, resume_step) if resume_step is not None else (Path(cfg.base_checkpoint_dir), cfg.base_step)
    )
    if src_step is None:
        src_step = latest_step(src_dir)
        if src_step is None:
            raise FileNotFoundError(f"base_checkpoint_dir: no complete checkpoint in {src_dir}")
    # Momenta are sharded per rank, so they load only onto the same number of ranks; otherwise (or
    # with no optimizer state, e.g. an imported checkpoint) every rank starts from fresh momenta.
    saved_world = json.loads((src_dir / META_FILE.format(step=src_step)).read_text()).get("world_size", 1)
    with_optim = (
        cfg.load_optimizer
        and saved_world == dinfo.world_size
        and all(
            (src_dir / OPTIM_FILE.format(step=src_step, rank=r)).exists() for r in range(dinfo.world_size)
        )
    )
    model_state, optim_state, meta = load_checkpoint(
        src_dir, src_step, device=dinfo.device, load_optimizer=with_optim, rank=dinfo.rank
    )
    base_meta = meta if resume_step is None else meta.get("base_meta", {})
    model_config = model_config_from_meta(meta, src_dir)
    if model_config.vocab_size != tokenizer.vocab_size:
        raise ValueError(
            f"tokenizer_dir: vocab size {tokenizer.vocab_size} != checkpoint's {model_config.vocab_size}"
        )
    check_state_matches(model_state, model_config, src_dir)
    with torch.device("meta"):
        model = GPT(model_config, compute_dtype=dtype)
    model.to_empty(device=dinfo.device)
    model.init_weights()  # storage dtypes and rotary tables; the values come from the state next
    model.load_state_dict(model_state, strict=True)
    del model_state
    optimizer = _optimizer(model, cfg, base_meta, dinfo.device)
    if optim_state is not None:
        load_saved_state(optimizer, optim_state)
    return model, optimizer, meta, base_meta, resume_step, optim_state is not None


def sft(cfg: SFTConfig, hooks: TrainHooks | None = None) -> TrainResult:
    """Fine-tune; returns after `num_iterations` steps (or one epoch) or when should_stop says so."""
    from shared.nanochat.tokenizer import token_bytes as token_bytes_of

    hooks = hooks or TrainHooks()
    dev = detect_device(cfg.device)
    dinfo = init_distributed(dev.type)
    device, rank, world = dinfo.device, dinfo.rank, dinfo.world_size
    torch.manual_seed(cfg.seed)
    tokenizer = Tokenizer.load(Path(cfg.tokenizer_dir))
    out_dir = Path(cfg.out_dir)
    dtype = choose_dtype(dev.type)
    model, optimizer, meta, base_meta, resume_step, optimizer_loaded = _load_start(
        cfg, tokenizer, dinfo, dtype
    )
    model_config = model.config
    seq_len = cfg.max_seq_len or model_config.sequence_len
    if cfg.fp8:
        if (cfg.device_batch_size * seq_len) % FP8_ALIGN:
            raise ValueError(
                f"fp8: needs device_batch_size * max_seq_len divisible by {FP8_ALIGN}, "
                f"got {cfg.device_batch_size} * {seq_len} (the base model's sequence_len)"
            )
        enable_fp8(model, device)  # same Parameters: the optimizer built above is unaffected
    # rows are always (B, T): one static-shape graph; eval and checkpoints use the plain module
    use_compile = dev.type == "cuda" if cfg.compile is None else cfg.compile
    train_model = torch.compile(model, dynamic=False) if use_compile else model
    mixture = build_mixture(
        cfg.mixture,
        tasks_dir=Path(cfg.tasks_dir) if cfg.tasks_dir else None,
        conversations=cfg.conversations,
        smoltalk_epochs=cfg.smoltalk_epochs,
        mmlu_epochs=cfg.mmlu_epochs,
        gsm8k_epochs=cfg.gsm8k_epochs,
        seed=cfg.seed,
    )
    n_val = int(len(mixture) * cfg.val_fraction)
    val_convs, train_convs = mixture[:n_val], mixture[n_val:]
    if len(train_convs) < world:
        raise ValueError(f"mixture: {len(train_convs)} training conversations for {world} ranks")
    loop = meta.get("loop_state", {}) if resume_step is not None else {}
    state = PackerState(cursor=rank)
    if "packer" in loop:  # saved by rank 0; the other ranks read the conversations after it
        state = PackerState(**loop["packer"])
        state.cursor = (state.cursor + rank) % len(train_convs)
    batches = packed_batches(
        tokenizer, train_convs, cfg.device_batch_size, seq_len, rank=rank, world_size=world, state=state
    )
    tok_bytes = token_bytes_of(tokenizer).to(device)

    step = int(loop.get("step", 0))
    start_step = step
    losses: list[float] = []
    last_loss: float | None = None
    val_bpb = meta.get("val_bpb") if resume_step is not None else None
    checkpoint_step = resume_step
    tokens_per_step = cfg.device_batch_size * seq_len * cfg.grad_accum_steps * world
    flops_per_token = model.estimate_flops()
    empty_steps = 0
    t_start = time.time()

    def progress_frac() -> float:
        if cfg.num_iterations > 0:
            return step / cfg.num_iterations
        return min(1.0, state.consumed / len(train_convs))

    def save() -> None:
        nonlocal checkpoint_step
        meta_out = {
            "kind": "sft",
            "val_bpb": val_bpb,
            "model_config": model_config.to_dict(),
            "user_config": cfg.to_dict(),
            "max_seq_len": seq_len,
            "device_batch_size": cfg.device_batch_size,
            "base_meta": {
                k: v for k, v in base_meta.items() if not k.startswith(("loop_state", "dataloader"))
            },
            # the packer state of rank 0; every rank's cursor differs only by its rank offset
            "loop_state": {"step": step, "packer": asdict(state)},
            "optimizer_loaded": optimizer_loaded,
        }
        path = save_checkpoint(
            out_dir,
            step,
            model.state_dict() if rank == 0 else None,
            optimizer.state_dict(),
            meta_out,
            rank=rank,
            world_size=world,
        )
        checkpoint_step = step
        if hooks.on_checkpoint and rank == 0:
            files = sorted(
                p.name for p in out_dir.iterdir() if f"_{step:06d}" in p.name and not p.name.startswith(".")
            )
            hooks.on_checkpoint({"stage": "sft", "step": step, "path": str(path), "files": files})

    def evaluate() -> None:
        nonlocal val_bpb
        val_bpb = _val_bpb(model, tokenizer, val_convs, cfg, seq_len, tok_bytes, dinfo)
        if hooks.on_eval and rank == 0 and val_bpb is not None:
            hooks.on_eval({"stage": "sft", "step": step, "val_bpb": val_bpb})

    model.train()
    stopped = False
    while True:
        finished = cfg.num_iterations > 0 and step >= cfg.num_iterations
        if cfg.num_iterations < 0:  # one epoch: ranks consume at different rates, stop together
            finished = _any_rank(state.consumed >= len(train_convs), dinfo)
        if finished:
            break
        if _any_rank(bool(hooks.should_stop and hooks.should_stop()), dinfo):
            stopped = True
            break
        t0 = time.time()
        lrm = lr_multiplier(progress_frac(), cfg.warmdown_ratio, cfg.final_lr_frac)
        for group in optimizer.param_groups:
            group["lr"] = group["initial_lr"] * lrm
            if group["kind"] == "muon":
                group["momentum"] = muon_momentum(step)
        step_nats, step_targets = 0.0, 0
        for _ in range(cfg.grad_accum_steps):
            x, y, state = next(batches)
            loss, n_targets = masked_loss(train_model, x.to(device), y.to(device))
            if n_targets:
                (loss / cfg.grad_accum_steps).backward()
                step_nats += loss.item() * n_targets
                step_targets += n_targets
        # every rank must take part in the optimizer's collectives, even one with nothing to learn
        step_nats, total_targets = _sum_over_ranks([step_nats, float(step_targets)], dinfo)
        if total_targets == 0:
            empty_steps += 1
            if empty_steps >= 10:
                raise ValueError("mixture: 10 consecutive batches had no assistant tokens to train on")
            model.zero_grad(set_to_none=True)
            continue
        empty_steps = 0
        if step_targets == 0:  # this rank saw only padding: give the optimizer zero gradients
            for p in model.parameters():
                p.grad = torch.zeros_like(p)
        optimizer.step()
        model.zero_grad(set_to_none=True)
        step += 1
        last_loss = step_nats / total_targets
        losses.append(last_loss)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        dt = max(time.time() - t0, 1e-9)
        if rank == 0 and hooks.on_progress and (step % cfg.log_every == 0 or step == start_step + 1):
            frac = progress_frac()
            elapsed = time.time() - t_start
            # The first record of every (re)started run says which kernels run (kernel_report.py).
            kernels: dict = {}
            if step == start_step + 1:
                graph_breaks = graph_break_count() if use_compile else None
                kernels["kernels"] = kernel_report(
                    model, dev, device, dtype, compiled=use_compile, graph_breaks=graph_breaks
                )
            hooks.on_progress(
                {
                    # pretraining and SFT append to the same progress.jsonl; the report splits them
                    "stage": "sft",
                    "step": step,
                    # one-epoch runs learn their length only by packing: extrapolate from progress
                    "total_steps": cfg.num_iterations
                    if cfg.num_iterations > 0
                    else round(step / max(frac, 1e-9)),
                    "loss": last_loss,
                    "lr_mult": lrm,
                    "tokens_per_sec": tokens_per_step / dt,
                    "mfu": mfu(flops_per_token, tokens_per_step / dt, dev.peak_flops, world),
                    "eta_seconds": elapsed / frac * (1 - frac) if frac > 0 else None,
                    "peak_memory_bytes": torch.cuda.max_memory_allocated(device)
                    if device.type == "cuda"
                    else None,
                    "epoch": state.epoch,
                    "progress": frac,
                    **kernels,
                }
            )
        if cfg.eval_every and step % cfg.eval_every == 0:
            evaluate()
        if cfg.checkpoint_every and step % cfg.checkpoint_every == 0:
            save()
    if not stopped and step != start_step:
        evaluate()
    if checkpoint_step != step:
        save()
    return TrainResult(
        step=step,
        total_steps=cfg.num_iterations if cfg.num_iterations > 0 else step,
        last_loss=last_loss,
        val_bpb=val_bpb,
        checkpoint_step=checkpoint_step,
        stopped=stopped,
        losses=losses,
        start_step=start_step,
    )
