"""Exact causal attention with per-layer sliding windows, on the fastest kernel a device has.

All entry points take and return FlashAttention's layout, (B, T, H, D), with k/v possibly having
fewer heads (GQA). Window convention (FlashAttention's `window_size=(w, 0)`): a query at absolute
position i sees keys j with `i - w <= j <= i`. A window >= the key length is full causal.

Backends, all exact (same math, different kernels):
- "fa3":   FlashAttention-3, Hopper (or a ROCm build of its interface): the `flash_attn_interface`
           wheel or the Hub kernel `kernels-community/flash-attn3` the CUDA image fetches at
           build time; native windows and KV cache.
- "flash": `flash_attn` (CUDA FA2, or ROCm's CK / Triton builds), or AMD aiter's FlashAttention as
           the Hub kernel `kernels-community/aiter-flash-attn` (the ROCm image); native windows.
- "sdpa":  PyTorch SDPA. Full-causal layers use `is_causal` (flash / AOTriton kernels on GPU);
           windowed layers fall back to an explicit boolean mask (slow on GPU: memory-bound).
- "flex":  SDPA for full-causal layers, FlexAttention with a cached sliding-window BlockMask for
           windowed layers, so masked-out tiles are skipped instead of computed.
- "math":  plain softmax(QK^T)V in fp32 with an explicit mask: the reference the others are
           tested against (and the CPU fallback).
"""

from __future__ import annotations

import functools
import importlib
import importlib.util
import math
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

BACKENDS = ("fa3", "flash", "flex", "sdpa", "math")

try:
    from torch.nn.attention.flex_attention import flex_attention as _flex_attention
except ImportError:  # torch < 2.5
    _flex_attention = None  # type: ignore[assignment]


# --- availability ----------------------------------------------------------------------------------
# Where the images put Hugging Face Hub kernels fetched at image build time (docker/fetch_hub_kernel.py):
# <dir>/<name>/build/<variant>/. They are loaded from disk with the `kernels` package; nothing is
# ever downloaded at run time.
HUB_KERNEL_DIR = Path("/opt/nanochat/kernels")
# Per backend: the Hub kernel directory name, then the Python module of a wheel. An image's Hub
# kernel comes first: the image chose it (e.g. a base image's own flash_attn may lack sliding windows).
KERNEL_SOURCES = {
    "fa3": ("flash-attn3", "flash_attn_interface"),  # FA3 (Hopper): kernels-community or a wheel
    "flash": ("aiter-flash-attn", "flash_attn"),  # AMD aiter's FA on ROCm; FA2 / ROCm CK wheel
}


# backend -> loaded module. attention() reads this plain dict, not the cached loader: dynamo
# cannot trace through functools.cache (it traces the wrapped loader, hits os.stat and breaks the
# graph at every attention call of a compiled model).
_LOADED: dict[str, Any] = {}


@dataclass(frozen=True)
class KernelModule:
    module: Any  # has flash_attn_func / flash_attn_with_kvcache; None when nothing loaded
    source: str  # what was loaded, or why nothing was


@functools.cache
def kernel_module(backend: str) -> KernelModule:
    """The flash-attention implementation behind `backend` ("fa3" or "flash"), and where it came
    from. A broken build must not take the model down: the error becomes the reason and "auto"
    moves on to the next exact kernel."""
    hub_name, wheel = KERNEL_SOURCES[backend]
    problems = []
    hub_dir = HUB_KERNEL_DIR / hub_name
    if hub_dir.is_dir():
        try:
            from kernels import get_local_kernel  # type: ignore[import-not-found]

            _LOADED[backend] = get_local_kernel(hub_dir)
            return KernelModule(_LOADED[backend], f"Hub kernel {hub_name} ({hub_dir})")
        except Exception as e:
            problems.append(f"Hub kernel {hub_dir} failed to load: {type(e).__name__}: {e}")
    else:
        problems.append(f"no Hub kernel in {hub_dir}")
    if importlib.util.find_spec(wheel) is not None:
        try:
            mod = _LOADED[backend] = importlib.import_module(wheel)
            version = getattr(mod, "__version__", None)
            return KernelModule(mod, f"{wheel} {version}" if version else wheel)
        except Exception as e:
            problems.append(f"import {wheel} failed: {type(e).__name__}: {e}")
    else:
        problems.append(f"no {wheel} module")
    return KernelModule(None, "; ".join(problems))


def _kernel(backend: str) -> Any:
    mod = _LOADED.get(backend)
    if mod is None:  # not resolved yet: only outside a compiled model (models resolve at setup)
        mod = kernel_module(backend).module
    return mod


@functools.cache
def _flex_fn(device_type: str = "cpu"):
    """flex_attention, compiled on GPU: uncompiled it falls back to a dense reference kernel there."""
    if _flex_attention is None:
        return None
    if device_type == "cuda":
        return torch.compile(_flex_attention, dynamic=False)
    return _flex_attention


