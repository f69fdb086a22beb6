"""POST /plan: the pretraining plan of a job spec before it is submitted, from sizing.plan()."""

from __future__ import annotations

import pytest
from fastapi.testclient import TestClient

from services.api.app import create_app
from shared.jobs.spec import JobSpec, demo_spec
from shared.nanochat import sizing


@pytest.fixture
def client(settings):
    with TestClient(create_app(settings)) as c:
        yield c


pytestmark = pytest.mark.parametrize("db_url", ["sqlite"], indirect=True)


def test_demo_plan(client):
    spec = demo_spec()
    body = client.post("/plan", json=spec.model_dump(mode="json")).json()
    expected = sizing.param_breakdown(spec.model.gpt_config())
    assert body["trains"] is True and body["params"] == expected["total"]
    assert body["num_iterations"] == 40 and body["horizon_from"] == "num_iterations"
    assert body["gpu"] == "cpu" and body["est_seconds"] is None  # a CPU job has no peak FLOPs
    assert body["total_flops"] == pytest.approx(body["flops_per_token"] * 40 * 1024)


def test_d24_plan_on_a_chosen_gpu(client):
    spec = {"kind": "pipeline", "model": {"depth": 24}, "hardware": {"gpus": 8}}
    h100 = client.post("/plan", params={"gpu": "h100"}, json=spec).json()
    mi300 = client.post("/plan", params={"gpu": "mi300x"}, json=spec).json()
    assert h100["params"] == 1_384_122_122 and h100["gpus"] == 8  # README's d24 figure
    assert h100["horizon_from"] == "target_param_data_ratio" and h100["num_iterations"] > 1000
    # same work, faster peak -> shorter estimate, in proportion to the peak FLOPs
    ratio = h100["est_seconds"] / mi300["est_seconds"]
    assert ratio == pytest.approx(sizing.PEAK_FLOPS["mi300x"] / sizing.PEAK_FLOPS["h100"])


def test_plan_matches_the_trainers_own_sizing(client):
    """The worker maps the spec to TrainConfig and the trainer calls sizing.plan with it; the API's
    plan must come out the same (auto batch, auto horizon)."""
    pytest.importorskip("torch")
    from services.worker.training import pretrain_config
    from shared.nanochat.train import TrainConfig

    spec = JobSpec.model_validate({"model": {"depth": 12}, "hardware": {"gpus": 2}})
    tc = TrainConfig.from_dict(
        pretrain_config(
            spec.model_dump(mode="json"), data_dir="d", tokenizer_dir="t", ckpt_dir="c", resume=False
        )
    )
    trainer = sizing.plan(
        tc.depth, vocab_size=spec.model.vocab_size, seq_len=tc.max_seq_len, device_batch_size=tc.device_batch_size,
        gpus=2, gpu="h100", target_param_data_ratio=tc.target_param_data_ratio,
        total_batch_size=tc.total_batch_size, num_iterations=tc.num_iterations, target_flops=tc.target_flops,
        aspect_ratio=tc.aspect_ratio, head_dim=tc.head_dim, n_kv_head=tc.n_kv_head,
        window_pattern=tc.window_pattern, weight_decay=tc.weight_decay,
    )  # fmt: skip
    api = client.post("/plan", params={"gpu": "h100"}, json=spec.model_dump(mode="json")).json()
    assert api["detail"] == trainer.to_dict()


def test_plan_errors_name_the_field(client):
    resp = client.post("/plan", json={"model": {"depth": 0}})
    assert resp.status_code == 422 and resp.json()["error"]["field"] == "model.depth"
    resp = client.post("/plan", params={"gpu": "tpu9"}, json={"model": {"depth": 4}})
    assert resp.status_code == 422 and resp.json()["error"]["field"] == "gpu"
    resp = client.post("/plan", json={"model": {"depth": 4}, "horizon": {"target_flops": 1.0}})
    assert resp.status_code == 422 and resp.json()["error"]["field"] == "horizon.target_flops"
    gpus = client.get("/plan/gpus").json()
    assert gpus["default"] in gpus["peak_flops"] and gpus["peak_flops"]["cpu"] is None


def test_job_without_pretraining_has_nothing_to_plan(client):
    body = client.post("/plan", json={"kind": "eval", "parent_job_id": "abc"}).json()
    assert body["trains"] is False and body["params"] is None
