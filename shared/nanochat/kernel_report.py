"""What a training run actually runs: attention kernel per layer type, compiled or eager, compute
dtype, FP8, device and the peak FLOP/s its MFU is computed against.

Kernel choice never falls back silently. Pretraining and SFT attach this report to their first
progress record (`"kernels"`, see docs/ARCHITECTURE.md); on a GPU, a slow path (windowed layers on
dense-mask SDPA, any layer on the fp32 math reference, an eager model, graph breaks in the compiled
one) is listed in `slow_fallbacks` with its cause, for the worker to raise as a warning.
"""

from __future__ import annotations

import torch

from shared.nanochat.attention import BACKENDS, backend_problem, kernel_module
from shared.nanochat.device import DeviceInfo
from shared.nanochat.fp8 import Fp8Linear
from shared.nanochat.gpt import GPT


def layer_type(window: int, seq_len: int) -> str:
    """ "windowed" when the window hides keys at training length, else "full" (the model's rule)."""
    return "windowed" if window < seq_len - 1 else "full"


def describe_kernel(backend: str, kind: str, device_type: str) -> str:
    """Human-readable name of the kernel `backend` runs for a layer of type `kind`."""
    if backend in ("fa3", "flash"):
        return (
            f"{'FlashAttention-3' if backend == 'fa3' else 'FlashAttention'}: {kernel_module(backend).source}"
        )
    if backend == "flex":
        compiled = "compiled" if device_type == "cuda" else "eager"
        return f"FlexAttention ({compiled}, block-sparse sliding window)"
    if backend == "sdpa":
        if kind == "full":
            return "SDPA is_causal (fused flash / memory-efficient kernel)"
        return "SDPA with a dense T x T boolean mask"
    return "fp32 math reference (explicit softmax)"


def graph_break_count() -> int:
    """Graph breaks torch.compile has recorded in this process so far."""
    from torch._dynamo.utils import counters

    return int(sum(counters["graph_break"].values()))


def kernel_report(
    model: GPT,
    dev: DeviceInfo,
    device: torch.device,
    dtype: torch.dtype,
    *,
    compiled: bool,
    graph_breaks: int | None = None,
) -> dict:
    """The JSON-able report. `graph_breaks`: counted after the first compiled step (None if not)."""
    seq_len = model.config.sequence_len
    backends = model.attention_backends(device, dtype)
    by_type: dict[str, set[str]] = {}
    for window, backend in zip(model.windows, backends, strict=True):
        by_type.setdefault(layer_type(window, seq_len), set()).add(backend)
    attention = {kind: "+".join(sorted(names)) for kind, names in by_type.items()}
    fp8 = [m for m in model.modules() if isinstance(m, Fp8Linear)]
    report = {
        "device": dev.name,
        "device_backend": dev.backend,
        "torch": torch.__version__,
        "compute_dtype": str(dtype).removeprefix("torch."),
        "compiled": compiled,
        "graph_breaks": graph_breaks,
        "attention": attention,
        "attention_kernels": {
            kind: " + ".join(describe_kernel(b, kind, device.type) for b in sorted(names))
            for kind, names in by_type.items()
        },
        "attn_backend_requested": model.attn_backend,
        "fp8": bool(fp8),
        "fp8_layers": len(fp8),
        "fp8_formats": fp8[0].formats.name if fp8 else None,
        # MFU divides by the dense bf16 peak even for FP8 runs (as upstream reports it).
        "peak_flops": dev.peak_flops,
        "peak_flops_key": dev.gpu_key,
    }
    report["slow_fallbacks"] = slow_fallbacks(report, model, device)
    return report


def slow_fallbacks(report: dict, model: GPT, device: torch.device) -> list[str]:
    """Causes of slow paths on a GPU, one sentence each; empty on CPU (everything is slow there)."""
    if device.type != "cuda":
        return []
    out = []
    requested = model.attn_backend

    def cause() -> str:
        if requested != "auto":
            return f"attn_backend={requested!r} was requested"
        # Under "auto" every faster backend was tried first; say why each was passed over.
        return "; ".join(
            f"{name}: {backend_problem(name, device, model.config.head_dim) or 'not chosen'}"
            for name in BACKENDS
            if name not in ("sdpa", "math")
        )

    if "sdpa" in report["attention"].get("windowed", "").split("+"):
        out.append(f"windowed attention layers run SDPA with a dense T x T mask ({cause()})")
    for kind, names in report["attention"].items():
        if "math" in names.split("+"):
            out.append(f"{kind} attention layers run the fp32 math reference ({cause()})")
    if not report["compiled"]:
        out.append("the model runs eager: torch.compile is off (compile=false)")
    elif report["graph_breaks"]:
        out.append(
            f"torch.compile split the step into several graphs ({report['graph_breaks']} graph breaks)"
        )
    return out
