"""The web console in a real browser against a real platform.

`platform`: `ncp up` (what `scripts/demo.sh` runs) with a PostgreSQL registry, Redis as the broker,
an API token, and the native inference server: the API, the reconciler, one real Celery worker per
queue and the inference supervisor as child processes. `browser`: Debian's Chromium (apt package
`chromium`) driven by Playwright over CDP; Playwright's own browser downloads are never used.

Screenshots of every page go to `test-artifacts/console/` (gitignored; NCP_TEST_ARTIFACTS moves
it), for a person to look at and for CI to keep.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import psycopg
import pytest
import redis

from tests.servers import PG_ADMIN, pg_url, redis_url

REPO = Path(__file__).resolve().parents[2]
CHROMIUM = os.environ.get("NCP_TEST_CHROMIUM", "/usr/bin/chromium")
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
]
REDIS_DB = 12  # the console suite's own: platform tests flush 13
TOKEN = "console-test-token-8f3a"
ARTIFACTS = Path(os.environ.get("NCP_TEST_ARTIFACTS", REPO / "test-artifacts")) / "console"


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class Platform:
    url: str
    token: str
    env: dict[str, str]
    home: Path
    database_url: str

    def api(self) -> httpx.Client:
        return httpx.Client(base_url=self.url, headers={"Authorization": f"Bearer {self.token}"}, timeout=30)

    def logs(self) -> str:
        out = []
        for p in sorted((self.home / "logs").glob("*.log")):
            out.append(f"==> {p.name} <==\n{p.read_text(errors='replace')[-3000:]}")
        return "\n".join(out)


@pytest.fixture(scope="session")
def platform(tmp_path_factory) -> Iterator[Platform]:
    name = f"ncp_console_{uuid.uuid4().hex[:10]}"
    with psycopg.connect(PG_ADMIN, autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    broker = redis.Redis.from_url(redis_url(REDIS_DB))
    broker.flushdb()
    home = tmp_path_factory.mktemp("console") / "home"
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("NCP_")}
    env.update({
        "NCP_HOME": str(home), "NCP_DATABASE_URL": pg_url(name), "NCP_BROKER_URL": redis_url(REDIS_DB),
        "NCP_API_PORT": str(port), "NCP_INFERENCE_PORT": str(free_port()), "NCP_INFERENCE_ENGINE": "native",
        "NCP_API_TOKEN": TOKEN, "NCP_DEMO_CORPUS_BYTES": "300000", "NCP_CANCEL_GRACE_SECONDS": "10",
        "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1",
    })  # fmt: skip
    home.mkdir(parents=True)
    log = open(home / "up.out", "ab")  # noqa: SIM115 - the child's stdout for its lifetime
    proc = subprocess.Popen(
        [sys.executable, "-m", "services.cli.main", "up"],
        cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
    )  # fmt: skip
    plat = Platform(f"http://127.0.0.1:{port}", TOKEN, env, home, pg_url(name))
    try:
        deadline = time.monotonic() + 120
        while True:
            try:
                if httpx.get(f"{plat.url}/readyz", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            assert proc.poll() is None, (home / "up.out").read_text()
            assert time.monotonic() < deadline, "the platform did not become ready in 120 s\n" + plat.logs()
            time.sleep(0.5)
        yield plat
    finally:
        proc.send_signal(signal.SIGTERM)  # `ncp up` stops every child's process group
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        log.close()
        broker.flushdb()
        broker.close()
        with psycopg.connect(PG_ADMIN, autocommit=True) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


@pytest.fixture(scope="session")
def browser():
    if not Path(CHROMIUM).is_file():
        raise RuntimeError(f"{CHROMIUM} is missing: install Debian's chromium (scripts/services.sh does)")
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        yield b
        b.close()


@pytest.fixture(scope="session")
def artifacts() -> Path:
    if ARTIFACTS.exists():
        shutil.rmtree(ARTIFACTS)
    ARTIFACTS.mkdir(parents=True)
    return ARTIFACTS


class Page:
    """A browser tab on the console that fails the test on any JavaScript error."""

    def __init__(self, browser, base: str, artifacts: Path):
        self.ctx = browser.new_context(viewport={"width": 1400, "height": 1000})
        self.page = self.ctx.new_page()
        self.page.set_default_timeout(30_000)
        self.base = base
        self.artifacts = artifacts
        self.errors: list[str] = []
        self.page.on("pageerror", lambda e: self.errors.append(f"pageerror: {e}"))

    def goto(self, path: str) -> None:
        self.page.goto(self.base + path)

    def shot(self, name: str, full_page: bool = True) -> Path:
        path = self.artifacts / f"{name}.png"
        self.page.screenshot(path=str(path), full_page=full_page)
        return path

    def sign_in(self, token: str) -> None:
        self.goto("/console/signin")
        self.page.fill("#token", token)
        self.page.click("button[type=submit]")
        self.page.wait_for_selector("[data-testid=jobs-table]")

    def close(self) -> None:
        self.ctx.close()
        assert not self.errors, self.errors


@pytest.fixture
def console(browser, platform, artifacts) -> Iterator[Page]:
    page = Page(browser, platform.url, artifacts)
    yield page
    page.close()
