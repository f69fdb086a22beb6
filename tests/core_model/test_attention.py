"""Every attention backend this machine has must equal the fp32 math reference."""

from __future__ import annotations

import pytest
import torch

from shared.nanochat.attention import (
    attention,
    attention_with_cache,
    available_backends,
    causal_window_mask,
    select_backend,
)

CPU_BACKENDS = [b for b in available_backends("cpu") if b != "math"]


def qkv(b=2, t=48, h=4, hkv=2, d=16, seed=0, dtype=torch.float32, device="cpu"):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(b, t, h, d, generator=g)
    k = torch.randn(b, t, hkv, d, generator=g)
    v = torch.randn(b, t, hkv, d, generator=g)
    return (x.to(device=device, dtype=dtype) for x in (q, k, v))


def test_mask_semantics_match_flash_attention_window():
    m = causal_window_mask(4, 4, window=1, device="cpu")
    # query i sees keys i-1..i: FlashAttention's window_size=(1, 0)
    assert m.int().tolist() == [[1, 0, 0, 0], [1, 1, 0, 0], [0, 1, 1, 0], [0, 0, 1, 1]]


def test_math_reference_against_explicit_loop():
    q, k, v = qkv(b=1, t=10, h=2, hkv=1, d=4)
    y = attention(q, k, v, window=3, backend="math")
    for i in range(10):
        lo = max(0, i - 3)
        s = (q[0, i, 0] @ k[0, lo : i + 1, 0].T) / 2.0
        want = torch.softmax(s, -1) @ v[0, lo : i + 1, 0]
        assert torch.allclose(y[0, i, 0], want, atol=1e-5)


def test_cpu_has_sdpa_and_flex():
    assert {"sdpa", "flex", "math"} <= set(available_backends("cpu"))


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("window", [47, 100, 16, 5])
@pytest.mark.parametrize("hkv", [4, 2, 1])
def test_backend_equals_math(backend, window, hkv):
    q, k, v = qkv(hkv=hkv)
    want = attention(q, k, v, window=window, backend="math")
    got = attention(q, k, v, window=window, backend=backend)
    assert torch.allclose(got, want, atol=1e-5), (got - want).abs().max()


@pytest.mark.parametrize("backend", CPU_BACKENDS + ["math"])
@pytest.mark.parametrize("window", [100, 7])
@pytest.mark.parametrize("chunks", [[48], [20, 1, 1, 26], [1] * 12 + [36], [30, 18]])
def test_cached_decode_equals_full(backend, window, chunks):
    """Prefill + chunked/single-token decode through the cache gives the full-sequence output."""
    q, k, v = qkv()
    want = attention(q, k, v, window=window, backend="math")
    k_cache = torch.zeros(2, 64, 2, 16)
    v_cache = torch.zeros(2, 64, 2, 16)
    outs, pos = [], 0
    for n in chunks:
        sl = slice(pos, pos + n)
        outs.append(
            attention_with_cache(
                q[:, sl], k[:, sl], v[:, sl], k_cache, v_cache, pos, window=window, backend=backend
            )
        )
        pos += n
    got = torch.cat(outs, dim=1)
    assert torch.allclose(got, want, atol=1e-5), (got - want).abs().max()


def test_cache_overflow_is_an_error():
    q, k, v = qkv(t=4)
    with pytest.raises(ValueError, match="overflow"):
        attention_with_cache(q, k, v, torch.zeros(2, 3, 2, 16), torch.zeros(2, 3, 2, 16), 0, window=8)


def test_backend_probe():
    from shared.nanochat.attention import backend_works

    assert backend_works("sdpa", "cpu", 64) and backend_works("flex", "cpu", 64)
    assert not backend_works("fa3", "cpu", 64)  # not importable here: the probe fails, not crashes


