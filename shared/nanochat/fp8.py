"""FP8 training matmuls: tensorwise-scaled `torch._scaled_mm` for the transformer matrices.

A Linear layer does three GEMMs: y = x W^T forward, dx = dy W and dW = dy^T x backward. Each
operand is quantized with one scale for the whole tensor, scale = FP8_MAX / amax(|t|), clamped
to the format's range (a cast does not saturate by itself), and `_scaled_mm` multiplies the FP8
operands and undoes the scales (it takes their inverses) in its epilogue. Inputs and weights use
e4m3 (more mantissa), output gradients e5m2 (more range). AMD's MI300 (gfx942) implements the
`fnuz` variants of both formats (no negative zero, max 240 for e4m3), so the formats follow the
device. The amax, the scales and the casts stay on the device: no host sync per matmul.

Only the matmuls are FP8. The master weights keep their dtype (fp32, cast per use), the saved
state dict is the bf16/fp32 model's, and an `Fp8Linear` in eval mode runs the ordinary matmul, so
evaluation, export and serving never see FP8. The approach is upstream nanochat's (its own ~150
lines in place of torchao's Float8Linear): one autograd.Function around the three GEMMs.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from shared.nanochat.gpt import GPT, Linear

EPS = 1e-12  # amax floor: an all-zero tensor gets a finite scale
# cuBLAS/hipBLASLt FP8 GEMMs need every matrix dimension divisible by 16.
FP8_ALIGN = 16
# AMD targets with FP8 matrix cores: MI300/MI325 (gfx942, fnuz formats), MI350/MI355 (gfx950, OCP).
ROCM_FNUZ_ARCHS = ("gfx942",)
ROCM_FP8_ARCHS = ("gfx942", "gfx950")


@dataclass(frozen=True)
class Fp8Formats:
    forward: torch.dtype  # inputs and weights
    backward: torch.dtype  # output gradients

    @property
    def name(self) -> str:
        return f"{str(self.forward).removeprefix('torch.float8_')}/{str(self.backward).removeprefix('torch.float8_')}"


OCP = Fp8Formats(torch.float8_e4m3fn, torch.float8_e5m2)
FNUZ = Fp8Formats(torch.float8_e4m3fnuz, torch.float8_e5m2fnuz)


def formats_for_arch(gcn_arch: str | None) -> Fp8Formats:
    """`gcn_arch`: ROCm's gcnArchName ("gfx942:sramecc+:xnack-"), None on NVIDIA and CPU."""
    if gcn_arch is not None and gcn_arch.split(":")[0] in ROCM_FNUZ_ARCHS:
        return FNUZ
    return OCP


def _gcn_arch(device: torch.device) -> str | None:
    if device.type != "cuda" or torch.version.hip is None:
        return None
    return str(torch.cuda.get_device_properties(device).gcnArchName)


def formats_for(device: torch.device | str) -> Fp8Formats:
    return formats_for_arch(_gcn_arch(torch.device(device)))