def _device_type(device: torch.device | str) -> str:
    return torch.device(device).type


def _fa3_device_problem(device: torch.device | str) -> str | None:
    """FA3's kernels are built for Hopper (sm_90); ROCm builds of the FA3 interface exist too (the
    probe decides whether one works), other NVIDIA generations would only fail the probe."""
    dev = torch.device(device)
    if dev.type != "cuda" or not torch.cuda.is_available():
        return "needs a GPU"
    if torch.version.hip is not None:
        return None
    major, minor = torch.cuda.get_device_capability(dev)
    return None if major == 9 else f"needs an NVIDIA Hopper GPU (sm_90), this is sm_{major}{minor}"


def unavailable_reason(backend: str, device: torch.device | str) -> str | None:
    """Why `backend` cannot run on `device` at all (None = it can be tried)."""
    dev_type = _device_type(device)
    if backend in ("fa3", "flash"):
        if dev_type != "cuda":
            return "needs a GPU"
        if backend == "fa3" and (problem := _fa3_device_problem(device)):
            return problem
        km = kernel_module(backend)
        return None if km.module is not None else km.source
    if backend == "flex":
        return "torch has no FlexAttention" if _flex_fn() is None else None
    return None  # sdpa, math: always


def available_backends(device: torch.device | str) -> list[str]:
    """Backends that can run on `device`, fastest first."""
    order = {"cuda": ("fa3", "flash", "flex", "sdpa"), "cpu": ("sdpa", "flex")}.get(
        _device_type(device), ("sdpa",)
    )
    return [b for b in order if unavailable_reason(b, device) is None] + ["math"]


def select_backend(
    device: torch.device | str,
    window: int | None = None,
    seq_len: int | None = None,
    requested: str = "auto",
    dtype: torch.dtype | None = None,
    head_dim: int = 128,
) -> str:
    """Pick a backend for one layer. `requested` is a backend name or "auto".

    "auto" prefers the flash kernels on GPU (they need fp16/bf16), then FlexAttention for windowed
    layers (full layers inside "flex" go to SDPA anyway), then SDPA. On CPU: SDPA.
    """
    avail = available_backends(device)
    if requested != "auto":
        if requested not in BACKENDS:
            raise ValueError(f"attn_backend must be 'auto' or one of {BACKENDS}, got {requested!r}")
        if requested not in avail:
            raise ValueError(f"attn_backend {requested!r} is not available on {device}; available: {avail}")
        return requested
    half = dtype in (torch.float16, torch.bfloat16) if dtype is not None else True
    for name in avail:
        if name in ("fa3", "flash") and half and backend_works(name, device, head_dim):
            return name
        if name == "flex" and _device_type(device) == "cuda" and backend_works(name, device, head_dim):
            windowed = window is not None and seq_len is not None and window < seq_len - 1
            return "flex" if windowed else "sdpa"
        if name == "sdpa":
            return "sdpa"
    return "math"


def backend_works(backend: str, device: torch.device | str, head_dim: int = 128) -> bool:
    """Run `backend` once on a small windowed GQA problem (training forward and backward, and the
    KV-cache path) and compare with the math reference. Importable is not enough: a build may lack
    sliding windows (some ROCm flash-attn backends), a head size, or a backward for either (FA2's
    backward needs an A100/H100 for head dims > 192); "auto" then moves on to the next exact kernel."""
    return backend_problem(backend, device, head_dim) is None


def backend_problem(backend: str, device: torch.device | str, head_dim: int = 128) -> str | None:
    """Why `backend` is not used on `device` (not installed, wrong GPU, or what its probe found);
    None when it passed the probe. Kernel reports quote this as the cause of a fallback."""
    reason = unavailable_reason(backend, device)
    if reason is not None:
        return reason
    return _probe(backend, str(torch.device(device)), head_dim)


# Largest gradient error a backend may show against the math reference, relative to the largest
# reference gradient. bf16 kernels stay well under it (~5e-3 on CPU, ~1e-2 for FA3's bf16 dq
# accumulated with atomics); a window off by one key already moves dq by ~0.2, a backward that
# ignores the window by ~0.4.
GRAD_PROBE_TOL = 0.1
FORWARD_PROBE_TOL = {torch.bfloat16: 3e-2, torch.float32: 1e-4}


def _grad_error(fn, q, k, v, dy) -> float:
    """max |grad(fn) - grad(math)| / max |grad(math)| over q, k, v for attention with window 64.
    Gradients are taken even when called under no_grad or inference mode (model setup often is)."""
    with torch.inference_mode(False), torch.enable_grad():

        def grads(f):
            xs = [t.clone().requires_grad_() for t in (q, k, v)]
            f(*xs).backward(dy.clone())
            return [x.grad.float() for x in xs]  # type: ignore[union-attr]

        want = grads(lambda a, b, c: _math(a, b, c, 64, 0))
        got = grads(fn)
    return max(float((g - w).abs().max() / w.abs().max()) for g, w in zip(got, want, strict=True))


