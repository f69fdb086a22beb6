"""The multi-node pod command of k8s.py, run for real: two "nodes" as two torchrun agents on this
machine (CPU, gloo), meeting through the static rendezvous (node rank 0 hosts it), train a tiny
model to the end. scripts/e2e_compose.sh runs the chart's command as two containers, pod 0's DNS
name resolving late.

Only what Kubernetes would provide is substituted: `$(JOB_COMPLETION_INDEX)` by each agent's
index, and pod 0's DNS name by 127.0.0.1 (there is no cluster DNS here)."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys

import pytest

from services.train_worker import k8s
from tests.deploy.conftest import REPO


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_two_node_torchrun_command_trains(tmp_path):
    from shared.nanochat.checkpoint import load_checkpoint
    from shared.nanochat.corpus import iter_shard_texts, split_shards
    from shared.nanochat.demo_corpus import write_demo_corpus
    from shared.nanochat.tokenizer import train_tokenizer
    from shared.nanochat.train import TrainConfig

    data = tmp_path / "data"
    write_demo_corpus(data, num_shards=3, seed=0, max_bytes=300_000)
    train_tokenizer(iter_shard_texts(split_shards(data)[0]), vocab_size=512, out_dir=tmp_path / "tok")
    run = tmp_path / "runs" / "mn-1"
    run.mkdir(parents=True)
    train_cfg = TrainConfig(
        data_dir=str(data),
        tokenizer_dir=str(tmp_path / "tok"),
        checkpoint_dir=str(run / "ckpt"),
        depth=2,
        aspect_ratio=32,
        head_dim=64,
        max_seq_len=64,
        window_pattern="L",
        device_batch_size=4,
        total_batch_size=512,  # = 2 nodes x 4 rows x 64 tokens
        num_iterations=3,
        warmup_steps=1,
        eval_every=0,
        eval_tokens=1024,
        device="cpu",
        seed=7,
    )
    (run / "pretrain_config.json").write_text(json.dumps(train_cfg.to_dict()))

    port = free_port()
    cfg = k8s.MultinodeConfig(
        job_id="mn-1",
        nodes=2,
        nproc_per_node=1,
        image="unused",
        namespace="",
        home=str(tmp_path),
        config_path=str(run / "pretrain_config.json"),
        progress_path=str(run / "progress.jsonl"),
        stop_path=str(run / "STOP"),
        rdzv_port=port,
    )
    cmd = k8s.torchrun_command(cfg)
    assert cmd[0] == "torchrun"
    env = {
        **os.environ,
        "PYTHONPATH": str(REPO),
        "OMP_NUM_THREADS": "1",
        "PYTHONUNBUFFERED": "1",
        "NCP_HOME": str(tmp_path),
    }
    procs = []
    for index in range(cfg.nodes):
        argv = [
            a.replace("$(JOB_COMPLETION_INDEX)", str(index)).replace(cfg.rdzv_endpoint, f"127.0.0.1:{port}")
            for a in cmd[1:]
        ]
        procs.append(
            subprocess.Popen(
                [sys.executable, "-m", "torch.distributed.run", *argv],
                cwd=REPO,
                env=env,
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
                text=True,
            )
        )
    try:
        outs = [p.communicate(timeout=300)[0] for p in procs]
    finally:
        for p in procs:
            p.kill()
    codes = [p.returncode for p in procs]
    assert codes == [0] * cfg.nodes, "\n=====\n".join(o[-4000:] for o in outs)
    records = [json.loads(line) for line in (run / "progress.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if r["type"] == "progress"] == [1, 2, 3]
    assert records[-1]["type"] == "done"
    _, _, meta = load_checkpoint(run / "ckpt", rank=0)
    assert meta["world_size"] == 2  # one rank on each "node"
