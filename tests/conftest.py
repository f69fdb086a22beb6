"""Suite-wide test setup. Area fixtures live in tests/<area>/conftest.py."""

from __future__ import annotations

import os

import pytest

# Two CPU cores in CI: one intra-op thread per test process keeps torch from oversubscribing.
os.environ.setdefault("OMP_NUM_THREADS", "1")


@pytest.fixture(autouse=True)
def _isolated_home(tmp_path, monkeypatch):
    """Each test gets its own NCP_HOME so nothing touches ~/.ncp or leaks between tests."""
    monkeypatch.setenv("NCP_HOME", str(tmp_path / "ncp_home"))
    from shared.settings import get_settings

    get_settings.cache_clear()
    yield
    get_settings.cache_clear()
