"""Every derived training number, computed in one place: parameter counts, FLOPs per token, the
auto-sized batch / learning-rate / weight-decay / horizon (the reference's scaling-law recipe in
`scripts/base_train.py`), peak FLOPs per accelerator, MFU and the estimated wall time.

Pure arithmetic on a GPTConfig (no torch, no allocation), so `ncp plan` answers instantly for a
1.4B-parameter model; tests check every count against the real module built on the meta device.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field

from shared.nanochat.config import GPTConfig

# Gates read a fixed number of leading channels (see gpt.py).
SMEAR_CHANNELS = 24
VE_GATE_CHANNELS = 12

# The reference tunes at depth 12 with 2**19 tokens per step and transfers with the Power Lines
# law B_opt ~ D**0.383 (arXiv 2505.13738); LRs scale as sqrt(B/B_ref), weight decay as
# sqrt(B/B_ref) * D_ref/D (keeps the AdamW "epoch time scale" constant).
REF_DEPTH = 12
REF_BATCH_TOKENS = 2**19
BATCH_EXPONENT = 0.383
BASE_WEIGHT_DECAY = 0.28
BASE_LRS = {"matrix_lr": 0.02, "embedding_lr": 0.3, "unembedding_lr": 0.008, "scalar_lr": 0.5}

# Dense bf16 peak FLOP/s per accelerator (vendor datasheets, as the reference's table).
PEAK_FLOPS: dict[str, float | None] = {
    "b200": 2.25e15,
    "h200": 989e12,
    "h200-nvl": 836e12,
    "h100": 989e12,
    "h100-nvl": 835e12,
    "h100-pcie": 756e12,
    "a100": 312e12,
    "l40s": 362e12,
    "mi355x": 2.5e15,
    "mi325x": 1307.4e12,
    "mi300x": 1307.4e12,
    "mi300a": 980.6e12,
    "mi250x": 383e12,
    "cpu": None,
}
# Device-name substrings -> key; more specific patterns first.
_GPU_PATTERNS: tuple[tuple[tuple[str, ...], str], ...] = (
    (("b200",), "b200"),
    (("h200", "nvl"), "h200-nvl"),
    (("h200",), "h200"),
    (("h100", "nvl"), "h100-nvl"),
    (("h100", "pcie"), "h100-pcie"),
    (("h100",), "h100"),
    (("a100",), "a100"),
    (("l40s",), "l40s"),
    (("mi355",), "mi355x"),
    (("mi325",), "mi325x"),
    (("mi300x",), "mi300x"),
    (("mi300a",), "mi300a"),
    (("mi250",), "mi250x"),
)


# --- counting ------------------------------------------------------------------------------------
def param_breakdown(cfg: GPTConfig) -> dict[str, int]:
    """Parameter counts per group, equal to GPT(cfg).param_breakdown()."""
    c, pv, kv = cfg.n_embd, cfg.padded_vocab_size, cfg.kv_dim
    n_ve = sum(cfg.has_value_embed(i) for i in range(cfg.n_layer))
    per_layer = c * c + 2 * c * kv + c * c + 2 * (c * 4 * c)  # q, k+v, attn proj, MLP in+out
    counts = {
        "wte": pv * c,
        "value_embeds": n_ve * pv * kv,
        "lm_head": pv * c,
        "transformer_matrices": cfg.n_layer * per_layer + n_ve * VE_GATE_CHANNELS * cfg.n_kv_head,
        # resid + x0 per layer, smear gate weights, smear_lambda, backout_lambda
        "scalars": 2 * cfg.n_layer + SMEAR_CHANNELS + 2,
    }
    counts["total"] = sum(counts.values())
    return counts


def num_scaling_params(cfg: GPTConfig) -> int:
    """Transformer matrices + lm_head: the reference found these give the cleanest scaling laws."""
    pb = param_breakdown(cfg)
    return pb["transformer_matrices"] + pb["lm_head"]


def num_matmul_params(cfg: GPTConfig) -> int:
    """Weights that multiply the token stream: every Linear (block matrices incl. the ve gates,
    lm_head, the smear gate). Embedding lookups and elementwise lambdas cost no matmul FLOPs."""
    pb = param_breakdown(cfg)
    return pb["transformer_matrices"] + pb["lm_head"] + SMEAR_CHANNELS


def flops_per_token(cfg: GPTConfig) -> int:
    """Training (fwd+bwd) FLOPs per token: 6 per matmul weight, plus 12 * H * D * attended keys
    per layer with the attended span capped by the layer's window (the reference's estimate)."""
    attn = sum(12 * cfg.n_head * cfg.head_dim * min(w, cfg.sequence_len) for w in cfg.window_sizes())
    return 6 * num_matmul_params(cfg) + attn


# --- hardware ------------------------------------------------------------------------------------
def gpu_key(device_name: str) -> str | None:
    """Map a device name ("NVIDIA H100 80GB HBM3", "AMD Instinct MI300X") to a PEAK_FLOPS key."""
    name = device_name.lower()
    if name in PEAK_FLOPS:
        return name
    for patterns, key in _GPU_PATTERNS:
        if all(p in name for p in patterns):
            return key
    return None


def peak_flops(gpu: str) -> float | None:
    """Peak bf16 FLOP/s for a key or device name; None for CPU or an unknown device."""
    key = gpu_key(gpu)
    return PEAK_FLOPS.get(key) if key else None


def detect_gpu() -> str:
    """The PEAK_FLOPS key of this machine's first accelerator ("cpu" without one or if unknown)."""
    import torch  # here, so that planning never needs torch

    if not torch.cuda.is_available():
        return "cpu"
    return gpu_key(torch.cuda.get_device_name(0)) or "cpu"