# --- quantization ----------------------------------------------------------------------------------
def quantize(x: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """(x in FP8 `dtype`, inverse scale as a 0-dim fp32 tensor): x ~= x_fp8.float() * inv_scale.
    The largest |x| maps to the format's max; values beyond it (none, unless amax is stale)
    saturate instead of overflowing to NaN. The division runs in fp64 so that compiled and eager
    code round the scale identically."""
    fp8_max = torch.finfo(dtype).max
    amax = x.detach().abs().amax().double()
    scale = (fp8_max / amax.clamp(min=EPS)).float()
    x_fp8 = (x.detach().float() * scale).clamp(-fp8_max, fp8_max).to(dtype)
    return x_fp8, scale.reciprocal()


def dequantize(
    x_fp8: torch.Tensor, inv_scale: torch.Tensor, dtype: torch.dtype = torch.float32
) -> torch.Tensor:
    return (x_fp8.float() * inv_scale).to(dtype)


def _col_major(x: torch.Tensor) -> torch.Tensor:
    """Same values, column-major strides: `_scaled_mm` wants its second operand laid out so."""
    return x.t().contiguous().t()


@torch._dynamo.allow_in_graph
class _Fp8Matmul(torch.autograd.Function):
    """x (M, K) @ w (N, K)^T in FP8; returns x's dtype. Saves the FP8 operands (half the bytes of
    bf16) and their inverse scales for the two backward GEMMs."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, w: torch.Tensor, fwd: torch.dtype, bwd: torch.dtype) -> torch.Tensor:
        x8, x_inv = quantize(x, fwd)
        w8, w_inv = quantize(w, fwd)
        ctx.save_for_backward(x8, x_inv, w8, w_inv)
        ctx.bwd, ctx.w_dtype = bwd, w.dtype
        # w8 is (N, K) row-major, so w8.t() is already column-major: no copy. Fast (lower
        # precision) accumulation is the usual choice for the forward GEMM.
        return torch._scaled_mm(
            x8, w8.t(), scale_a=x_inv, scale_b=w_inv, out_dtype=x.dtype, use_fast_accum=True
        )

    @staticmethod
    def backward(ctx, dy: torch.Tensor):
        x8, x_inv, w8, w_inv = ctx.saved_tensors
        dy8, dy_inv = quantize(dy.contiguous(), ctx.bwd)
        # dx = dy (M, N) @ w (N, K)
        dx = torch._scaled_mm(dy8, _col_major(w8), scale_a=dy_inv, scale_b=w_inv, out_dtype=dy.dtype)
        # dW = dy^T (N, M) @ x (M, K), written straight in the master weight's dtype.
        dw = torch._scaled_mm(
            dy8.t().contiguous(), _col_major(x8), scale_a=dy_inv, scale_b=x_inv, out_dtype=ctx.w_dtype
        )
        return dx, dw, None, None


def fp8_linear(x: torch.Tensor, weight: torch.Tensor, formats: Fp8Formats = OCP) -> torch.Tensor:
    """x (..., K) @ weight (N, K)^T -> (..., N) in x's dtype, the GEMMs in FP8."""
    shape = x.shape
    # _scaled_mm wants its first operand row-major; the quantized copy keeps x's strides.
    x2d = x.reshape(-1, shape[-1]).contiguous()
    out = _Fp8Matmul.apply(x2d, weight, formats.forward, formats.backward)
    return out.reshape(*shape[:-1], out.shape[-1])


class Fp8Linear(Linear):
    """A model Linear whose training matmuls run in FP8 (same weight, same state-dict key); in
    eval mode it is the plain bf16/fp32 Linear, so evaluation never runs FP8."""

    def __init__(self, in_features: int, out_features: int, formats: Fp8Formats) -> None:
        super().__init__(in_features, out_features)
        self.formats = formats

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.training:
            return fp8_linear(x, self.weight, self.formats)
        return F.linear(x, self.weight.to(dtype=x.dtype))


# --- device support and model conversion -----------------------------------------------------------
def unsupported_reason(device: torch.device | str) -> str | None:
    """Why FP8 training cannot run on `device` (None = it can): FP8 tensor cores (NVIDIA sm_89+,
    AMD gfx942/gfx950), or on CPU a `_scaled_mm` that works (torch >= 2.8 has one)."""
    dev = torch.device(device)
    if dev.type == "cuda":
        arch = _gcn_arch(dev)
        if arch is not None:
            if arch.split(":")[0] not in ROCM_FP8_ARCHS:
                return f"FP8 GEMMs need an AMD MI300-class GPU ({'/'.join(ROCM_FP8_ARCHS)}), this is {arch}"
        elif torch.cuda.get_device_capability(dev) < (8, 9):
            major, minor = torch.cuda.get_device_capability(dev)
            return f"FP8 GEMMs need an NVIDIA GPU with compute capability >= 8.9, this is {major}.{minor}"
    elif dev.type != "cpu":
        return f"FP8 training is not supported on {dev.type}"
    return _probe(str(dev))


@functools.cache
def _probe(device: str) -> str | None:
    """Run one FP8 linear forward + backward and compare with the fp32 matmul: a torch build
    without the GEMM (or with a broken one) is found here, not in the middle of training."""
    dev = torch.device(device)
    formats = formats_for(dev)
    g = torch.Generator().manual_seed(0)
    x, w, dy = (torch.randn(*s, generator=g).to(dev) for s in ((64, 128), (96, 128), (64, 96)))
    try:
        xr = x.clone().requires_grad_()
        wr = w.clone().requires_grad_()
        y = fp8_linear(xr, wr, formats)
        y.backward(dy)
    except Exception as e:  # the GEMM raises for unsupported dtypes or devices
        return f"torch._scaled_mm failed: {type(e).__name__}: {e}"
    errors = {
        "output": _rel_err(y, x @ w.t()),
        "grad_input": _rel_err(xr.grad, dy @ w),
        "grad_weight": _rel_err(wr.grad, dy.t() @ x),
    }
    bad = {k: round(v, 4) for k, v in errors.items() if not v < PROBE_TOL}
    return f"FP8 matmul disagrees with fp32 (relative error {bad})" if bad else None


# Relative Frobenius error of an FP8 GEMM on Gaussian data: ~3% for e4m3 operands, ~6% with an
# e5m2 gradient; 0.15 leaves room while still catching a wrong scale (error >= 50%).
PROBE_TOL = 0.15


def _rel_err(got: torch.Tensor | None, want: torch.Tensor) -> float:
    if got is None:
        return float("inf")
    return float((got.detach().float() - want.float()).norm() / want.float().norm())


def enable_fp8(model: GPT, device: torch.device | str) -> int:
    """Swap the transformer blocks' Linear layers (q, k, v, attention and MLP projections) for
    Fp8Linear sharing the same weights; returns how many were converted. lm_head, the embeddings
    and the small gates stay in bf16 (tiny GEMMs gain nothing; the logits want the precision).
    Raises ValueError naming the cause when the device cannot train in FP8."""
    reason = unsupported_reason(device)
    if reason is not None:
        raise ValueError(f"fp8: {reason}")
    formats = formats_for(device)
    converted = 0
    for block in model.blocks:
        for parent in block.modules():
            for name, child in list(parent.named_children()):
                if type(child) is not Linear:
                    continue
                if child.in_features % FP8_ALIGN or child.out_features % FP8_ALIGN:
                    continue  # e.g. the value-embedding gate (12 input channels)
                with torch.device("meta"):  # no storage: the weight is the existing Parameter
                    fp8 = Fp8Linear(child.in_features, child.out_features, formats)
                fp8.weight = child.weight  # the same Parameter: optimizer groups and state are unchanged
                fp8.train(child.training)
                setattr(parent, name, fp8)
                converted += 1
    return converted


def fp8_layers(model: nn.Module) -> int:
    return sum(isinstance(m, Fp8Linear) for m in model.modules())
