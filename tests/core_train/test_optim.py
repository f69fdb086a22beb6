"""MuonAdamW against straightforward reference implementations, schedules, and distributed mode."""

from __future__ import annotations

import math
import os
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from shared.nanochat.optim import (
    POLAR_EXPRESS_COEFFS,
    MuonAdamW,
    OptimizerConfig,
    Schedule,
    apply_schedule,
    polar_express,
)

torch.set_num_threads(1)


# ------------------------------------------------------------------------------------------
# Reference Muon written the obvious way: one matrix at a time, no stacking, no lerp tricks.


def reference_muon_step(p, g, state, *, lr, momentum, wd, beta2, steps=5):
    rows, cols = p.shape
    buf = state.setdefault("buf", torch.zeros_like(p))
    buf.mul_(momentum).add_((1 - momentum) * g)
    u = (1 - momentum) * g + momentum * buf  # Nesterov
    # row equilibration to the mean row norm
    mean_row = u.norm() / math.sqrt(rows)
    u = u * (mean_row / u.norm(dim=1, keepdim=True).clamp_min(1e-6))
    x = u / (u.norm() * 1.01 + 1e-6)
    for a, b, c in POLAR_EXPRESS_COEFFS[:steps]:
        gram = x @ x.T  # always the "wide" form: (aI + bG + cG^2) X, valid for any shape
        x = a * x + b * gram @ x + c * gram @ gram @ x
    x = x * (math.sqrt(min(rows, cols)) / x.norm())
    # NorMuon: second moment of each row (rows >= cols) or column, then keep the Frobenius norm
    if rows >= cols:
        v = (x**2).mean(dim=1, keepdim=True)
    else:
        v = (x**2).mean(dim=0, keepdim=True)
    v2 = state.setdefault("v", torch.zeros_like(v))
    v2.mul_(beta2).add_((1 - beta2) * v)
    y = x / v2.clamp_min(1e-10).sqrt()
    y = y * (x.norm() / y.norm())
    lr_eff = lr * max(1.0, rows / cols) ** 0.5
    agree = (y * p >= 0).to(p.dtype)
    p.sub_(lr_eff * y + lr_eff * wd * p * agree)


def test_muon_matches_reference_per_matrix():
    torch.manual_seed(0)
    shapes = [(16, 48), (48, 16), (32, 32)]
    for shape in shapes:
        params = [torch.nn.Parameter(torch.randn(shape) * 0.1) for _ in range(3)]
        ref = [p.detach().clone() for p in params]
        ref_states = [{} for _ in ref]
        opt = MuonAdamW(
            [dict(kind="muon", params=params, lr=0.02, momentum=0.9, ns_steps=5, beta2=0.9, weight_decay=0.2)]
        )
        for step in range(6):
            grads = [torch.randn(shape) for _ in params]
            for p, g in zip(params, grads, strict=True):
                p.grad = g.clone()
            mom = 0.85 + 0.02 * step  # schedule changes must be honoured every step
            opt.param_groups[0]["momentum"] = mom
            opt.step()
            for r, s, g in zip(ref, ref_states, grads, strict=True):
                reference_muon_step(r, g, s, lr=0.02, momentum=mom, wd=0.2, beta2=0.9)
        for p, r in zip(params, ref, strict=True):
            torch.testing.assert_close(p.detach(), r, rtol=2e-4, atol=2e-5)
            assert not torch.equal(p.detach(), torch.zeros(shape))


def test_adamw_matches_torch_adamw():
    torch.manual_seed(1)
    p = torch.nn.Parameter(torch.randn(64, 8))
    q = torch.nn.Parameter(p.detach().clone())
    ours = MuonAdamW(
        [dict(kind="adamw", params=[p], lr=3e-3, betas=(0.8, 0.95), eps=1e-10, weight_decay=0.05)]
    )
    ref = torch.optim.AdamW([q], lr=3e-3, betas=(0.8, 0.95), eps=1e-10, weight_decay=0.05)
    for _ in range(8):
        g = torch.randn(64, 8)
        p.grad, q.grad = g.clone(), g.clone()
        ours.step()
        ref.step()
    torch.testing.assert_close(p.detach(), q.detach(), rtol=1e-5, atol=1e-6)


def test_polar_express_orthogonalizes_rectangular():
    torch.manual_seed(2)
    for shape in [(1, 32, 128), (1, 128, 32)]:
        g = torch.randn(shape)
        x = polar_express(g / (g.norm() * 1.01), 5)[0]
        s = torch.linalg.svdvals(x)
        # Polar Express trades exactness for speed: singular values land near 1, not on it.
        assert 0.7 < s.min() and s.max() < 1.25, s


