"""The workers' Docker HEALTHCHECK, run for real: it passes while `ncp worker` is up on a Redis
broker and fails once the worker is gone."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.deploy.conftest import REPO
from tests.servers import redis_url

# A Redis database of its own (pidbox broadcasts are per database): nothing else consumes here.
BROKER = redis_url(8)


def healthcheck(dockerfile: str) -> list[str]:
    text = re.sub(r"\\\n", " ", (REPO / "docker" / dockerfile).read_text())
    (cmd,) = re.findall(r"^HEALTHCHECK .*?CMD (\[.*\])$", text, flags=re.M)
    return json.loads(cmd)


def test_worker_images_share_one_healthcheck():
    assert (
        healthcheck("worker-cpu.Dockerfile")
        == healthcheck("train-rocm.Dockerfile")
        == healthcheck("train-cuda.Dockerfile")
    )


@pytest.mark.slow
def test_worker_healthcheck_tracks_a_live_worker(tmp_path):
    redis = pytest.importorskip("redis")
    try:
        redis.Redis.from_url(BROKER).ping()
    except redis.exceptions.ConnectionError:
        pytest.fail(f"Redis is not running at {BROKER} (scripts/services.sh starts it)")
    bin_dir = str(Path(sys.executable).parent)
    env = {k: v for k, v in os.environ.items() if not k.startswith("NCP_")}
    env.update(
        NCP_HOME=str(tmp_path),
        NCP_BROKER_URL=BROKER,
        NCP_DATABASE_URL=f"sqlite:///{tmp_path}/reg.db",
        PATH=f"{bin_dir}:{env.get('PATH', '')}",
        PYTHONPATH=str(REPO),
    )
    cmd = healthcheck("worker-cpu.Dockerfile")
    subprocess.run([f"{bin_dir}/ncp", "db", "upgrade"], env=env, cwd=REPO, check=True, capture_output=True)
    worker = subprocess.Popen(
        [f"{bin_dir}/ncp", "worker", "--queues", "data"],
        env=env,
        cwd=REPO,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.monotonic() + 90
        while True:
            r = subprocess.run(cmd, env=env, cwd=REPO, capture_output=True, text=True, timeout=60)
            if r.returncode == 0:
                break
            assert worker.poll() is None, "ncp worker exited"
            assert time.monotonic() < deadline, f"healthcheck never passed: {r.stdout}{r.stderr}"
            time.sleep(2)
    finally:
        worker.terminate()
        worker.wait(timeout=60)
    r = subprocess.run(cmd, env=env, cwd=REPO, capture_output=True, text=True, timeout=60)
    assert r.returncode != 0, "healthcheck passed with no worker running"