def mfu(flops_per_tok: float, tokens_per_sec: float, peak: float | None, world_size: int = 1) -> float | None:
    """Model FLOPs utilisation as a fraction (None when the peak is unknown, e.g. on CPU)."""
    if not peak:
        return None
    return flops_per_tok * tokens_per_sec / (peak * world_size)


# --- auto-sizing ---------------------------------------------------------------------------------
def auto_total_batch_size(target_tokens: float, ref_tokens: float) -> int:
    """B = 2**round(log2(2**19 * (D / D_ref)**0.383)), D = training horizon in tokens."""
    if target_tokens <= 0 or ref_tokens <= 0:
        raise ValueError("auto batch size needs positive token horizons (target_param_data_ratio > 0)")
    predicted = REF_BATCH_TOKENS * (target_tokens / ref_tokens) ** BATCH_EXPONENT
    return 2 ** round(math.log2(predicted))


@dataclass(frozen=True)
class Plan:
    """A training run's derived numbers; `to_dict()` is what `ncp plan --json` prints."""

    model_config: dict
    param_breakdown: dict[str, int]
    scaling_params: int
    flops_per_token: int
    target_param_data_ratio: float
    target_tokens: int
    total_batch_size: int
    auto_batch_size: bool
    batch_lr_scale: float
    lrs: dict[str, float]  # base LRs times batch_lr_scale (AdamW's dmodel scaling is the optimizer's)
    weight_decay: float
    num_iterations: int
    horizon_from: str  # "num_iterations" | "target_flops" | "target_param_data_ratio"
    total_tokens: int
    tokens_param_ratio: float
    total_flops: float
    seq_len: int
    device_batch_size: int
    gpus: int
    grad_accum_steps: int
    gpu: str
    peak_flops: float | None
    mfu: float
    est_tokens_per_sec: float | None
    est_seconds: float | None
    extra: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.num_iterations <= 0:
            raise ValueError(f"Plan.num_iterations must be positive, got {self.num_iterations}")
        if self.grad_accum_steps <= 0:
            raise ValueError(f"Plan.grad_accum_steps must be positive, got {self.grad_accum_steps}")

    def to_dict(self) -> dict:
        return asdict(self)


def plan(
    depth: int,
    vocab_size: int = 32768,
    seq_len: int = 2048,
    device_batch_size: int = 32,
    gpus: int = 1,
    gpu: str = "mi300x",
    target_param_data_ratio: float = 12,
    total_batch_size: int | None = None,
    num_iterations: int | None = None,
    target_flops: float | None = None,
    mfu: float = 0.40,
    *,
    aspect_ratio: int = 64,
    head_dim: int = 128,
    n_kv_head: int | None = None,
    window_pattern: str = "SSSL",
    weight_decay: float = BASE_WEIGHT_DECAY,
) -> Plan:
    """The reference's recipe for a depth-`depth` model; see `plan_config`."""
    cfg = GPTConfig.from_depth(
        depth,
        vocab_size=vocab_size,
        sequence_len=seq_len,
        aspect_ratio=aspect_ratio,
        head_dim=head_dim,
        n_kv_head=n_kv_head,
        window_pattern=window_pattern,
    )
    ref_cfg = GPTConfig.from_depth(
        REF_DEPTH,
        vocab_size=vocab_size,
        sequence_len=seq_len,
        aspect_ratio=aspect_ratio,
        head_dim=head_dim,
        window_pattern=window_pattern,
    )
    return plan_config(
        cfg,
        ref_config=ref_cfg,
        device_batch_size=device_batch_size,
        gpus=gpus,
        gpu=gpu,
        target_param_data_ratio=target_param_data_ratio,
        total_batch_size=total_batch_size,
        num_iterations=num_iterations,
        target_flops=target_flops,
        mfu=mfu,
        weight_decay=weight_decay,
        extra={"depth": depth, "aspect_ratio": aspect_ratio, "head_dim": head_dim},
    )


