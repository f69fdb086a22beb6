from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from shared.nanochat import sizing
from shared.nanochat.config import GPTConfig
from shared.nanochat.gpt import GPT, apply_rotary, rotary_tables


def reference_shapes(cfg: GPTConfig) -> dict[str, tuple[int, ...]]:
    """The reference checkpoint layout (MODEL_SPEC "Checkpoints"), spelled out independently."""
    c, pv, kv = cfg.n_embd, cfg.padded_vocab_size, cfg.n_kv_head * cfg.head_dim
    shapes = {
        "transformer.wte.weight": (pv, c),
        "lm_head.weight": (pv, c),
        "resid_lambdas": (cfg.n_layer,),
        "x0_lambdas": (cfg.n_layer,),
        "smear_gate.weight": (1, 24),
        "smear_lambda": (1,),
        "backout_lambda": (1,),
    }
    for i in range(cfg.n_layer):
        p = f"transformer.h.{i}."
        shapes[p + "attn.c_q.weight"] = (c, c)
        shapes[p + "attn.c_k.weight"] = (kv, c)
        shapes[p + "attn.c_v.weight"] = (kv, c)
        shapes[p + "attn.c_proj.weight"] = (c, c)
        shapes[p + "mlp.c_fc.weight"] = (4 * c, c)
        shapes[p + "mlp.c_proj.weight"] = (c, 4 * c)
        if i % 2 == (cfg.n_layer - 1) % 2:
            shapes[p + "attn.ve_gate.weight"] = (cfg.n_kv_head, 12)
            shapes[f"value_embeds.{i}.weight"] = (pv, kv)
    return shapes


@pytest.mark.parametrize(
    "cfg", [GPTConfig.from_depth(24), GPTConfig.from_depth(5, vocab_size=1000, n_kv_head=1)]
)
def test_state_dict_keys_and_shapes_are_the_references(cfg):
    with torch.device("meta"):
        model = GPT(cfg)
    got = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    assert got == reference_shapes(cfg)  # rotary tables are non-persistent: not in the checkpoint


def test_depth24_breakdown_on_meta_device():
    with torch.device("meta"):
        model = GPT(GPTConfig.from_depth(24))
    assert model.param_breakdown() == {
        "wte": 50_331_648,
        "value_embeds": 603_979_776,
        "lm_head": 50_331_648,
        "transformer_matrices": 679_478_976,
        "scalars": 74,
        "total": 1_384_122_122,
    }
    assert model.num_scaling_params() == 679_478_976 + 50_331_648


@pytest.mark.parametrize(
    "cfg",
    [
        GPTConfig.from_depth(4),
        GPTConfig.from_depth(12),
        GPTConfig.from_depth(20, window_pattern="L"),
        GPTConfig.from_depth(26, vocab_size=50_000, sequence_len=1024, n_kv_head=1),
        GPTConfig.from_depth(7, vocab_size=300, window_pattern="SSL"),
    ],
)
def test_formula_counts_equal_module_counts(cfg):
    with torch.device("meta"):
        model = GPT(cfg)
    assert sizing.param_breakdown(cfg) == model.param_breakdown()
    assert sizing.num_scaling_params(cfg) == model.num_scaling_params()
    assert sizing.num_matmul_params(cfg) == model.num_matmul_params()
    assert sizing.flops_per_token(cfg) == model.estimate_flops()


def test_estimate_flops_counts_gates_and_windows():
    cfg = GPTConfig.from_depth(4, window_pattern="SL")  # windows 512, 2048, 512, 2048
    pb = sizing.param_breakdown(cfg)
    matmul = pb["transformer_matrices"] + pb["lm_head"] + 24  # smear gate is a Linear too
    attn = 12 * cfg.n_head * cfg.head_dim * (512 + 2048 + 512 + 2048)
    assert sizing.flops_per_token(cfg) == 6 * matmul + attn


def test_meta_then_to_empty_then_init(make_config):
    cfg = make_config()
    with torch.device("meta"):
        model = GPT(cfg)
    model.to_empty(device="cpu")
    model.init_weights()
    torch.manual_seed(0)
    ref = GPT(cfg)
    ref.init_weights()
    # Rotary tables rebuilt by init_weights, identical to a model built directly on CPU.
    assert torch.equal(model.cos, ref.cos) and torch.equal(model.sin, ref.sin)
    idx = torch.randint(0, cfg.vocab_size, (1, 16))
    assert torch.isfinite(model(idx)).all()


def test_forward_shapes_loss_and_ignore_index(make_model):
    model = make_model()
    idx = torch.randint(0, 300, (2, 32))
    logits = model(idx)
    assert logits.shape == (2, 32, 300) and logits.dtype == torch.float32
    targets = torch.randint(0, 300, (2, 32))
    loss = model(idx, targets)
    assert loss.ndim == 0
    assert torch.allclose(loss, F.cross_entropy(logits.view(-1, 300), targets.view(-1)), atol=1e-5)
    per_tok = model(idx, targets, loss_reduction="none")
    assert per_tok.shape == (64,)
    targets[:, :10] = -1
    masked = model(idx, targets, loss_reduction="sum")
    assert torch.allclose(masked, per_tok.view(2, 32)[:, 10:].sum(), atol=1e-4)