def test_backend_probe_runs_backward_even_under_inference_mode():
    """The probe also checks the training backward (a kernel build may lack a windowed or large-head
    backward). Model setup often runs under no_grad / inference_mode, which must not fail it."""
    from shared.nanochat.attention import GRAD_PROBE_TOL, _grad_error, _math, backend_works

    with torch.inference_mode():
        assert backend_works("sdpa", "cpu", 48)  # a head size no other test has probed (cached)
    with torch.no_grad():
        assert backend_works("flex", "cpu", 40)
    g = torch.Generator().manual_seed(0)
    for dtype in (torch.float32, torch.bfloat16):
        q, k, v = (torch.randn(1, 256, h, 64, generator=g, dtype=dtype) for h in (4, 2, 2))
        dy = torch.randn(1, 256, 4, 64, generator=g, dtype=dtype)
        sdpa = _grad_error(lambda a, b, c: attention(a, b, c, window=64, backend="sdpa"), q, k, v, dy)
        assert sdpa < GRAD_PROBE_TOL / 5
        for w in (63, 65, 10**6):  # window off by one either way, or ignored: rejected
            assert _grad_error(lambda a, b, c, w=w: _math(a, b, c, w, 0), q, k, v, dy) > GRAD_PROBE_TOL


def test_select_backend():
    assert select_backend("cpu", 512, 2048) == "sdpa"
    assert select_backend("cpu", 512, 2048, requested="flex") == "flex"
    assert select_backend("cpu", 512, 2048, requested="math") == "math"
    with pytest.raises(ValueError, match="attn_backend"):
        select_backend("cpu", 512, 2048, requested="fa3")
    with pytest.raises(ValueError, match="attn_backend"):
        select_backend("cpu", 512, 2048, requested="nope")


def test_gpt_output_identical_across_cpu_backends(make_model):
    idx = torch.randint(0, 300, (2, 200))
    outs = {}
    for backend in CPU_BACKENDS + ["math"]:
        model = make_model(seed=3, sequence_len=512)  # 128-token windows on the S layers
        model.attn_backend = backend
        with torch.no_grad():  # FlexAttention has no CPU backward; under grad it defers to SDPA
            outs[backend] = model(idx)
        used = model._attention_setup(200, idx.device, torch.float32, True)
        assert used[0] == [backend] * 4 and bool(used[1]) == (backend == "flex")
    for backend, out in outs.items():
        assert torch.allclose(out, outs["math"], atol=1e-4), backend


def _gpu_device():
    if not torch.cuda.is_available():
        pytest.skip("no CUDA/ROCm device")
    return "cuda"


GPU_BACKENDS = ["fa3", "flash", "flex", "sdpa"]


@pytest.mark.gpu
@pytest.mark.parametrize("backend", GPU_BACKENDS)
@pytest.mark.parametrize("window", [2047, 512, 100])
@pytest.mark.parametrize("hkv", [8, 2])
def test_gpu_backend_equals_math(backend, window, hkv):
    dev = _gpu_device()
    if backend not in available_backends(dev):
        pytest.skip(f"{backend} not available on this device")
    q, k, v = qkv(b=2, t=2048, h=8, hkv=hkv, d=128, dtype=torch.bfloat16, device=dev)
    want = attention(q, k, v, window=window, backend="math").float()
    got = attention(q, k, v, window=window, backend=backend).float()
    assert (got - want).abs().max() < 2e-2


@pytest.mark.gpu
@pytest.mark.parametrize("backend", GPU_BACKENDS)
@pytest.mark.parametrize("head_dim", [128, 64])
def test_gpu_backend_backward_equals_math(backend, head_dim):
    """Training needs the backward too: dq/dk/dv within the probe's tolerance of the fp32 math."""
    from shared.nanochat.attention import GRAD_PROBE_TOL, _grad_error

    dev = _gpu_device()
    if backend not in available_backends(dev):
        pytest.skip(f"{backend} not available on this device")
    q, k, v = qkv(b=1, t=256, h=4, hkv=2, d=head_dim, dtype=torch.bfloat16, device=dev)
    dy = torch.randn_like(q)
    err = _grad_error(lambda a, b, c: attention(a, b, c, window=64, backend=backend), q, k, v, dy)
    assert err < GRAD_PROBE_TOL / 2, err


@pytest.mark.gpu
@pytest.mark.parametrize("backend", GPU_BACKENDS)
def test_gpu_cached_decode_equals_full(backend):
    dev = _gpu_device()
    if backend not in available_backends(dev):
        pytest.skip(f"{backend} not available on this device")
    q, k, v = qkv(b=2, t=300, h=8, hkv=2, d=128, dtype=torch.bfloat16, device=dev)
    want = attention(q, k, v, window=128, backend="math").float()
    k_cache = torch.zeros(2, 512, 2, 128, dtype=torch.bfloat16, device=dev)
    v_cache = torch.zeros_like(k_cache)
    outs, pos = [], 0
    for n in [200, 1, 1, 98]:
        sl = slice(pos, pos + n)
        outs.append(
            attention_with_cache(
                q[:, sl], k[:, sl], v[:, sl], k_cache, v_cache, pos, window=128, backend=backend
            )
        )
        pos += n
    assert (torch.cat(outs, 1).float() - want).abs().max() < 2e-2


