"""MuonAdamW: Muon for the block matrices, AdamW for embeddings, lm_head and scalars; schedules.

One optimizer object covers single-process and distributed training. Under a multi-rank process
group the gradients are averaged *inside* `step()` (there is no DDP wrapper): AdamW tensors are
reduce-scattered by rows and Muon stacks are reduce-scattered by matrix, each rank updates only
its shard (so optimizer state is sharded, ZeRO-2 style), and the updated parameters are
all-gathered. Tiny tensors (< 1024 elements), and AdamW tensors whose rows do not divide by
the world size, are all-reduced and updated everywhere.

The update math follows the reference nanochat (KellerJordan's Muon as modified there):
Nesterov momentum -> row equilibration -> Polar Express orthogonalization -> Frobenius-norm snap
-> NorMuon variance reduction -> cautious weight decay + step. Hyperparameters are passed to the
update functions as 0-D tensors on the parameters' device (copied without a host sync) so a compiled
kernel never recompiles when a schedule moves.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn

# Polar Express coefficients for 5 iterations (Amsel et al. 2025, arXiv:2505.16932; safety
# factor 2e-2, cushion 2) -- the values nanochat uses.
POLAR_EXPRESS_COEFFS: tuple[tuple[float, float, float], ...] = (
    (8.156554524902461, -22.48329292557795, 15.878769915207462),
    (4.042929935166739, -2.808917465908714, 0.5000178451051316),
    (3.8916678022926607, -2.772484153217685, 0.5060648178503393),
    (3.285753657755655, -2.3681294933425376, 0.46449024233003106),
    (2.3465413258596377, -1.7097828382687081, 0.42323551169305323),
)

# Tensors smaller than this are all-reduced and updated on every rank instead of sharded.
SMALL_PARAM_NUMEL = 1024


# --------------------------------------------------------------------------------------------
# Update kernels (plain functions; torch.compile'd on GPU by MuonAdamW)


def adamw_update(
    p: Tensor,
    grad: Tensor,
    exp_avg: Tensor,
    exp_avg_sq: Tensor,
    step: Tensor,
    lr: Tensor,
    beta1: Tensor,
    beta2: Tensor,
    eps: Tensor,
    wd: Tensor,
) -> None:
    """Decoupled-weight-decay Adam on one tensor (or one row shard of it), in place.

    Math runs in fp32 even when a parameter is stored in bf16: `1 - beta2` alone loses all
    precision in bf16.
    """
    p32, m32, v32, g32 = p.float(), exp_avg.float(), exp_avg_sq.float(), grad.float()
    p32.mul_(1 - lr * wd)
    m32.lerp_(g32, 1 - beta1)
    v32.lerp_(g32.square(), 1 - beta2)
    denom = (v32 / (1 - beta2**step)).sqrt() + eps
    p32.add_(m32 / denom * (-lr / (1 - beta1**step)))
    p.copy_(p32)
    exp_avg.copy_(m32)
    exp_avg_sq.copy_(v32)


def polar_express(g: Tensor, steps: int) -> Tensor:
    """Approximate the orthogonal polar factor U V^T of each matrix in a (K, m, n) stack.

    The iteration works on the Gram matrix of the smaller side, so tall and wide matrices cost
    the same. Input is expected pre-scaled to spectral norm <= 1.
    """
    x = g
    tall = g.size(-2) > g.size(-1)
    for a, b, c in POLAR_EXPRESS_COEFFS[:steps]:
        if tall:
            gram = x.mT @ x  # (K, n, n)
            x = a * x + x @ (b * gram + c * (gram @ gram))
        else:
            gram = x @ x.mT  # (K, m, m)
            x = a * x + (b * gram + c * (gram @ gram)) @ x
    return x


def muon_update(
    grads: Tensor,
    params: Tensor,
    momentum_buffer: Tensor,
    second_momentum_buffer: Tensor,
    momentum: Tensor,
    lr: Tensor,
    wd: Tensor,
    beta2: Tensor,
    ns_steps: int,
    ortho_dtype: torch.dtype,
) -> None:
    """One Muon step on a stack of same-shape matrices (K, m, n); updates `params` in place.

    `grads` is consumed (overwritten). `second_momentum_buffer` is the factored NorMuon second
    moment: (K, m, 1) when m >= n (statistics per row), else (K, 1, n) (per column).
    """
    rows, cols = params.size(-2), params.size(-1)
    # Nesterov momentum: buffer <- lerp(buffer, g, 1 - mu); update direction <- lerp(g, buffer, mu)
    mu = momentum.to(grads.dtype)
    momentum_buffer.lerp_(grads, 1 - mu)
    g = grads.lerp_(momentum_buffer, mu)

    x = g.to(ortho_dtype)
    # Row equilibration (MuonEq): every row rescaled to the mean row norm so the spectrum that
    # enters the polar iteration is better conditioned.
    target = x.float().norm(dim=(-2, -1), keepdim=True) / rows**0.5
    row_norm = x.float().norm(dim=-1, keepdim=True).clamp_min(1e-6)
    x = x * (target / row_norm).to(x.dtype)
    # Frobenius norm bounds the spectral norm; the 1.01 keeps the top singular value inside the
    # region the coefficients were fitted for.
    x = x / (x.norm(dim=(-2, -1), keepdim=True) * 1.01 + 1e-6)
    g = polar_express(x, ns_steps).to(params.dtype)
    # Muon+ snap: an exactly semi-orthogonal matrix has Frobenius norm sqrt(min(m, n)); this fixes
    # the polar iteration's under-convergence.
    g = g * (min(rows, cols) ** 0.5 / g.float().norm(dim=(-2, -1), keepdim=True).clamp_min(1e-6)).to(g.dtype)

    # NorMuon: per-row (or per-column) adaptive scale, then renormalized to keep the update norm.
    red_dim = -1 if rows >= cols else -2
    red_size = g.size(red_dim)
    v_mean = g.float().square().mean(dim=red_dim, keepdim=True)
    v_norm = (v_mean.sum(dim=(-2, -1), keepdim=True) * red_size).sqrt()
    second_momentum_buffer.lerp_(v_mean.to(second_momentum_buffer.dtype), 1 - beta2.to(g.dtype))
    step_size = second_momentum_buffer.clamp_min(1e-10).rsqrt()
    v_norm_new = (v_mean * red_size * step_size.float().square()).sum(dim=(-2, -1), keepdim=True).sqrt()
    g = g * (step_size * (v_norm / v_norm_new.clamp_min(1e-10))).to(g.dtype)

    # Cautious weight decay: decay only the coordinates where update and weight agree in sign.
    lr_ = lr.to(g.dtype)
    mask = (g * params) >= 0
    params.sub_(lr_ * g + lr_ * wd.to(g.dtype) * params * mask)


# --------------------------------------------------------------------------------------------
# The optimizer


def _dist_info() -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


# torch 2.13 renamed the single-tensor collectives; GPU images may ship an older torch.
_reduce_scatter = getattr(dist, "reduce_scatter_single", None) or dist.reduce_scatter_tensor
_all_gather = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor


class MuonAdamW(torch.optim.Optimizer):
    """Combined optimizer; each param group has `kind` 'adamw' or 'muon'.

    AdamW groups: lr, betas, eps, weight_decay. Muon groups: lr, momentum, ns_steps, beta2,
    weight_decay, and all params of one shape (they are stacked). `initial_lr` is recorded per
    group so schedules multiply the peak value.
    """

    def __init__(
        self,
        param_groups: list[dict],
        *,
        ortho_dtype: torch.dtype = torch.float32,
        compile_kernels: bool = False,
    ):
        for i, g in enumerate(param_groups):
            if g.get("kind") not in ("adamw", "muon"):
                raise ValueError(f"param_groups[{i}].kind must be 'adamw' or 'muon', got {g.get('kind')!r}")
            if g["kind"] == "muon" and len({tuple(p.shape) for p in g["params"]}) != 1:
                raise ValueError(f"param_groups[{i}]: a muon group needs params of a single shape")
        super().__init__(param_groups, defaults={})
        for g in self.param_groups:
            g.setdefault("initial_lr", g["lr"])
        self.ortho_dtype = ortho_dtype
        compile_fn: Callable[[Any], Any] = (
            (lambda f: torch.compile(f, dynamic=False, fullgraph=True)) if compile_kernels else (lambda f: f)
        )
        self._adamw = compile_fn(adamw_update)
        self._muon = compile_fn(muon_update)

    @staticmethod
    def _scalars(device: torch.device, *values: float) -> tuple[Tensor, ...]:
        # One small copy per call, on the parameters' device: 0-D tensors (not Python floats) so
        # a compiled kernel does not recompile as schedules move, and no CPU/GPU device mixing
        # inside eager-mode ops like lerp_. On a GPU the copy goes through pinned memory and is
        # non-blocking: a pageable host->device copy synchronizes the stream, which would stall
        # the host once per parameter every step.
        host = torch.tensor([float(v) for v in values], dtype=torch.float32)
        if device.type != "cuda":
            return host.to(device).unbind(0)
        return host.pin_memory().to(device, non_blocking=True).unbind(0)

    # Phase 1: launch gradient reductions --------------------------------------------------
    def _reduce_adamw(self, group: dict, world: int) -> list[dict]:
        infos = []
        for p in group["params"]:
            if world == 1:
                infos.append(dict(work=None, grad=p.grad, sharded=False))
            elif p.numel() < SMALL_PARAM_NUMEL or p.shape[0] % world:
                # Rows that do not split evenly over the ranks (e.g. a 64-padded vocabulary on 3 or
                # 6 GPUs) cannot be reduce-scattered: all-reduce and update the whole tensor.
                work = dist.all_reduce(p.grad, op=dist.ReduceOp.AVG, async_op=True)
                infos.append(dict(work=work, grad=p.grad, sharded=False))
            else:
                shard = torch.empty_like(p.grad[: p.shape[0] // world])
                work = _reduce_scatter(shard, p.grad, op=dist.ReduceOp.AVG, async_op=True)
                infos.append(dict(work=work, grad=shard, sharded=True))
        return infos

    def _reduce_muon(self, group: dict, world: int) -> dict:
        params = group["params"]
        if world == 1:
            return dict(work=None, grads=torch.stack([p.grad for p in params]), chunk=len(params), buf=None)
        chunk = math.ceil(len(params) / world)
        p0 = params[0]
        buf = torch.zeros(chunk * world, *p0.shape, dtype=p0.dtype, device=p0.device)
        torch.stack([p.grad for p in params], out=buf[: len(params)])
        grads = torch.empty(chunk, *p0.shape, dtype=p0.dtype, device=p0.device)
        work = _reduce_scatter(grads, buf, op=dist.ReduceOp.AVG, async_op=True)
        return dict(work=work, grads=grads, chunk=chunk, buf=buf)

    # Phase 2: update the owned shard, launch gathers ----------------------------------------
    def _step_adamw(self, group: dict, infos: list[dict], rank: int, world: int, gathers: list) -> None:
        for p, info in zip(group["params"], infos, strict=True):
            if info["work"] is not None:
                info["work"].wait()
            rows = p.shape[0] // world
            p_view = p[rank * rows : (rank + 1) * rows] if info["sharded"] else p
            state = self.state[p]
            if not state:
                state["step"] = 0
                state["exp_avg"] = torch.zeros_like(p_view)
                state["exp_avg_sq"] = torch.zeros_like(p_view)
            state["step"] += 1
            self._adamw(
                p_view,
                info["grad"],
                state["exp_avg"],
                state["exp_avg_sq"],
                *self._scalars(
                    p.device,
                    state["step"],
                    group["lr"],
                    group["betas"][0],
                    group["betas"][1],
                    group["eps"],
                    group["weight_decay"],
                ),
            )
            if info["sharded"]:
                gathers.append(dict(work=_all_gather(p, p_view, async_op=True), params=None))

    def _step_muon(self, group: dict, info: dict, rank: int, gathers: list) -> None:
        if info["work"] is not None:
            info["work"].wait()
        params, chunk = group["params"], info["chunk"]
        p0 = params[0]
        rows, cols = p0.shape[-2], p0.shape[-1]
        start = rank * chunk
        owned = max(0, min(chunk, len(params) - start))
        # Group state lives on the first param; it covers this rank's chunk of the stack only.
        state = self.state[p0]
        if "momentum_buffer" not in state:
            state["momentum_buffer"] = torch.zeros(chunk, rows, cols, dtype=p0.dtype, device=p0.device)
            factored = (chunk, rows, 1) if rows >= cols else (chunk, 1, cols)
            state["second_momentum_buffer"] = torch.zeros(factored, dtype=p0.dtype, device=p0.device)
        stacked = None
        if owned > 0:
            stacked = torch.stack(params[start : start + owned])
            self._muon(
                info["grads"][:owned],
                stacked,
                state["momentum_buffer"][:owned],
                state["second_momentum_buffer"][:owned],
                *self._scalars(
                    p0.device,
                    group["momentum"],
                    group["lr"] * max(1.0, rows / cols) ** 0.5,
                    group["weight_decay"],
                    group["beta2"],
                ),
                group["ns_steps"],
                self.ortho_dtype,
            )
        if info["buf"] is None:
            gathers.append(dict(work=None, params=params, stacked=stacked))
            return
        mine = torch.zeros(chunk, rows, cols, dtype=p0.dtype, device=p0.device)
        if stacked is not None:
            mine[:owned].copy_(stacked)
        # The reduce buffer is free again: reuse it as the gather destination.
        gathers.append(
            dict(work=_all_gather(info["buf"], mine, async_op=True), params=params, stacked=info["buf"])
        )

    @torch.no_grad()
    def step(self, closure: Callable[[], float] | None = None) -> None:  # type: ignore[override]
        if closure is not None:
            raise ValueError("MuonAdamW.step does not take a closure")
        rank, world = _dist_info()
        reduces: list[Any] = [
            self._reduce_adamw(g, world) if g["kind"] == "adamw" else self._reduce_muon(g, world)
            for g in self.param_groups
        ]
        gathers: list[dict] = []
        for group, info in zip(self.param_groups, reduces, strict=True):
            if group["kind"] == "adamw":
                self._step_adamw(group, info, rank, world, gathers)
            else:
                self._step_muon(group, info, rank, gathers)
        # Phase 3: wait for gathers; copy Muon stacks back into the individual tensors.
        for g in gathers:
            if g["work"] is not None:
                g["work"].wait()
            if g["params"] is not None:
                torch._foreach_copy_(g["params"], list(g["stacked"][: len(g["params"])].unbind(0)))


# --------------------------------------------------------------------------------------------
# Parameter groups for the GPT


@dataclass(frozen=True)
class OptimizerConfig:
    """Peak learning rates and Muon weight decay before batch-size scaling (reference defaults)."""

    embedding_lr: float = 0.3
    unembedding_lr: float = 0.008
    matrix_lr: float = 0.02
    scalar_lr: float = 0.5
    weight_decay: float = 0.28

    def __post_init__(self) -> None:
        for name in ("embedding_lr", "unembedding_lr", "matrix_lr", "scalar_lr"):
            v = getattr(self, name)
            if not (isinstance(v, (int, float)) and v > 0 and math.isfinite(v)):
                raise ValueError(f"{name} must be a positive finite number, got {v!r}")
        if not (isinstance(self.weight_decay, (int, float)) and self.weight_decay >= 0):
            raise ValueError(f"weight_decay must be >= 0, got {self.weight_decay!r}")


_SMEAR_ORDER = ("smear_gate.weight", "smear_lambda", "backout_lambda")


def _classify(name: str) -> str:
    if name.startswith("transformer.h."):
        return "muon"
    if name.startswith("transformer.wte."):
        return "wte"
    if name.startswith("value_embeds."):
        return "value_embeds"
    if name.startswith("lm_head."):
        return "lm_head"
    if name in ("resid_lambdas", "x0_lambdas"):
        return name
    if name.startswith("smear_gate.") or name in ("smear_lambda", "backout_lambda"):
        return "smear"
    raise ValueError(f"parameter {name!r} has no optimizer group (unknown to MuonAdamW grouping)")


def build_param_groups(
    model: nn.Module, cfg: OptimizerConfig, *, lr_scale: float = 1.0, weight_decay: float | None = None
) -> list[dict]:
    """The reference grouping. `lr_scale` is the batch-size LR correction (sqrt(B / 2**19)),
    `weight_decay` the already-scaled Muon weight decay (defaults to cfg.weight_decay)."""
    named: dict[str, list[tuple[str, nn.Parameter]]] = {}
    for name, p in model.named_parameters():
        named.setdefault(_classify(name), []).append((name, p))
    # Same parameter order as the reference inside every group, so a reference optimizer shard
    # (state keyed by position) loads onto the right tensors.
    named.get("smear", []).sort(key=lambda np_: _SMEAR_ORDER.index(np_[0]))
    buckets = {k: [p for _, p in v] for k, v in named.items()}
    n_embd = int(getattr(model, "config").n_embd)  # noqa: B009 - any module with a GPTConfig
    # AdamW LRs were tuned at width 768 and scale as 1/sqrt(width); scalars are not scaled.
    dim_scale = (n_embd / 768) ** -0.5
    wd = cfg.weight_decay if weight_decay is None else weight_decay
    adamw = [
        ("lm_head", cfg.unembedding_lr * lr_scale * dim_scale, (0.8, 0.96), 0.01),
        ("wte", cfg.embedding_lr * lr_scale * dim_scale, (0.8, 0.995), 0.001),
        ("value_embeds", 0.5 * cfg.embedding_lr * lr_scale * dim_scale, (0.8, 0.995), 0.01),
        ("resid_lambdas", 0.01 * cfg.scalar_lr * lr_scale, (0.8, 0.95), 0.05),
        ("x0_lambdas", cfg.scalar_lr * lr_scale, (0.96, 0.95), 0.0),
        ("smear", 0.2, (0.8, 0.95), 0.0),
    ]
    groups: list[dict] = []
    for key, lr, betas, gwd in adamw:
        if buckets.get(key):
            groups.append(
                dict(
                    kind="adamw",
                    name=key,
                    params=buckets[key],
                    lr=lr,
                    betas=betas,
                    eps=1e-10,
                    weight_decay=gwd,
                )
            )
    matrices = buckets.get("muon", [])
    for shape in sorted({tuple(p.shape) for p in matrices}):
        groups.append(
            dict(
                kind="muon",
                name=f"muon_{shape[0]}x{shape[1]}",
                params=[p for p in matrices if tuple(p.shape) == shape],
                lr=cfg.matrix_lr * lr_scale,
                momentum=0.95,
                ns_steps=5,
                beta2=0.9,
                weight_decay=wd,
            )
        )
    return groups


# --------------------------------------------------------------------------------------------
# Schedules


@dataclass(frozen=True)
class Schedule:
    """LR multiplier, Muon momentum and Muon weight decay as functions of the step."""

    num_iterations: int
    weight_decay: float = 0.28  # peak (already scaled) Muon weight decay, cosine-decayed to 0
    warmup_steps: int = 40
    warmdown_ratio: float = 0.65
    final_lr_frac: float = 0.05
    momentum_warmup_steps: int = 400
    momentum_start: float = 0.85
    momentum_peak: float = 0.97
    momentum_final: float = 0.90

    def __post_init__(self) -> None:
        if self.num_iterations < 1:
            raise ValueError(f"num_iterations must be >= 1, got {self.num_iterations}")
        if self.warmup_steps < 0:
            raise ValueError(f"warmup_steps must be >= 0, got {self.warmup_steps}")
        if not 0 <= self.warmdown_ratio <= 1:
            raise ValueError(f"warmdown_ratio must be in [0, 1], got {self.warmdown_ratio}")
        if not 0 <= self.final_lr_frac <= 1:
            raise ValueError(f"final_lr_frac must be in [0, 1], got {self.final_lr_frac}")
        if self.weight_decay < 0:
            raise ValueError(f"weight_decay must be >= 0, got {self.weight_decay}")

    @property
    def warmdown_steps(self) -> int:
        return round(self.warmdown_ratio * self.num_iterations)

    def lr_multiplier(self, step: int) -> float:
        n, wd_steps = self.num_iterations, self.warmdown_steps
        if step < self.warmup_steps:
            return (step + 1) / self.warmup_steps
        if step <= n - wd_steps:
            return 1.0
        progress = (n - step) / wd_steps
        return progress + (1 - progress) * self.final_lr_frac

    def muon_momentum(self, step: int) -> float:
        warmdown_start = self.num_iterations - self.warmdown_steps
        if step < self.momentum_warmup_steps:
            frac = step / self.momentum_warmup_steps
            return (1 - frac) * self.momentum_start + frac * self.momentum_peak
        if step >= warmdown_start and self.warmdown_steps > 0:
            progress = (step - warmdown_start) / self.warmdown_steps
            return (1 - progress) * self.momentum_peak + progress * self.momentum_final
        return self.momentum_peak

    def muon_weight_decay(self, step: int) -> float:
        return self.weight_decay * 0.5 * (1 + math.cos(math.pi * step / self.num_iterations))


def load_saved_state(optimizer: MuonAdamW, state: dict) -> None:
    """Take another run's per-parameter state (moments, momentum buffers) and keep this run's
    hyperparameters (LRs, weight decay, schedule bases): an SFT run from a base checkpoint, a
    pretraining run continued from another run's checkpoint."""
    fresh = [{k: v for k, v in g.items() if k != "params"} for g in optimizer.param_groups]
    try:
        optimizer.load_state_dict(state)
    except (ValueError, KeyError) as e:
        raise ValueError(f"saved optimizer state does not match the model's parameter groups: {e}") from None
    for group, hyper in zip(optimizer.param_groups, fresh, strict=True):
        group.update(hyper)


def apply_schedule(optimizer: MuonAdamW, schedule: Schedule, step: int) -> dict[str, float]:
    """Set every group's LR (and Muon momentum / weight decay) for `step`; returns the values."""
    lrm = schedule.lr_multiplier(step)
    mom = schedule.muon_momentum(step)
    wd = schedule.muon_weight_decay(step)
    for group in optimizer.param_groups:
        group["lr"] = group["initial_lr"] * lrm
        if group["kind"] == "muon":
            group["momentum"] = mom
            group["weight_decay"] = wd
    return {"lr_mult": lrm, "muon_momentum": mom, "muon_weight_decay": wd}