@functools.cache
def _probe(backend: str, device: str, head_dim: int) -> str | None:
    dtype = torch.bfloat16 if torch.device(device).type == "cuda" else torch.float32
    g = torch.Generator().manual_seed(0)
    try:
        q, k, v = (torch.randn(1, 256, h, head_dim, generator=g).to(device, dtype) for h in (4, 2, 2))
        dy = torch.randn(1, 256, 4, head_dim, generator=g).to(device, dtype)
        grad_err = _grad_error(lambda a, b, c: attention(a, b, c, window=64, backend=backend), q, k, v, dy)
        with torch.no_grad():
            want = _math(q, k, v, 64, 0).float()
            got = attention(q, k, v, window=64, backend=backend).float()
            k_cache = torch.zeros(1, 256, 2, head_dim, device=device, dtype=dtype)
            v_cache = torch.zeros_like(k_cache)
            first = attention_with_cache(
                q[:, :200], k[:, :200], v[:, :200], k_cache, v_cache, 0, window=64, backend=backend
            )
            rest = attention_with_cache(
                q[:, 200:], k[:, 200:], v[:, 200:], k_cache, v_cache, 200, window=64, backend=backend
            )
    except Exception as e:  # an unsupported feature surfaces as an error from the kernel
        return f"probe (head_dim {head_dim}) raised {type(e).__name__}: {str(e)[:300]}"
    cached = torch.cat([first, rest], dim=1).float()
    tol = FORWARD_PROBE_TOL[dtype]
    fwd_err = float((got - want).abs().max())
    cache_err = float((cached - want).abs().max())
    if not fwd_err < tol:
        return (
            f"probe (head_dim {head_dim}): forward differs from the math reference by {fwd_err:.3g} (> {tol})"
        )
    if not cache_err < tol:
        return f"probe (head_dim {head_dim}): KV-cache path differs from the math reference by {cache_err:.3g} (> {tol})"
    if not grad_err < GRAD_PROBE_TOL:
        return (
            f"probe (head_dim {head_dim}): backward differs from the math reference by {grad_err:.3g} "
            f"(relative, > {GRAD_PROBE_TOL})"
        )
    return None


# --- masks -----------------------------------------------------------------------------------------
def causal_window_mask(tq: int, tk: int, window: int, device, q_offset: int | None = None) -> torch.Tensor:
    """Boolean (tq, tk) mask, True = attend. Queries sit at the last tq positions by default."""
    offset = tk - tq if q_offset is None else q_offset
    rows = offset + torch.arange(tq, device=device).unsqueeze(1)
    cols = torch.arange(tk, device=device).unsqueeze(0)
    return (cols <= rows) & (rows - cols <= window)


@functools.lru_cache(maxsize=32)
def _sliding_block_mask(t: int, window: int, device_str: str):
    from torch.nn.attention.flex_attention import create_block_mask

    def mask_mod(b, h, q_idx, kv_idx):
        return (q_idx >= kv_idx) & (q_idx - kv_idx <= window)

    return create_block_mask(mask_mod, None, None, t, t, device=device_str)


@torch.compiler.disable
def sliding_block_masks(t: int, windows, device) -> dict:
    """{window: BlockMask} for FlexAttention, built once per (T, window, device) and cached.
    Kept out of compiled graphs: a model calls this once at the top of forward (a single graph
    break) instead of rebuilding masks inside every traced layer."""
    return {w: _sliding_block_mask(t, w, str(device)) for w in sorted(set(windows)) if w < t - 1}