def test_muon_group_rejects_mixed_shapes_and_unknown_kind():
    a, b = torch.nn.Parameter(torch.zeros(4, 4)), torch.nn.Parameter(torch.zeros(4, 8))
    with pytest.raises(ValueError, match="single shape"):
        MuonAdamW(
            [dict(kind="muon", params=[a, b], lr=0.1, momentum=0.9, ns_steps=5, beta2=0.9, weight_decay=0)]
        )
    with pytest.raises(ValueError, match="kind"):
        MuonAdamW([dict(kind="sgd", params=[a], lr=0.1)])


def test_optimizer_state_dict_round_trip_continues_identically():
    torch.manual_seed(3)

    def make():
        torch.manual_seed(4)
        ps = [torch.nn.Parameter(torch.randn(8, 16)) for _ in range(2)] + [
            torch.nn.Parameter(torch.randn(32, 4))
        ]
        return ps, MuonAdamW(
            [
                dict(
                    kind="muon",
                    params=ps[:2],
                    lr=0.02,
                    momentum=0.95,
                    ns_steps=5,
                    beta2=0.9,
                    weight_decay=0.1,
                ),
                dict(kind="adamw", params=ps[2:], lr=1e-2, betas=(0.8, 0.95), eps=1e-10, weight_decay=0.0),
            ]
        )

    grads = [[torch.randn(8, 16), torch.randn(8, 16), torch.randn(32, 4)] for _ in range(6)]
    ps, opt = make()
    for gs in grads:
        for p, g in zip(ps, gs, strict=True):
            p.grad = g.clone()
        opt.step()
    ps2, opt2 = make()
    for gs in grads[:3]:
        for p, g in zip(ps2, gs, strict=True):
            p.grad = g.clone()
        opt2.step()
    saved = opt2.state_dict()
    snapshot = [p.detach().clone() for p in ps2]
    ps3, opt3 = make()
    with torch.no_grad():
        for p, s in zip(ps3, snapshot, strict=True):
            p.copy_(s)
    opt3.load_state_dict(saved)
    for gs in grads[3:]:
        for p, g in zip(ps3, gs, strict=True):
            p.grad = g.clone()
        opt3.step()
    for a, b in zip(ps, ps3, strict=True):
        assert torch.equal(a.detach(), b.detach())


# ------------------------------------------------------------------------------------------
# Schedules (reference: linear warmup, constant, linear warmdown; momentum 0.85 -> 0.97 -> 0.90)


def test_schedule_values():
    s = Schedule(num_iterations=1000, weight_decay=0.2)
    assert s.lr_multiplier(0) == pytest.approx(1 / 40)
    assert s.lr_multiplier(39) == pytest.approx(1.0)
    assert s.lr_multiplier(350) == 1.0  # warmdown starts after step 1000 - 650 = 350
    assert s.lr_multiplier(1000) == pytest.approx(0.05)
    assert s.lr_multiplier(675) == pytest.approx(0.5 + 0.5 * 0.05)
    assert s.muon_momentum(0) == pytest.approx(0.85)
    assert s.muon_momentum(200) == pytest.approx(0.91)
    assert s.muon_momentum(349) == pytest.approx(0.85 + 0.12 * 349 / 400)  # warmup wins over warmdown
    assert s.muon_momentum(400) == pytest.approx(0.97 * (1 - 50 / 650) + 0.90 * 50 / 650)
    assert s.muon_momentum(1000) == pytest.approx(0.90)
    assert s.muon_weight_decay(0) == pytest.approx(0.2)
    assert s.muon_weight_decay(500) == pytest.approx(0.1)
    assert s.muon_weight_decay(1000) == pytest.approx(0.0, abs=1e-12)


