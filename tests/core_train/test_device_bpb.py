"""device.py (detection, env defaults, dtype) and eval/bpb.py on hand-computable cases."""

from __future__ import annotations

import math

import pytest
import torch

from shared.nanochat import device as dev
from shared.nanochat import sizing
from shared.nanochat.eval.bpb import evaluate_bpb


def test_cpu_detection_and_dtype():
    info = dev.detect_device("cpu")
    assert (info.type, info.backend, info.gpu_key, info.peak_flops) == ("cpu", "cpu", "cpu", None)
    assert dev.choose_dtype("cpu") == torch.float32
    assert dev.choose_dtype("cpu", "bfloat16") == torch.bfloat16
    with pytest.raises(ValueError, match="dtype"):
        dev.choose_dtype("cpu", "int4")
    with pytest.raises(ValueError, match="device"):
        dev.detect_device("tpu")
    if not torch.cuda.is_available():
        assert dev.detect_device("auto").type in ("cpu", "mps")
        with pytest.raises(ValueError, match="no GPU"):
            dev.detect_device("rocm")


def test_alloc_conf_reaches_the_name_the_installed_torch_reads():
    # torch < 2.11 ignores expandable_segments under PYTORCH_ALLOC_CONF: mirror it to the alias
    for version in ("2.9.1+rocm6.4", "2.10.0"):
        env: dict[str, str] = {}
        applied = dev.apply_env_defaults(env, rocm=True, torch_version=version)
        assert env["PYTORCH_ALLOC_CONF"] == env["PYTORCH_CUDA_ALLOC_CONF"] == "expandable_segments:True"
        assert applied["PYTORCH_CUDA_ALLOC_CONF"] == "expandable_segments:True"
        deployed = {"PYTORCH_ALLOC_CONF": "expandable_segments:True"}  # set by compose / helm
        dev.apply_env_defaults(deployed, rocm=False, torch_version=version)
        assert deployed["PYTORCH_CUDA_ALLOC_CONF"] == "expandable_segments:True"
    env = {}
    dev.apply_env_defaults(env, rocm=False, torch_version="2.11.0")
    assert env == {"PYTORCH_ALLOC_CONF": "expandable_segments:True"}
    # an operator's value under an old name wins: no unified default that would override it
    for name in ("PYTORCH_CUDA_ALLOC_CONF", "PYTORCH_HIP_ALLOC_CONF"):
        for version in ("2.9.1", "2.13.0"):
            env = {name: "backend:native"}
            dev.apply_env_defaults(env, rocm=True, torch_version=version)
            assert env == {name: "backend:native", "HIP_FORCE_DEV_KERNARG": "1"}


def test_rocm_env_defaults_only_where_unset():
    env = {"PYTORCH_ALLOC_CONF": "backend:native"}  # the operator's explicit value wins
    applied = dev.apply_env_defaults(env, rocm=True, torch_version="2.13.0")
    assert applied == {"HIP_FORCE_DEV_KERNARG": "1"}
    assert env == {"PYTORCH_ALLOC_CONF": "backend:native", "HIP_FORCE_DEV_KERNARG": "1"}
    assert "HSA_OVERRIDE_GFX_VERSION" not in env  # never unless asked for
    env2: dict[str, str] = {}
    dev.apply_env_defaults(env2, rocm=True, hsa_override_gfx_version="9.4.2")
    assert env2["HSA_OVERRIDE_GFX_VERSION"] == "9.4.2"
    assert env2["PYTORCH_ALLOC_CONF"] == "expandable_segments:True"
    env3: dict[str, str] = {}
    dev.apply_env_defaults(env3, rocm=False, torch_version="2.13.0")
    assert env3 == {"PYTORCH_ALLOC_CONF": "expandable_segments:True"}


def test_visible_devices_env():
    assert dev.visible_devices_env("0, 2") == {"CUDA_VISIBLE_DEVICES": "0,2", "HIP_VISIBLE_DEVICES": "0,2"}
    assert dev.visible_devices_env([1]) == {"CUDA_VISIBLE_DEVICES": "1", "HIP_VISIBLE_DEVICES": "1"}
    with pytest.raises(ValueError, match="gpus"):
        dev.visible_devices_env("gpu0")


def test_init_distributed_single_process_is_a_no_op(monkeypatch):
    for k in ("WORLD_SIZE", "RANK", "LOCAL_RANK"):
        monkeypatch.delenv(k, raising=False)
    info = dev.init_distributed("cpu")
    assert (info.rank, info.world_size, info.is_main, info.is_distributed) == (0, 1, True, False)
    assert not torch.distributed.is_initialized()


def test_rocm_arch_names_a_peak_when_the_device_name_does_not():
    assert dev.rocm_arch_key("gfx942:sramecc+:xnack-") == "mi300x"
    assert dev.rocm_arch_key("gfx950") == "mi355x" and dev.rocm_arch_key("gfx1100") is None
    assert all(key in sizing.PEAK_FLOPS for key in dev.ROCM_ARCH_KEYS.values())


class FixedLogits(torch.nn.Module):
    """A 'model' whose next-token distribution is fixed: p(token) given by `probs` everywhere."""

    def __init__(self, probs: torch.Tensor):
        super().__init__()
        self.logp = torch.nn.Parameter(probs.log(), requires_grad=False)

    def forward(self, x, y, loss_reduction="mean"):
        logits = self.logp.expand(*x.shape, -1)
        return torch.nn.functional.cross_entropy(
            logits.reshape(-1, logits.size(-1)), y.reshape(-1), ignore_index=-1, reduction=loss_reduction
        )


def test_bpb_hand_computed():
    probs = torch.tensor([0.5, 0.25, 0.125, 0.125])
    token_bytes = torch.tensor([1, 2, 3, 0], dtype=torch.int32)  # id 3 is a special token
    model = FixedLogits(probs)
    x = torch.zeros(1, 5, dtype=torch.long)
    y = torch.tensor([[0, 1, 2, 3, -1]])  # special and ignored targets count for nothing
    bpb = evaluate_bpb(model, [(x, y, {"loader": "state"})], steps=1, token_bytes=token_bytes)
    # bits: -log2(.5) + -log2(.25) + -log2(.125) = 1 + 2 + 3 over 1 + 2 + 3 bytes
    assert bpb == pytest.approx(6 / 6)
    # two batches accumulate sums (not a mean of ratios)
    y2 = torch.tensor([[2, 2, -1, -1, -1]])
    bpb2 = evaluate_bpb(model, iter([(x, y), (x, y2)]), steps=2, token_bytes=token_bytes)
    assert bpb2 == pytest.approx((6 + 6) / (6 + 6))
    y3 = torch.tensor([[0, 0, 0, 0, 0]])
    assert evaluate_bpb(model, [(x, y3)], steps=1, token_bytes=token_bytes) == pytest.approx(
        5 * math.log2(2) / 5
    )
    # fewer batches than steps: stops at the end instead of raising
    assert evaluate_bpb(model, [(x, y)], steps=10, token_bytes=token_bytes) == pytest.approx(1.0)
    # only specials: no bytes, infinite bpb rather than a division by zero
    assert evaluate_bpb(model, [(x, torch.full((1, 5), 3))], steps=1, token_bytes=token_bytes) == math.inf
    with pytest.raises(ValueError, match="steps"):
        evaluate_bpb(model, [(x, y)], steps=0, token_bytes=token_bytes)