def test_initial_loss_is_uniform(make_model):
    model = make_model(perturb=False)
    idx = torch.randint(0, 300, (2, 64))
    assert abs(model(idx, idx).item() - math.log(300)) < 0.05  # lm_head std 0.001 -> near-uniform


def test_logits_are_softcapped(make_model):
    model = make_model()
    with torch.no_grad():
        model.lm_head.weight.normal_(0.0, 50.0)
    logits = model(torch.randint(0, 300, (1, 16)))
    assert logits.abs().max() <= 15.0
    assert logits.abs().max() > 14.0  # the cap is what bounds them, not small weights


def test_causal(make_model):
    model = make_model()
    idx = torch.randint(0, 300, (1, 40))
    other = idx.clone()
    other[0, 30:] = (other[0, 30:] + 1) % 300
    a, b = model(idx), model(other)
    assert torch.allclose(a[:, :30], b[:, :30], atol=1e-6)
    assert not torch.allclose(a[:, 30:], b[:, 30:], atol=1e-3)


def test_rotary_rotates_by_minus_theta():
    cos, sin = rotary_tables(8, 4)
    x = torch.randn(1, 8, 1, 4)
    y = apply_rotary(x, cos, sin)
    # Pair (x[i], x[i + d/2]) as a complex number; the reference multiplies by exp(-i * t * w).
    t = torch.arange(8, dtype=torch.float32)[:, None]
    w = 1.0 / (100_000 ** (torch.arange(0, 4, 2, dtype=torch.float32) / 4))
    z = torch.complex(x[0, :, 0, :2], x[0, :, 0, 2:]) * torch.exp(-1j * t * w)
    assert torch.allclose(y[0, :, 0, :2], z.real, atol=1e-6)
    assert torch.allclose(y[0, :, 0, 2:], z.imag, atol=1e-6)


def test_init_statistics():
    torch.manual_seed(0)
    cfg = GPTConfig(sequence_len=64, vocab_size=4096, n_layer=6, n_head=4, n_kv_head=4, n_embd=256)
    model = GPT(cfg)
    model.init_weights()
    d = cfg.n_embd
    assert abs(model.transformer.wte.weight.std().item() - 0.8) < 0.02
    assert abs(model.lm_head.weight.std().item() - 0.001) < 0.0001
    for block in model.transformer.h:
        for w in (block.attn.c_q.weight, block.attn.c_k.weight, block.attn.c_v.weight):
            assert abs(w.std().item() * math.sqrt(d) - 1.0) < 0.05
            assert w.abs().max().item() <= math.sqrt(3 / d) + 1e-6  # uniform, no outliers
        assert abs(block.mlp.c_fc.weight.std().item() * math.sqrt(d) - 0.4) < 0.02
        assert block.attn.c_proj.weight.abs().sum() == 0 and block.mlp.c_proj.weight.abs().sum() == 0
        if block.attn.ve_gate is not None:
            g = block.attn.ve_gate.weight
            assert g.min() >= 0 and g.max() <= 0.02
    for ve in model.value_embeds.values():
        assert abs(ve.weight.std().item() * math.sqrt(d) - 1.0) < 0.05
    assert torch.allclose(model.resid_lambdas, torch.linspace(1.15, 1.05, 6))
    assert torch.allclose(model.x0_lambdas, torch.linspace(0.20, 0.05, 6))
    assert model.smear_lambda.item() == 0.0 and abs(model.backout_lambda.item() - 0.2) < 1e-7
    assert 0 <= model.smear_gate.weight.min() and model.smear_gate.weight.max() <= 0.02


def test_every_parameter_gets_a_gradient(make_model):
    model = make_model()
    model.train()
    idx = torch.randint(0, 300, (2, 32))
    model(idx, idx).backward()
    missing = [n for n, p in model.named_parameters() if p.grad is None or p.grad.abs().sum() == 0]
    assert missing == []


@pytest.mark.parametrize("name", ["smear_lambda", "backout_lambda"])
def test_scalar_features_change_the_output(make_model, name):
    model = make_model()
    idx = torch.randint(0, 300, (1, 24))
    before = model(idx)
    with torch.no_grad():
        getattr(model, name).fill_(0.0)
    assert not torch.allclose(before, model(idx), atol=1e-4)


def test_bf16_compute_keeps_fp32_masters_and_fp32_logits(make_config):
    torch.manual_seed(0)
    model = GPT(make_config(), compute_dtype=torch.bfloat16)
    model.init_weights()
    assert model.transformer.wte.weight.dtype == torch.bfloat16  # embeddings stored in compute dtype
    assert model.lm_head.weight.dtype == torch.float32
    idx = torch.randint(0, 300, (1, 16))
    logits = model(idx)
    assert logits.dtype == torch.float32 and torch.isfinite(logits).all()
    ref = GPT(make_config())
    ref.load_state_dict({k: v.float() for k, v in model.state_dict().items()})
    ref.init_rotary()
    assert (model(idx) - ref(idx)).abs().max() < 0.05


def test_sequence_beyond_rotary_table_is_an_error(make_model):
    model = make_model()
    with pytest.raises(ValueError, match="rotary"):
        model(torch.zeros(1, 64 * 10 + 1, dtype=torch.long))