def test_apply_schedule_scales_from_initial_lr():
    p = torch.nn.Parameter(torch.zeros(4, 4))
    q = torch.nn.Parameter(torch.zeros(3))
    opt = MuonAdamW(
        [
            dict(kind="muon", params=[p], lr=0.02, momentum=0.95, ns_steps=5, beta2=0.9, weight_decay=0.3),
            dict(kind="adamw", params=[q], lr=0.5, betas=(0.8, 0.95), eps=1e-10, weight_decay=0.0),
        ]
    )
    sched = Schedule(num_iterations=100, weight_decay=0.3)
    apply_schedule(opt, sched, 0)
    apply_schedule(opt, sched, 0)  # idempotent: scales the recorded peak, not the current value
    assert opt.param_groups[0]["lr"] == pytest.approx(0.02 / 40)
    assert opt.param_groups[1]["lr"] == pytest.approx(0.5 / 40)
    assert opt.param_groups[0]["momentum"] == pytest.approx(0.85)
    assert opt.param_groups[0]["weight_decay"] == pytest.approx(0.3)


@pytest.mark.parametrize(
    "kwargs,field",
    [
        (dict(num_iterations=0), "num_iterations"),
        (dict(num_iterations=10, warmdown_ratio=1.5), "warmdown_ratio"),
        (dict(num_iterations=10, final_lr_frac=-0.1), "final_lr_frac"),
        (dict(num_iterations=10, warmup_steps=-1), "warmup_steps"),
    ],
)
def test_bad_schedule_names_field(kwargs, field):
    with pytest.raises(ValueError, match=field):
        Schedule(**kwargs)


def test_bad_optimizer_config_names_field():
    with pytest.raises(ValueError, match="matrix_lr"):
        OptimizerConfig(matrix_lr=0)
    with pytest.raises(ValueError, match="weight_decay"):
        OptimizerConfig(weight_decay=-1)


# ------------------------------------------------------------------------------------------
# Distributed: 2 gloo ranks, each with its own gradients, against one process on their mean.

WORLD = 2
STEPS = 4


def _make_params():
    torch.manual_seed(123)
    muon3 = [torch.nn.Parameter(torch.randn(8, 24) * 0.1) for _ in range(3)]  # 3 stacks over 2 ranks: padding
    muon1 = [torch.nn.Parameter(torch.randn(24, 8) * 0.1)]  # rank 1 owns nothing
    big = torch.nn.Parameter(torch.randn(64, 32) * 0.1)  # >= 1024 elements: reduce-scattered rows
    small = torch.nn.Parameter(torch.randn(6))  # all-reduced
    odd = torch.nn.Parameter(torch.randn(33, 32) * 0.1)  # >= 1024 elements, 33 rows: all-reduced
    groups = [
        dict(kind="adamw", params=[big, odd], lr=1e-2, betas=(0.8, 0.95), eps=1e-10, weight_decay=0.01),
        dict(kind="adamw", params=[small], lr=5e-2, betas=(0.96, 0.95), eps=1e-10, weight_decay=0.0),
        dict(kind="muon", params=muon3, lr=0.02, momentum=0.95, ns_steps=5, beta2=0.9, weight_decay=0.1),
        dict(kind="muon", params=muon1, lr=0.02, momentum=0.95, ns_steps=5, beta2=0.9, weight_decay=0.1),
    ]
    return [big, small, odd, *muon3, *muon1], groups


def _grad(step, rank, shape, idx):
    gen = torch.Generator().manual_seed(1000 * step + 100 * rank + idx)
    return torch.randn(shape, generator=gen)


def _worker(rank, port, out_path):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=WORLD)
    try:
        params, groups = _make_params()
        opt = MuonAdamW(groups)
        for step in range(STEPS):
            for i, p in enumerate(params):
                p.grad = _grad(step, rank, p.shape, i)
            opt.step()
        if rank == 0:
            torch.save([p.detach() for p in params], out_path)
        # sharded state: each rank holds only its slice of the big AdamW tensor
        big_state = opt.state[params[0]]["exp_avg"]
        assert big_state.shape[0] == params[0].shape[0] // WORLD
        assert opt.state[params[2]]["exp_avg"].shape == params[2].shape  # rows not divisible: whole
        dist.barrier()  # no rank tears gloo down while a peer still talks to it
    finally:
        dist.destroy_process_group()


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_distributed_matches_single_process(tmp_path):
    out = tmp_path / "dist.pt"
    mp.spawn(_worker, args=(_free_port(), str(out)), nprocs=WORLD, join=True)
    dist_params = torch.load(out, weights_only=True)

    params, groups = _make_params()
    opt = MuonAdamW(groups)
    for step in range(STEPS):
        for i, p in enumerate(params):
            p.grad = sum(_grad(step, r, p.shape, i) for r in range(WORLD)) / WORLD
        opt.step()
    start, _ = _make_params()
    for p, d, s in zip(params, dist_params, start, strict=True):
        torch.testing.assert_close(d, p.detach(), rtol=1e-4, atol=1e-5)
        assert not torch.allclose(d, s.detach())  # something actually moved


