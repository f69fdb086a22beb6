"""FP8 training matmuls (shared/nanochat/fp8.py): the scaling arithmetic, the three GEMMs against an
emulated reference, the model conversion, and a tiny model's FP8 loss curve against bf16.

torch 2.13 has a CPU `torch._scaled_mm`, so everything but the speed is checked here; the GPU
tests compare FP8 with bf16 on the device (and check that no matmul syncs with the host)."""

from __future__ import annotations

import pytest
import torch

from shared.nanochat import fp8
from shared.nanochat.config import GPTConfig
from shared.nanochat.fp8 import FNUZ, OCP, dequantize, fp8_linear, quantize
from shared.nanochat.gpt import GPT

FORMATS = [torch.float8_e4m3fn, torch.float8_e5m2, torch.float8_e4m3fnuz, torch.float8_e5m2fnuz]
MANTISSA_BITS = {
    torch.float8_e4m3fn: 3,
    torch.float8_e5m2: 2,
    torch.float8_e4m3fnuz: 3,
    torch.float8_e5m2fnuz: 2,
}


def test_format_ranges_and_device_choice():
    # The maxima the scales map amax to; fnuz e4m3 is 240, not 448 (MI300's format).
    assert [torch.finfo(d).max for d in FORMATS] == [448.0, 57344.0, 240.0, 57344.0]
    assert fp8.formats_for_arch("gfx942:sramecc+:xnack-") == FNUZ  # MI300X / MI325X
    assert fp8.formats_for_arch("gfx950") == OCP  # MI355X implements the OCP formats
    assert fp8.formats_for_arch(None) == OCP  # NVIDIA, CPU
    assert fp8.formats_for("cpu") == OCP
    assert (OCP.name, FNUZ.name) == ("e4m3fn/e5m2", "e4m3fnuz/e5m2fnuz")


@pytest.mark.parametrize("dtype", FORMATS)
def test_amax_maps_to_the_format_max_and_round_trips(dtype):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(64, 96, generator=g) * 3.0
    x8, inv = quantize(x, dtype)
    fp8_max = torch.finfo(dtype).max
    assert x8.dtype == dtype and inv.dtype == torch.float32 and inv.dim() == 0
    assert inv.item() == pytest.approx(x.abs().max().item() / fp8_max, rel=1e-6)
    # The largest element lands exactly on the format's max, so it survives the round trip.
    i = x.abs().argmax()
    assert abs(x8.flatten()[i].float().item()) == fp8_max
    back = dequantize(x8, inv)
    assert back.flatten()[i].item() == pytest.approx(x.flatten()[i].item(), rel=1e-6)
    # Every normal value is rounded to the nearest of 2**mantissa steps per octave.
    normal = x.abs() * (1 / inv) >= torch.finfo(dtype).smallest_normal
    rel = ((back - x).abs() / x.abs())[normal]
    assert rel.max() <= 2.0 ** -(MANTISSA_BITS[dtype] + 1) + 1e-6


@pytest.mark.parametrize("dtype", FORMATS)
def test_quantize_saturates_and_survives_extremes(dtype):
    # What a plain cast does on overflow depends on the device (CPU saturates, CUDA's cast gives
    # NaN): quantize clamps first so every device saturates.
    x = torch.tensor([1e30, -1e30, 1.0, 1e-30, 0.0])
    x8, inv = quantize(x, dtype)
    back = dequantize(x8, inv)
    assert torch.isfinite(back).all()
    assert back[0].item() == pytest.approx(1e30, rel=1e-6) and back[1].item() == pytest.approx(
        -1e30, rel=1e-6
    )
    assert back[2:].tolist() == [0.0, 0.0, 0.0]  # far below the scaled range: flushed to zero
    zeros8, zinv = quantize(torch.zeros(4, 4), dtype)  # all zero: finite scale, zeros back
    assert torch.isfinite(zinv) and dequantize(zeros8, zinv).abs().max() == 0


