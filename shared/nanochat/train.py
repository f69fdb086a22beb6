"""Pretraining as a function: `train(cfg, hooks) -> TrainResult`.

The loop of the reference's base_train.py without its globals: the model is built from `depth`
and the tokenizer's vocabulary, every derived number (batch, LR scale, weight decay, iterations,
gradient accumulation, FLOPs/token, MFU) comes from `sizing.plan`, and the outside world is
reached only through `TrainHooks` (progress, eval, checkpoint events; cooperative stop).

Exact resume: a checkpoint holds the model, every rank's optimizer shard, the loop state (EMA
loss, timers, best val bpb) and the data-loader state *of the last batch trained on* (the loop
prefetches one batch ahead; that batch is re-produced after a resume, not skipped). On CPU a run
interrupted at step k and resumed produces exactly the losses of an uninterrupted run.
"""

from __future__ import annotations

import gc
import math
import resource
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.distributed as dist

from shared.nanochat import sizing
from shared.nanochat.checkpoint import apply_retention, latest_step, load_checkpoint, save_checkpoint
from shared.nanochat.device import DistInfo, choose_dtype, detect_device, init_distributed
from shared.nanochat.init_from import InitPlan, init_optimizer_state, plan_init
from shared.nanochat.optim import MuonAdamW, Schedule, apply_schedule, build_param_groups, load_saved_state
from shared.nanochat.train_config import TrainConfig

EMA_BETA = 0.9  # smoothing of the reported training loss (debiased), as the reference
ETA_WARMUP_STEPS = 10  # compile / allocator warm-up steps left out of the ETA's step time


@dataclass
class TrainHooks:
    on_progress: Callable[[dict], None] | None = None
    on_eval: Callable[[dict], None] | None = None
    on_checkpoint: Callable[[dict], None] | None = None
    should_stop: Callable[[], bool] | None = None  # polled every step on every rank


@dataclass
class TrainResult:
    step: int
    total_steps: int
    last_loss: float | None
    val_bpb: float | None
    checkpoint_step: int | None
    stopped: bool
    losses: list[float] = field(default_factory=list)  # raw loss of each step run by this call
    start_step: int = 0


# --------------------------------------------------------------------------------------------


def _peak_memory_bytes(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device)
    # CPU: the process's peak resident set (Linux reports KiB).
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def _all_ranks_any(flag: bool, dinfo: DistInfo) -> bool:
    if not dinfo.is_distributed:
        return flag
    t = torch.tensor([1.0 if flag else 0.0], device=dinfo.device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item())


def _mean_over_ranks(value: float, dinfo: DistInfo) -> float:
    if not dinfo.is_distributed:
        return value
    t = torch.tensor([value], dtype=torch.float64, device=dinfo.device)
    dist.all_reduce(t)
    return t.item() / dinfo.world_size


def _gather_objects(obj, dinfo: DistInfo) -> list:
    if not dinfo.is_distributed:
        return [obj]
    out: list = [None] * dinfo.world_size
    dist.all_gather_object(out, obj)
    return out