def test_param_groups_match_reference_order_and_lrs():
    from shared.nanochat.config import GPTConfig
    from shared.nanochat.gpt import GPT
    from shared.nanochat.optim import build_param_groups

    cfg = GPTConfig(
        sequence_len=32, vocab_size=300, n_layer=3, n_head=2, n_kv_head=2, n_embd=128, window_pattern="L"
    )
    with torch.device("meta"):
        model = GPT(cfg)
    names = {id(p): n for n, p in model.named_parameters()}
    groups = build_param_groups(model, OptimizerConfig(), lr_scale=0.5, weight_decay=0.1)
    got = [(g["name"], [names[id(p)] for p in g["params"]]) for g in groups]
    scale = (128 / 768) ** -0.5
    blocks = [
        f"transformer.h.{i}.{m}.weight"
        for i in range(3)
        for m in ("attn.c_q", "attn.c_k", "attn.c_v", "attn.c_proj", "attn.ve_gate", "mlp.c_fc", "mlp.c_proj")
    ]
    shapes = {n: tuple(p.shape) for n, p in model.named_parameters()}
    blocks = [b for b in blocks if b in shapes]  # ve_gate only on value-embedding layers
    expected_muon = [
        (f"muon_{s[0]}x{s[1]}", [b for b in blocks if shapes[b] == s])
        for s in sorted({shapes[b] for b in blocks})
    ]
    assert got == [
        ("lm_head", ["lm_head.weight"]),
        ("wte", ["transformer.wte.weight"]),
        ("value_embeds", ["value_embeds.0.weight", "value_embeds.2.weight"]),
        ("resid_lambdas", ["resid_lambdas"]),
        ("x0_lambdas", ["x0_lambdas"]),
        ("smear", ["smear_gate.weight", "smear_lambda", "backout_lambda"]),
        *expected_muon,
    ]
    lr = {g["name"]: g["lr"] for g in groups}
    assert lr["lm_head"] == pytest.approx(0.008 * 0.5 * scale)
    assert lr["wte"] == pytest.approx(0.3 * 0.5 * scale)
    assert lr["value_embeds"] == pytest.approx(0.15 * 0.5 * scale)
    assert lr["resid_lambdas"] == pytest.approx(0.005 * 0.5)
    assert lr["x0_lambdas"] == pytest.approx(0.5 * 0.5)
    assert lr["smear"] == pytest.approx(0.2)
    muon = [g for g in groups if g["kind"] == "muon"]
    assert all(g["lr"] == pytest.approx(0.01) and g["weight_decay"] == 0.1 for g in muon)
    betas = {g["name"]: g["betas"] for g in groups if g["kind"] == "adamw"}
    assert betas == {
        "lm_head": (0.8, 0.96),
        "wte": (0.8, 0.995),
        "value_embeds": (0.8, 0.995),
        "resid_lambdas": (0.8, 0.95),
        "x0_lambdas": (0.96, 0.95),
        "smear": (0.8, 0.95),
    }


@pytest.mark.slow
def test_compiled_kernels_match_eager():
    """The GPU path compiles the update kernels (fullgraph): same result as eager, no graph break."""

    def run(compile_kernels):
        torch.manual_seed(0)
        ps = [torch.nn.Parameter(torch.randn(16, 32)) for _ in range(2)] + [
            torch.nn.Parameter(torch.randn(64, 8))
        ]
        opt = MuonAdamW(
            [
                dict(
                    kind="muon",
                    params=ps[:2],
                    lr=0.02,
                    momentum=0.95,
                    ns_steps=5,
                    beta2=0.9,
                    weight_decay=0.1,
                ),
                dict(kind="adamw", params=ps[2:], lr=1e-2, betas=(0.8, 0.95), eps=1e-10, weight_decay=0.01),
            ],
            compile_kernels=compile_kernels,
        )
        for s in range(3):
            g = torch.Generator().manual_seed(s)
            for p in ps:
                p.grad = torch.randn(p.shape, generator=g)
            opt.param_groups[0]["momentum"] = 0.9 + 0.01 * s  # a schedule change must not recompile
            opt.step()
        return [p.detach() for p in ps]

    torch._dynamo.reset()
    with torch._dynamo.config.patch(error_on_recompile=True):
        compiled = run(True)
    for a, b in zip(run(False), compiled, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