def _cpu_gemm_takes(dtype: torch.dtype) -> bool:
    """Whether this CPU's `_scaled_mm` accepts `dtype`: torch's oneDNN path (chosen on CPUs with
    AMX / AVX512-FP16) takes only the OCP formats, its fallback also the fnuz ones."""
    a = torch.ones(16, 16).to(dtype)
    one = torch.tensor(1.0)
    try:
        torch._scaled_mm(a, a.t(), scale_a=one, scale_b=one, out_dtype=torch.float32)
    except RuntimeError:
        return False
    return True


@pytest.mark.parametrize("formats", [OCP, FNUZ], ids=["ocp", "fnuz"])
def test_gemms_equal_the_emulated_reference(formats):
    """Each of the three GEMMs is the fp32 matmul of the dequantized operands (what `_scaled_mm`
    promises), and within the FP8 error of the full-precision matmul."""
    for dtype in (formats.forward, formats.backward):
        if not _cpu_gemm_takes(dtype):
            pytest.skip(f"this CPU's torch._scaled_mm does not take {dtype} (the fnuz formats are MI300's)")
    g = torch.Generator().manual_seed(1)
    x = torch.randn(2, 32, 64, generator=g, requires_grad=True)
    w = torch.randn(48, 64, generator=g, requires_grad=True)
    dy = torch.randn(2, 32, 48, generator=g)
    y = fp8_linear(x, w, formats)
    y.backward(dy)
    x8, xi = quantize(x.detach().reshape(-1, 64), formats.forward)
    w8, wi = quantize(w.detach(), formats.forward)
    dy8, di = quantize(dy.reshape(-1, 48), formats.backward)
    xq, wq, dyq = dequantize(x8, xi), dequantize(w8, wi), dequantize(dy8, di)
    assert torch.allclose(y.reshape(-1, 48), xq @ wq.t(), rtol=1e-5, atol=1e-5)
    assert torch.allclose(x.grad.reshape(-1, 64), dyq @ wq, rtol=1e-5, atol=1e-5)
    assert torch.allclose(w.grad, dyq.t() @ xq, rtol=1e-5, atol=1e-5)
    exact = x.detach() @ w.detach().t()
    assert ((y - exact).norm() / exact.norm()).item() < 0.06


def test_probe_accepts_this_cpu():
    assert fp8.unsupported_reason("cpu") is None
    assert "not supported on meta" in fp8.unsupported_reason("meta")


def _tiny(seed=0) -> GPT:
    cfg = GPTConfig(
        sequence_len=64, vocab_size=512, n_layer=2, n_head=2, n_kv_head=2, n_embd=128, window_pattern="SL"
    )
    torch.manual_seed(seed)
    model = GPT(cfg, compute_dtype=torch.bfloat16)
    model.init_weights()
    with torch.no_grad():  # zero-initialised output projections would hide the FP8 blocks' output
        for name, p in model.named_parameters():
            if name.endswith("c_proj.weight"):
                p.normal_(0.0, 0.05)
    return model


def test_conversion_keeps_weights_state_dict_and_eval_path():
    model = _tiny()
    params = {n: p for n, p in model.named_parameters()}
    state = {k: v.clone() for k, v in model.state_dict().items()}
    idx = torch.randint(0, 512, (2, 64), generator=torch.Generator().manual_seed(2))
    model.eval()
    with torch.no_grad():
        before = model(idx)
    assert fp8.enable_fp8(model, "cpu") == 2 * 6  # q, k, v, attention proj, MLP in + out per layer
    assert fp8.fp8_layers(model) == 12
    assert not isinstance(model.lm_head, fp8.Fp8Linear)  # logits stay bf16
    assert {n: p for n, p in model.named_parameters()}.keys() == params.keys()
    assert all(p is params[n] for n, p in model.named_parameters())  # same Parameters: optimizer intact
    assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())
    with torch.no_grad():
        assert torch.equal(model(idx), before)  # eval mode never runs FP8
        model.train()
        train_logits = model(idx)
    assert not torch.equal(train_logits, before)
    assert (train_logits - before).abs().max() < 0.25