# --- kernels ---------------------------------------------------------------------------------------
def _math(q, k, v, window: int, q_offset: int) -> torch.Tensor:
    # (B, T, H, D) in; computed in fp32 so it can serve as the ground truth for lower precisions.
    b, tq, h, d = q.shape
    tk, hkv = k.shape[1], k.shape[2]
    qf, kf, vf = (x.transpose(1, 2).float() for x in (q, k, v))
    if hkv != h:
        kf = kf.repeat_interleave(h // hkv, dim=1)
        vf = vf.repeat_interleave(h // hkv, dim=1)
    scores = (qf @ kf.transpose(-1, -2)) / math.sqrt(d)
    mask = causal_window_mask(tq, tk, window, q.device, q_offset)
    scores = scores.masked_fill(~mask, float("-inf"))
    y = torch.softmax(scores, dim=-1) @ vf
    return y.transpose(1, 2).to(q.dtype)


def _sdpa(q, k, v, window: int, q_offset: int) -> torch.Tensor:
    tq, tk = q.shape[1], k.shape[1]
    gqa = q.shape[2] != k.shape[2]
    qt, kt, vt = (x.transpose(1, 2) for x in (q, k, v))
    full = q_offset + tq - 1 <= window  # no query is old enough to lose a key to the window
    if full and q_offset == 0 and tq == tk:
        y = F.scaled_dot_product_attention(qt, kt, vt, is_causal=True, enable_gqa=gqa)
    elif tq == 1:
        # Single-token decode: every cached key up to the query is visible; just trim the window.
        start = max(0, q_offset - window)
        y = F.scaled_dot_product_attention(qt, kt[:, :, start:], vt[:, :, start:], enable_gqa=gqa)
    else:
        mask = causal_window_mask(tq, tk, window, q.device, q_offset)
        y = F.scaled_dot_product_attention(qt, kt, vt, attn_mask=mask, enable_gqa=gqa)
    return y.transpose(1, 2)


def _flex(q, k, v, window: int, q_offset: int, block_mask=None) -> torch.Tensor:
    tq, tk = q.shape[1], k.shape[1]
    cpu_grad = q.device.type == "cpu" and torch.is_grad_enabled() and (q.requires_grad or k.requires_grad)
    if q_offset != 0 or tq != tk or window >= tq - 1 or cpu_grad:
        # FlexAttention pays off only for windowed training/prefill; everything else is SDPA
        # (also CPU training: flex has no CPU backward in torch 2.13).
        return _sdpa(q, k, v, window, q_offset)
    if block_mask is None:
        block_mask = _sliding_block_mask(tq, window, str(q.device))
    qt, kt, vt = (x.transpose(1, 2) for x in (q, k, v))
    gqa = q.shape[2] != k.shape[2]
    if torch.compiler.is_compiling():
        # Inside a compiled model the outer graph compiles flex itself.
        return _flex_attention(qt, kt, vt, block_mask=block_mask, enable_gqa=gqa).transpose(1, 2)
    fn = _flex_fn(q.device.type)
    with warnings.catch_warnings():
        # Eager (uncompiled) flex warns on CPU that it is unoptimised; the result is still exact.
        warnings.simplefilter("ignore", UserWarning)
        y = fn(qt, kt, vt, block_mask=block_mask, enable_gqa=gqa)
    return y.transpose(1, 2)


def _fa_window(window: int, tk: int) -> tuple[int, int]:
    return (-1, 0) if window >= tk - 1 else (window, 0)


def attention(
    q, k, v, *, window: int, backend: str = "sdpa", q_offset: int = 0, block_mask=None
) -> torch.Tensor:
    """Causal attention of q (B, Tq, H, D) over k, v (B, Tk, Hkv, D); queries start at q_offset.
    `block_mask`: a precomputed FlexAttention mask for this (T, window) (see sliding_block_masks)."""
    if backend == "math":
        return _math(q, k, v, window, q_offset)
    if backend == "sdpa":
        return _sdpa(q, k, v, window, q_offset)
    if backend == "flex":
        return _flex(q, k, v, window, q_offset, block_mask)
    if backend in ("fa3", "flash"):
        if q_offset != 0 or q.shape[1] != k.shape[1]:
            return _sdpa(q, k, v, window, q_offset)
        mod = _kernel(backend)
        out = mod.flash_attn_func(q, k, v, causal=True, window_size=_fa_window(window, k.shape[1]))
        return out[0] if isinstance(out, tuple) else out  # some FA3 builds also return the LSE
    raise ValueError(f"unknown attention backend {backend!r}; expected one of {BACKENDS}")


def attention_with_cache(
    q, k, v, k_cache, v_cache, pos: int, *, window: int, backend: str = "sdpa"
) -> torch.Tensor:
    """Decode/prefill step: write k, v (B, Tq, Hkv, D) into the caches (B, Tmax, Hkv, D) at `pos`,
    then attend q (absolute positions pos..pos+Tq-1) over everything cached so far."""
    tq = q.shape[1]
    end = pos + tq
    if end > k_cache.shape[1]:
        raise ValueError(f"KV cache overflow: position {end} > cache length {k_cache.shape[1]}")
    if backend in ("fa3", "flash"):
        mod = _kernel(backend)
        seqlens = torch.full((q.shape[0],), pos, dtype=torch.int32, device=q.device)
        out = mod.flash_attn_with_kvcache(
            q,
            k_cache,
            v_cache,
            k=k,
            v=v,
            cache_seqlens=seqlens,
            causal=True,
            window_size=_fa_window(window, end),
        )
        return out[0] if isinstance(out, tuple) else out
    k_cache[:, pos:end] = k
    v_cache[:, pos:end] = v
    return attention(q, k_cache[:, :end], v_cache[:, :end], window=window, backend=backend, q_offset=pos)