def plan_config(
    cfg: GPTConfig,
    *,
    ref_config: GPTConfig | None = None,
    device_batch_size: int = 32,
    gpus: int = 1,
    gpu: str = "mi300x",
    target_param_data_ratio: float = 12,
    total_batch_size: int | None = None,
    num_iterations: int | None = None,
    target_flops: float | None = None,
    mfu: float = 0.40,
    weight_decay: float = BASE_WEIGHT_DECAY,
    extra: dict | None = None,
) -> Plan:
    """Derive batch, LR scale, weight decay, horizon and wall time for an arbitrary GPTConfig.

    Horizon precedence (as the reference): explicit num_iterations, then target_flops, then
    target_param_data_ratio. `ref_config` is the depth-12 model of the same vocab/context
    (default: GPTConfig.from_depth(12) with cfg's vocab, context and window pattern)."""
    for name, value in (("device_batch_size", device_batch_size), ("gpus", gpus)):
        if not isinstance(value, int) or value <= 0:
            raise ValueError(f"{name} must be a positive integer, got {value!r}")
    if not 0.0 < mfu <= 1.0:
        raise ValueError(f"mfu must be in (0, 1], got {mfu}")
    if num_iterations is not None and num_iterations <= 0:
        raise ValueError(f"num_iterations must be positive, got {num_iterations}")
    if target_flops is not None and target_flops <= 0:
        raise ValueError(f"target_flops must be positive, got {target_flops}")
    if total_batch_size is not None and total_batch_size <= 0:
        raise ValueError(f"total_batch_size must be positive, got {total_batch_size}")
    if target_param_data_ratio <= 0 and (
        total_batch_size is None or num_iterations is None and target_flops is None
    ):
        raise ValueError(
            "target_param_data_ratio must be positive unless total_batch_size and a horizon "
            f"(num_iterations or target_flops) are given, got {target_param_data_ratio}"
        )
    key = gpu_key(gpu)
    if key is None:
        raise ValueError(f"gpu {gpu!r} is unknown; known: {sorted(PEAK_FLOPS)}")
    ref_config = ref_config or GPTConfig.from_depth(
        REF_DEPTH, vocab_size=cfg.vocab_size, sequence_len=cfg.sequence_len, window_pattern=cfg.window_pattern
    )

    pb = param_breakdown(cfg)
    scaling = pb["transformer_matrices"] + pb["lm_head"]
    fpt = flops_per_token(cfg)
    target_tokens = int(target_param_data_ratio * scaling)
    ref_tokens = target_param_data_ratio * num_scaling_params(ref_config)

    auto = total_batch_size is None
    if total_batch_size is None:
        batch = auto_total_batch_size(target_tokens, ref_tokens)
    else:
        batch = int(total_batch_size)
    lr_scale = math.sqrt(batch / REF_BATCH_TOKENS)
    # D_ref/D uses the ratio-based horizons like the reference, whatever sets the iteration count.
    wd = (
        weight_decay * lr_scale * (ref_tokens / target_tokens)
        if target_tokens > 0
        else weight_decay * lr_scale
    )

    if num_iterations is not None:
        iters, horizon_from = int(num_iterations), "num_iterations"
    elif target_flops is not None:
        iters, horizon_from = round(target_flops / (fpt * batch)), "target_flops"
    else:
        iters, horizon_from = target_tokens // batch, "target_param_data_ratio"
    if iters <= 0:
        raise ValueError(f"the {horizon_from} horizon gives {iters} iterations at {batch:,} tokens per step")

    micro = device_batch_size * cfg.sequence_len * gpus
    if batch % micro != 0:
        raise ValueError(
            f"total_batch_size {batch:,} is not a multiple of device_batch_size * seq_len * gpus = "
            f"{device_batch_size} * {cfg.sequence_len} * {gpus} = {micro:,}"
        )
    total_tokens = batch * iters
    peak = PEAK_FLOPS[key]
    total_flops = float(fpt) * total_tokens
    tok_s = peak * gpus * mfu / fpt if peak else None
    return Plan(
        model_config=cfg.to_dict(),
        param_breakdown=pb,
        scaling_params=scaling,
        flops_per_token=fpt,
        target_param_data_ratio=target_param_data_ratio,
        target_tokens=target_tokens,
        total_batch_size=batch,
        auto_batch_size=auto,
        batch_lr_scale=lr_scale,
        lrs={name: lr * lr_scale for name, lr in BASE_LRS.items()},
        weight_decay=wd,
        num_iterations=iters,
        horizon_from=horizon_from,
        total_tokens=total_tokens,
        tokens_param_ratio=total_tokens / scaling,
        total_flops=total_flops,
        seq_len=cfg.sequence_len,
        device_batch_size=device_batch_size,
        gpus=gpus,
        grad_accum_steps=batch // micro,
        gpu=key,
        peak_flops=peak,
        mfu=mfu,
        est_tokens_per_sec=tok_s,
        est_seconds=total_tokens / tok_s if tok_s else None,
        extra=dict(extra or {}),
    )