def test_fp8_training_loss_tracks_bf16():
    """30 AdamW steps of a tiny bf16 model on a learnable sequence: the FP8 loss curve stays
    within 0.05 nats of bf16's at every step (measured: ~0.01), while both fall by > 3 nats."""
    g = torch.Generator().manual_seed(1)
    data = (torch.arange(65)[None] * torch.randint(1, 7, (8, 1), generator=g)) % 512
    curves = {}
    for use_fp8 in (False, True):
        model = _tiny()
        if use_fp8:
            fp8.enable_fp8(model, "cpu")
        opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
        losses = []
        for _ in range(30):
            loss = model(data[:, :-1], data[:, 1:])
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            losses.append(loss.item())
        curves[use_fp8] = losses
    assert curves[False][0] - curves[False][-1] > 3
    assert max(abs(a - b) for a, b in zip(curves[False], curves[True], strict=True)) < 0.05


def test_compiled_fp8_model_has_no_graph_breaks():
    model = _tiny(seed=3)
    fp8.enable_fp8(model, "cpu")
    model.train()
    idx = torch.randint(0, 512, (2, 64))
    torch._dynamo.reset()
    explained = torch._dynamo.explain(model)(idx, idx)
    assert (explained.graph_count, explained.graph_break_count) == (1, 0), explained.break_reasons


# --- GPU ------------------------------------------------------------------------------------------
def _gpu_fp8():
    if not torch.cuda.is_available():
        pytest.skip("no CUDA/ROCm device")
    reason = fp8.unsupported_reason("cuda")
    if reason:
        pytest.skip(reason)
    return torch.device("cuda")


@pytest.mark.gpu
def test_gpu_fp8_matmul_has_no_host_sync_and_matches_reference():
    dev = _gpu_fp8()
    formats = fp8.formats_for(dev)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(4096, 1024, generator=g).to(dev, torch.bfloat16).requires_grad_()
    w = torch.randn(2048, 1024, generator=g).to(dev).requires_grad_()
    dy = torch.randn(4096, 2048, generator=g).to(dev, torch.bfloat16)
    fp8_linear(x, w, formats).backward(dy)  # warm-up (cuBLAS handles, allocator)
    x.grad = w.grad = None
    torch.cuda.set_sync_debug_mode("error")
    try:
        y = fp8_linear(x, w, formats)
        y.backward(dy)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    exact = x.detach().float() @ w.detach().t()
    assert ((y.float() - exact).norm() / exact.norm()).item() < 0.06
    assert w.grad.dtype == torch.float32 and x.grad.dtype == torch.bfloat16


@pytest.mark.gpu
def test_gpu_fp8_loss_tracks_bf16():
    """A d4 model for 50 steps on the GPU: FP8 within 0.05 nats of bf16. Eager, to stay quick; the
    compiled FP8 path runs in bench/gpu_check.sh's d24 step and has no graph break (test above)."""
    dev = _gpu_fp8()
    cfg = GPTConfig(sequence_len=512, vocab_size=4096, n_layer=4, n_head=4, n_kv_head=4, n_embd=512)
    g = torch.Generator().manual_seed(1)
    data = ((torch.arange(513)[None] * torch.randint(1, 50, (16, 1), generator=g)) % 4096).to(dev)
    curves = {}
    for use_fp8 in (False, True):
        torch.manual_seed(0)
        model = GPT(cfg, compute_dtype=torch.bfloat16).to(dev)
        model.init_weights()
        if use_fp8:
            fp8.enable_fp8(model, dev)
        opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
        losses = []
        for _ in range(50):
            loss = model(data[:, :-1], data[:, 1:])
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            losses.append(loss.detach())
        curves[use_fp8] = [v.item() for v in losses]
    assert curves[False][0] - curves[False][-1] > 2
    assert max(abs(a - b) for a, b in zip(curves[False], curves[True], strict=True)) < 0.05