def train(cfg: TrainConfig, hooks: TrainHooks | None = None) -> TrainResult:
    from shared.nanochat.config import GPTConfig
    from shared.nanochat.dataloader import PretrainLoader
    from shared.nanochat.eval.bpb import evaluate_bpb
    from shared.nanochat.fp8 import enable_fp8
    from shared.nanochat.gpt import GPT
    from shared.nanochat.kernel_report import graph_break_count, kernel_report
    from shared.nanochat.tokenizer import Tokenizer, token_bytes

    hooks = hooks or TrainHooks()
    dev = detect_device(cfg.device)
    dinfo = init_distributed(dev.type)
    device, rank, world = dinfo.device, dinfo.rank, dinfo.world_size
    dtype = choose_dtype(dev.type, cfg.dtype)
    use_compile = dev.type == "cuda" if cfg.compile is None else cfg.compile

    tokenizer = Tokenizer.load(Path(cfg.tokenizer_dir))
    tok_bytes = token_bytes(tokenizer).to(device)
    plan = sizing.plan(
        cfg.depth,
        vocab_size=tokenizer.vocab_size,
        seq_len=cfg.max_seq_len,
        device_batch_size=cfg.device_batch_size,
        gpus=world,
        gpu=dev.gpu_key,
        target_param_data_ratio=cfg.target_param_data_ratio,
        total_batch_size=cfg.total_batch_size,
        num_iterations=cfg.num_iterations,
        target_flops=cfg.target_flops,
        aspect_ratio=cfg.aspect_ratio,
        head_dim=cfg.head_dim,
        n_kv_head=cfg.n_kv_head,
        window_pattern=cfg.window_pattern,
        weight_decay=cfg.weight_decay,
    )
    model_config = GPTConfig.from_dict(plan.model_config)
    num_iterations, grad_accum = plan.num_iterations, plan.grad_accum_steps

    # Model: shapes on the meta device, storage on the target, then a seeded init.
    torch.manual_seed(cfg.seed)
    with torch.device("meta"):
        model = GPT(model_config, attn_backend=cfg.attn_backend, compute_dtype=dtype)
    model.to_empty(device=device)
    model.init_weights()

    ckpt_dir = Path(cfg.checkpoint_dir)
    resume_step = cfg.resume_from_step
    if resume_step is None and cfg.resume:
        resume_step = latest_step(ckpt_dir)
    meta: dict = {}
    optim_state = None
    # Another run's checkpoint starts this run only while it has none of its own: a continuation
    # that crashed resumes from its own newest checkpoint (which records the init it came from).
    init: InitPlan | None = None
    if resume_step is None and cfg.init_checkpoint_dir is not None:
        init = plan_init(cfg.init_checkpoint_dir, cfg.init_step, cfg.resume_optimizer, world)
        init_state, _, init_meta = load_checkpoint(init.checkpoint_dir, init.step, device=device)
        if init_meta.get("model_config") != model_config.to_dict():
            raise ValueError(
                f"init_checkpoint_dir: {init.checkpoint_dir} step {init.step} holds a different model "
                f"({init_meta.get('model_config')}) than this config ({model_config.to_dict()})"
            )
        model.load_state_dict(init_state, strict=True)
        del init_state
    if resume_step is not None:
        model_state, optim_state, meta = load_checkpoint(
            ckpt_dir, resume_step, device=device, load_optimizer=True, rank=rank
        )
        if meta.get("model_config") != model_config.to_dict():
            raise ValueError(
                f"checkpoint {ckpt_dir} step {resume_step} holds a different model "
                f"({meta.get('model_config')}) than this config ({model_config.to_dict()})"
            )
        if meta.get("world_size", world) != world:
            raise ValueError(
                f"checkpoint step {resume_step} was saved by {meta['world_size']} rank(s); "
                f"resuming needs the same number of ranks, got {world}"
            )
        model.load_state_dict(model_state, strict=True)
        del model_state

    if cfg.fp8:
        enable_fp8(model, device)  # after loading: the state dict is the bf16 model's either way
    train_model: torch.nn.Module = torch.compile(model, dynamic=False) if use_compile else model  # type: ignore[assignment]

    optimizer = MuonAdamW(
        build_param_groups(
            model, cfg.optimizer_config(), lr_scale=plan.batch_lr_scale, weight_decay=plan.weight_decay
        ),
        ortho_dtype=torch.bfloat16 if dev.type == "cuda" else torch.float32,
        compile_kernels=use_compile,
    )
    if optim_state is not None:
        optimizer.load_state_dict(optim_state)
        del optim_state
    elif init is not None and init.optimizer == "saved":
        # The moments continue; LRs, weight decay and the schedule are this run's.
        load_saved_state(optimizer, init_optimizer_state(init, model_config, rank, device))
    init_record = init.to_dict() if init is not None else meta.get("init")
    schedule = Schedule(
        num_iterations=num_iterations,
        weight_decay=plan.weight_decay,
        warmup_steps=cfg.warmup_steps,
        warmdown_ratio=cfg.warmdown_ratio,
        final_lr_frac=cfg.final_lr_frac,
    )

    loader_state = None
    if resume_step is not None:
        states = meta.get("dataloader_states")
        loader_state = (
            states if isinstance(states, list) and len(states) == world else meta.get("dataloader_state_dict")
        )
    loader = PretrainLoader(
        cfg.data_dir,
        tokenizer,
        cfg.device_batch_size,
        cfg.max_seq_len,
        split="train",
        rank=rank,
        world_size=world,
        device=device,
        resume_state=loader_state,
    )
    # State of the last batch actually trained on; the prefetched one is not consumed yet.
    consumed_state = loader.state_dict()
    x, y, pending_state = next(loader)

    loop = meta.get("loop_state", {}) if resume_step is not None else {}
    step = resume_step or 0
    start_step = step
    val_bpb = meta.get("val_bpb") if resume_step is not None else None
    min_val_bpb = loop.get("min_val_bpb", math.inf)
    smooth_loss = loop.get("smooth_train_loss", 0.0)
    total_time = loop.get("total_training_time", 0.0)
    tokens_per_step = plan.total_batch_size
    peak = dev.peak_flops
    eval_steps = max(1, cfg.eval_tokens // (cfg.device_batch_size * cfg.max_seq_len * world))
    losses: list[float] = []
    last_loss: float | None = None
    checkpoint_step = resume_step
    eta_time, eta_steps = 0.0, 0

    def evaluate() -> None:
        nonlocal val_bpb, min_val_bpb
        train_model.eval()
        val = PretrainLoader(
            cfg.data_dir,
            tokenizer,
            cfg.device_batch_size,
            cfg.max_seq_len,
            split="val",
            rank=rank,
            world_size=world,
            device=device,
        )
        try:
            val_bpb = evaluate_bpb(train_model, val, eval_steps, tok_bytes)
        finally:
            val.close()
            train_model.train()
        min_val_bpb = min(min_val_bpb, val_bpb)
        if rank == 0 and hooks.on_eval:
            hooks.on_eval({"step": step, "val_bpb": val_bpb, "min_val_bpb": min_val_bpb})

    def save() -> None:
        nonlocal checkpoint_step
        states = _gather_objects(consumed_state, dinfo)
        ckpt_meta = {
            "kind": "pretrain",
            "val_bpb": val_bpb,
            "model_config": model_config.to_dict(),
            "user_config": cfg.to_dict(),
            "device_batch_size": cfg.device_batch_size,
            "max_seq_len": cfg.max_seq_len,
            "total_batch_size": plan.total_batch_size,
            "num_iterations": num_iterations,
            "dataloader_state_dict": states[0],
            "dataloader_states": states,
            "loop_state": {
                "min_val_bpb": min_val_bpb,
                "smooth_train_loss": smooth_loss,
                "total_training_time": total_time,
            },
            "init": init_record,  # the checkpoint this run started from, and what it loaded
            "plan": {
                "batch_lr_scale": plan.batch_lr_scale,
                "weight_decay": plan.weight_decay,
                "grad_accum_steps": grad_accum,
                "flops_per_token": plan.flops_per_token,
            },
        }
        meta_path = save_checkpoint(
            ckpt_dir,
            step,
            model.state_dict() if rank == 0 else None,
            optimizer.state_dict(),
            ckpt_meta,
            rank=rank,
            world_size=world,
        )
        checkpoint_step = step
        if rank == 0:
            if cfg.keep_last:
                apply_retention(ckpt_dir, cfg.keep_last, cfg.milestone_every)
            if hooks.on_checkpoint:
                files = sorted(
                    p.name
                    for p in ckpt_dir.iterdir()
                    if f"_{step:06d}" in p.name and not p.name.startswith(".")
                )
                hooks.on_checkpoint(
                    {"step": step, "path": str(meta_path), "files": files, "val_bpb": val_bpb}
                )

    def stop_requested() -> bool:
        return _all_ranks_any(bool(hooks.should_stop and hooks.should_stop()), dinfo)

    stopped = False
    kernels_reported = False
    gc_was_enabled = gc.isenabled()
    train_model.train()
    try:
        while True:
            last = step == num_iterations
            resumed_here = resume_step is not None and step == start_step
            if (last or (cfg.eval_every and step % cfg.eval_every == 0)) and not resumed_here:
                evaluate()
            if checkpoint_step != step and (
                last or (cfg.save_every and step > 0 and step % cfg.save_every == 0)
            ):
                save()
            if last:
                break
            if stop_requested():
                stopped = True
                if checkpoint_step != step:
                    save()
                break

            # ---- one optimizer step ----
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            t0 = time.perf_counter()
            step_loss = torch.zeros((), dtype=torch.float32, device=device)
            for _ in range(grad_accum):
                loss = train_model(x, y)
                step_loss += loss.detach()
                (loss / grad_accum).backward()
                consumed_state = pending_state
                x, y, pending_state = next(loader)  # prefetch while the device works
            sched = apply_schedule(optimizer, schedule, step)
            optimizer.step()
            model.zero_grad(set_to_none=True)
            raw_loss = _mean_over_ranks(step_loss.item() / grad_accum, dinfo)
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            dt = time.perf_counter() - t0

            smooth_loss = EMA_BETA * smooth_loss + (1 - EMA_BETA) * raw_loss
            debiased = smooth_loss / (1 - EMA_BETA ** (step + 1))
            total_time += dt
            if step - start_step >= ETA_WARMUP_STEPS or eta_steps == 0:
                eta_time, eta_steps = eta_time + dt, eta_steps + 1
            step += 1
            losses.append(raw_loss)
            last_loss = raw_loss
            if step == start_step + 1 and device.type == "cuda":
                # Setup garbage is collected once and frozen; CPython's cycle scans otherwise
                # stall long GPU runs for hundreds of ms.
                gc.collect()
                gc.freeze()
                gc.disable()

            if rank == 0 and hooks.on_progress and (step % cfg.log_every == 0 or step == num_iterations):
                tok_s = tokens_per_step / dt
                # The first record of every (re)started run says which kernels run; graph breaks
                # are known once the first step has compiled.
                kernels: dict = {}
                if not kernels_reported:
                    kernels_reported = True
                    graph_breaks = graph_break_count() if use_compile else None
                    kernels["kernels"] = kernel_report(
                        model, dev, device, dtype, compiled=use_compile, graph_breaks=graph_breaks
                    )
                hooks.on_progress(
                    {
                        "step": step,
                        "total_steps": num_iterations,
                        "loss": debiased,
                        "raw_loss": raw_loss,
                        "tokens_per_sec": tok_s,
                        "mfu": sizing.mfu(plan.flops_per_token, tok_s, peak, world),
                        "eta_seconds": (num_iterations - step) * eta_time / eta_steps,
                        "peak_memory_bytes": _peak_memory_bytes(device),
                        "step_seconds": dt,
                        "total_training_seconds": total_time,
                        **sched,
                        **kernels,
                    }
                )
    finally:
        loader.close()
        if gc_was_enabled:
            gc.enable()

    return TrainResult(
        step=step,
        total_steps=num_iterations,
        last_loss=last_loss,
        val_bpb=val_bpb,
        checkpoint_step=checkpoint_step,
        stopped=stopped,
        losses=losses,
        start_step=start_step,
    )