def test_model_reports_its_backends(make_model):
    model = make_model()
    assert model.attention_backends() == ["sdpa"] * 4  # auto on CPU
    model.attn_backend = "math"
    assert model.attention_backends() == ["math"] * 4


def test_unknown_backend_is_rejected(make_config):
    from shared.nanochat.gpt import GPT

    with pytest.raises(ValueError, match="attn_backend"):
        GPT(make_config(), attn_backend="cudnn")


def test_compiled_model_has_no_graph_breaks(make_model):
    """Backends and FlexAttention masks are looked up, not built, inside a compiled forward."""
    for backend in ("flex", "sdpa"):
        model = make_model(seed=1, sequence_len=512, n_layer=2)
        model.attn_backend = backend
        model.init_weights()  # warms the training-shape attention setup eagerly
        idx = torch.randint(0, 300, (1, 512))
        torch._dynamo.reset()
        with torch.no_grad():
            explained = torch._dynamo.explain(model)(idx)
        assert (explained.graph_count, explained.graph_break_count) == (1, 0), explained.break_reasons


@pytest.mark.gpu
def test_gpu_model_training_step_matches_across_backends():
    """Loss and gradients of a bf16 model with auto-selected kernels (FA3 / flash / compiled flex)
    match the same model on plain SDPA."""
    dev = _gpu_device()
    from shared.nanochat.config import GPTConfig
    from shared.nanochat.gpt import GPT

    cfg = GPTConfig(sequence_len=1024, vocab_size=512, n_layer=4, n_head=4, n_kv_head=4, n_embd=256)
    grads = {}
    for backend in ("sdpa", "auto"):
        torch.manual_seed(0)
        model = GPT(cfg, attn_backend=backend, compute_dtype=torch.bfloat16).to(dev)
        model.init_weights()
        with torch.no_grad():
            for name, p in model.named_parameters():
                if name.endswith("c_proj.weight"):
                    p.normal_(0.0, 0.02)
        idx = torch.randint(0, 512, (2, 1024), generator=torch.Generator().manual_seed(1)).to(dev)
        loss = model(idx, idx)
        loss.backward()
        grads[backend] = (loss.item(), model.blocks[0].attn.c_q.weight.grad.float().clone())
    assert abs(grads["auto"][0] - grads["sdpa"][0]) < 1e-2
    rel = (grads["auto"][1] - grads["sdpa"][1]).norm() / grads["sdpa"][1].norm()
    assert rel < 5e-2


def test_loaded_flash_kernel_is_called_without_graph_breaks(monkeypatch):
    """A compiled model reaches FA3 / flash through a plain dict of loaded modules: tracing the
    cached loader instead (os.stat inside) broke the graph at every attention call. The kernel
    here is an exact stand-in with FlashAttention's interface, since CPUs have no flash kernel."""
    from types import SimpleNamespace

    from shared.nanochat import attention as attn

    def flash_attn_func(q, k, v, causal, window_size):
        assert causal
        return attn._math(q, k, v, k.shape[1] if window_size[0] < 0 else window_size[0], 0)

    monkeypatch.setitem(attn._LOADED, "flash", SimpleNamespace(flash_attn_func=flash_attn_func))
    q, k, v = qkv(b=1, t=128, h=4, hkv=2, d=32)

    def two_layers(q, k, v):
        y = attention(q.sin(), k, v, window=64, backend="flash")
        return attention(y, k, v, window=127, backend="flash")

    want = attention(attention(q.sin(), k, v, window=64, backend="math"), k, v, window=127, backend="math")
    torch._dynamo.reset()
    explained = torch._dynamo.explain(two_layers)(q, k, v)
    assert (explained.graph_count, explained.graph_break_count) == (1, 0), explained.break_reasons
    assert torch.allclose(two_layers(q, k, v), want, atol=1e-5)
