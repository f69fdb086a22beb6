"""The kernel report (shared/nanochat/kernel_report.py): what runs, and every slow fallback named
with its cause. GPU verdicts are exercised here by asking about a "cuda" device on a machine that
has none: every fast backend then fails, which is exactly the path that must not stay silent."""

from __future__ import annotations

import torch

from shared.nanochat import attention
from shared.nanochat.device import DeviceInfo
from shared.nanochat.kernel_report import kernel_report, layer_type, slow_fallbacks

CPU = DeviceInfo("cpu", "cpu", "cpu", "cpu", 1)


def test_cpu_report_names_kernels_per_layer_type(make_model):
    model = make_model(sequence_len=512)  # window pattern "SL": short window 128, then full
    report = kernel_report(model, CPU, torch.device("cpu"), torch.float32, compiled=False)
    assert report["attention"] == {"windowed": "sdpa", "full": "sdpa"}
    assert report["attention_kernels"]["windowed"] == "SDPA with a dense T x T boolean mask"
    assert report["attention_kernels"]["full"].startswith("SDPA is_causal")
    assert report["compute_dtype"] == "float32" and report["attn_backend_requested"] == "auto"
    assert report["slow_fallbacks"] == []  # CPU: slow paths are the only paths
    model.attn_backend = "math"
    report = kernel_report(model, CPU, torch.device("cpu"), torch.float32, compiled=False)
    assert report["attention"] == {"windowed": "math", "full": "math"}


def test_layer_type_follows_the_window_rule():
    assert (
        layer_type(63, 64) == "full" and layer_type(62, 64) == "windowed" and layer_type(2048, 64) == "full"
    )


def test_gpu_slow_fallbacks_name_their_cause(make_model):
    model = make_model()
    cuda = torch.device("cuda")
    report = {"attention": {"windowed": "sdpa", "full": "sdpa"}, "compiled": False, "graph_breaks": None}
    out = slow_fallbacks(report, model, cuda)
    assert len(out) == 2
    dense, eager = out
    assert dense.startswith("windowed attention layers run SDPA with a dense T x T mask (")
    # Under "auto" the cause lists why each faster kernel was passed over.
    assert (
        "fa3: needs a GPU" in dense and "flash: no Hub kernel in" in dense and "no flash_attn module" in dense
    )
    assert "flex: probe (head_dim 16) raised" in dense
    assert "eager" in eager and "compile=false" in eager

    model.attn_backend = "math"
    report = {"attention": {"windowed": "math", "full": "math"}, "compiled": True, "graph_breaks": 3}
    out = slow_fallbacks(report, model, cuda)
    assert out == [
        "windowed attention layers run the fp32 math reference (attn_backend='math' was requested)",
        "full attention layers run the fp32 math reference (attn_backend='math' was requested)",
        "torch.compile split the step into several graphs (3 graph breaks)",
    ]
    fast = {"attention": {"windowed": "fa3", "full": "fa3"}, "compiled": True, "graph_breaks": 0}
    assert slow_fallbacks(fast, model, cuda) == []


def test_missing_kernels_are_reported_not_raised(tmp_path, monkeypatch):
    attention.kernel_module.cache_clear()
    try:
        monkeypatch.setattr(attention, "HUB_KERNEL_DIR", tmp_path)
        km = attention.kernel_module("fa3")
        assert km.module is None
        assert f"no Hub kernel in {tmp_path}" in km.source and "no flash_attn_interface module" in km.source
        # A Hub kernel directory that cannot be loaded (here: no `kernels` package) is a reason too.
        (tmp_path / "flash-attn3").mkdir()
        attention.kernel_module.cache_clear()
        km = attention.kernel_module("fa3")
        assert km.module is None and "Hub kernel" in km.source and "failed to load" in km.source
        assert attention.backend_problem("fa3", "cpu") == "needs a GPU"
        assert attention.backend_problem("sdpa", "cpu", 64) is None
    finally:
        attention.kernel_module.cache_clear()
