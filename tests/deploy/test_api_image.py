"""The api image has no torch (docker/api.Dockerfile): the processes it runs (migrations, the API,
the reconciler) must work in an interpreter where importing torch fails."""

from __future__ import annotations

import os
import subprocess
import sys

from tests.deploy.conftest import REPO

NO_TORCH = """
import importlib.abc, sys
class _NoTorch(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path, target=None):
        if name == "torch" or name.startswith("torch."):
            raise ImportError(f"{name}: torch is not installed in the api image")
sys.meta_path.insert(0, _NoTorch())
"""


def run(code: str, tmp_path, timeout: float = 60) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if not k.startswith("NCP_")}
    env.update(NCP_HOME=str(tmp_path / "home"), PYTHONPATH=str(REPO))
    return subprocess.run(
        [sys.executable, "-c", NO_TORCH + code],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def test_blocker_really_blocks(tmp_path):
    r = run("import torch", tmp_path)
    assert r.returncode != 0 and "not installed in the api image" in r.stderr


def test_migrations_and_api_run_without_torch(tmp_path):
    r = run(
        "from services.cli.main import main\n"
        "assert main(['db', 'upgrade']) == 0\n"
        "from fastapi.testclient import TestClient\n"
        "from services.api.app import create_app\n"
        "with TestClient(create_app()) as c:\n"
        "    r = c.get('/healthz'); assert r.status_code == 200, r.text\n"
        "print('ok')\n",
        tmp_path,
        timeout=120,
    )
    assert r.returncode == 0 and "ok" in r.stdout, r.stderr[-3000:]


def test_reconciler_starts_without_torch(tmp_path):
    code = "from services.cli.main import main\nmain(['db', 'upgrade'])\nmain(['reconciler'])\n"
    try:
        r = run(code, tmp_path, timeout=15)
    except subprocess.TimeoutExpired:
        return  # still reconciling after 15 s: it runs
    raise AssertionError(f"reconciler exited with {r.returncode}:\n{r.stderr[-3000:]}")
