from __future__ import annotations

import json
import math

import pytest

from services.cli.main import main
from shared.nanochat import sizing
from shared.nanochat.config import GPTConfig

D24 = {
    "wte": 50_331_648,
    "value_embeds": 603_979_776,
    "lm_head": 50_331_648,
    "transformer_matrices": 679_478_976,
    "scalars": 74,
    "total": 1_384_122_122,
}


def test_depth24_breakdown_by_formula():
    assert sizing.param_breakdown(GPTConfig.from_depth(24)) == D24


def test_auto_batch_follows_power_lines():
    # d12 is the reference: 2**19 tokens, LR scale 1, weight decay unchanged.
    p12 = sizing.plan(12)
    assert p12.total_batch_size == 2**19 and p12.batch_lr_scale == 1.0
    assert p12.weight_decay == pytest.approx(0.28)
    p24 = sizing.plan(24)
    n12 = sizing.num_scaling_params(GPTConfig.from_depth(12))
    n24 = D24["transformer_matrices"] + D24["lm_head"]
    want = 2 ** round(math.log2(2**19 * (n24 / n12) ** 0.383))
    assert p24.total_batch_size == want == 2**20
    assert p24.batch_lr_scale == pytest.approx(math.sqrt(2))
    assert p24.weight_decay == pytest.approx(0.28 * math.sqrt(2) * n12 / n24)
    assert p24.lrs["matrix_lr"] == pytest.approx(0.02 * math.sqrt(2))
    assert p24.target_tokens == 12 * n24
    assert p24.num_iterations == (12 * n24) // 2**20
    assert p24.grad_accum_steps == 2**20 // (32 * 2048)
    assert p24.total_tokens == p24.num_iterations * 2**20


def test_horizon_precedence():
    explicit = sizing.plan(12, num_iterations=10, target_flops=1e18)
    assert explicit.num_iterations == 10 and explicit.horizon_from == "num_iterations"
    by_flops = sizing.plan(12, target_flops=1e18)
    assert by_flops.num_iterations == round(1e18 / (by_flops.flops_per_token * 2**19))
    assert sizing.plan(12, target_param_data_ratio=8).num_iterations == int(8 * 110_100_912) // 2**19


def test_wall_time_and_mfu():
    p = sizing.plan(24, gpus=8, gpu="h100", mfu=0.5, device_batch_size=16)
    tok_s = 989e12 * 8 * 0.5 / p.flops_per_token
    assert p.est_tokens_per_sec == pytest.approx(tok_s)
    assert p.est_seconds == pytest.approx(p.total_tokens / tok_s)
    assert sizing.mfu(p.flops_per_token, tok_s, 989e12, world_size=8) == pytest.approx(0.5)
    assert sizing.mfu(1e9, 1e3, None) is None
    assert p.grad_accum_steps == 2**20 // (16 * 2048 * 8)


def test_gpu_names():
    assert sizing.gpu_key("NVIDIA H100 80GB HBM3") == "h100"
    assert sizing.gpu_key("NVIDIA H100 PCIe") == "h100-pcie"
    assert sizing.gpu_key("AMD Instinct MI300X") == "mi300x"
    assert sizing.gpu_key("AMD Instinct MI325X") == "mi325x"
    assert sizing.gpu_key("NVIDIA H200") == "h200"
    assert sizing.gpu_key("NVIDIA A100-SXM4-80GB") == "a100"
    assert sizing.gpu_key("cpu") == "cpu"
    assert sizing.gpu_key("Some Unknown GPU") is None
    assert sizing.peak_flops("mi300x") == 1307.4e12 and sizing.peak_flops("cpu") is None
    assert sizing.detect_gpu() in sizing.PEAK_FLOPS


def test_cpu_plan_has_no_wall_time():
    p = sizing.plan(4, vocab_size=300, seq_len=64, device_batch_size=4, gpu="cpu", total_batch_size=512)
    assert p.est_seconds is None and p.grad_accum_steps == 2


@pytest.mark.parametrize(
    "kwargs, field",
    [
        (dict(total_batch_size=1000), "total_batch_size"),
        (dict(device_batch_size=0), "device_batch_size"),
        (dict(gpus=0), "gpus"),
        (dict(mfu=1.5), "mfu"),
        (dict(gpu="tpu-v9"), "gpu"),
        (dict(num_iterations=0), "num_iterations"),
        (dict(target_param_data_ratio=0), "target_param_data_ratio"),
    ],
)
def test_bad_plans_name_the_field(kwargs, field):
    with pytest.raises(ValueError, match=field):
        sizing.plan(12, **kwargs)


def test_ncp_plan_json(capsys):
    assert main(["plan", "--depth", "24", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["param_breakdown"] == D24
    assert out["total_batch_size"] == 2**20 and out["grad_accum_steps"] == 16
    assert out["flops_per_token"] == sizing.flops_per_token(GPTConfig.from_depth(24))
    assert out["est_seconds"] > 0


def test_ncp_plan_table_and_bad_input(capsys):
    assert main(["plan", "--depth", "12", "--gpu", "h100", "--gpus", "8"]) == 0
    out = capsys.readouterr().out
    assert "params total                 286,261,730" in out
    assert "524,288 tokens (auto)" in out and "est. wall time" in out
    assert main(["plan", "--depth", "12", "--total-batch-size", "1000"]) == 2
    assert "total_batch_size" in capsys.readouterr().err
