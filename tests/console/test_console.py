"""The console in headless Chromium against a real platform (tests/console/conftest.py): sign in
with and without a token, submit the demo pipeline from the form and watch its charts fill until
it succeeds, cancel a running job from its page, chat with the served model and see the answer
stream in. Screenshots of every page land in test-artifacts/console/."""

from __future__ import annotations

import re
import subprocess
import sys
import time

import httpx
import pytest

from tests.console.conftest import REPO, TOKEN, Page

pytestmark = pytest.mark.slow

# Every distinct value an element's attribute takes, recorded in the page as it changes (a
# MutationObserver misses nothing, however fast the chart redraws).
RECORD_ATTR = """([sel, attr]) => {
  window.__seen = window.__seen || {};
  const seen = (window.__seen[sel] = []);
  const note = () => {
    const el = document.querySelector(sel);
    const v = el ? el.getAttribute(attr) : null;
    if (v !== null && seen[seen.length - 1] !== v) seen.push(v);
  };
  note();
  new MutationObserver(note).observe(document.body, {subtree: true, childList: true, attributes: true, characterData: true});
}"""


def test_sign_in_with_the_token(console, platform):
    page = console.page
    console.goto("/console/")
    page.wait_for_url(re.compile(r"/console/signin\?next="))  # the API asked for the token
    page.wait_for_selector("text=This API requires its bearer token")
    console.shot("signin")
    page.fill("#token", "not-the-token")
    page.click("button[type=submit]")
    assert "refused" in page.inner_text("[data-testid=signin-error]")
    console.shot("signin-refused")
    page.fill("#token", TOKEN)
    page.click("button[type=submit]")
    page.wait_for_selector("[data-testid=jobs-table]")
    assert page.url.endswith("/console/")
    assert page.inner_text("[data-testid=signin-link]") == "Signed in"
    assert page.evaluate("sessionStorage.getItem('ncp.token')") == TOKEN
    console.goto("/console/signin")
    page.click("[data-testid=signout]")
    assert page.evaluate("sessionStorage.getItem('ncp.token')") is None


def test_console_without_a_token_is_local_and_open(browser, platform, artifacts):
    """An API without NCP_API_TOKEN (loopback only) serves the console with no sign-in."""
    from services.api.app import create_app
    from shared.settings import Settings
    from tests.api.conftest import LiveServer

    settings = Settings(
        home=platform.home, database_url=platform.database_url, broker_url=platform.env["NCP_BROKER_URL"]
    )
    with LiveServer(create_app(settings)) as srv:
        page = Page(browser, srv.url, artifacts)
        try:
            page.goto("/")
            page.page.wait_for_selector("[data-testid=jobs-table]")
            assert page.page.url == f"{srv.url}/console/"
            page.goto("/console/signin")
            page.page.wait_for_selector("[data-testid=no-token-needed]")
            page.shot("signin-no-token")
        finally:
            page.close()


@pytest.fixture(scope="session")
def demo_job(browser, platform, artifacts) -> str:
    """The demo pipeline, submitted from the new-job form, watched on its page until it succeeds."""
    console = Page(browser, platform.url, artifacts)
    page = console.page
    try:
        console.sign_in(TOKEN)
        console.goto("/console/new")
        page.wait_for_selector("[data-testid=plan-params]")
        # the plan of the demo preset, before anything is submitted
        assert page.inner_text("[data-testid=plan-iterations]").startswith("40 ")
        assert re.match(r"^\d+(\.\d+)?k \(\d{3},\d{3}\)$", page.inner_text("[data-testid=plan-params]"))
        console.shot("new-job")
        # a bad value: the server's 422 appears beside that field, and the plan goes away
        page.fill("input[name=depth]", "0")
        error = page.wait_for_selector("[data-field='model.depth']")
        assert "greater than or equal to 1" in error.inner_text()
        console.shot("new-job-error")
        page.fill("input[name=depth]", "2")
        page.wait_for_selector("[data-testid=plan-params]")
        assert page.query_selector("[data-field='model.depth']") is None
        page.click("[data-testid=submit]")
        page.wait_for_url(re.compile(r"/console/jobs/[0-9a-f-]{36}$"))
        job_id = page.url.rsplit("/", 1)[1]
        page.wait_for_selector("[data-testid=charts-pretrain]")
        page.evaluate(RECORD_ATTR, ["[data-testid=chart-pretrain-loss]", "data-points"])
        page.evaluate(RECORD_ATTR, ["[data-testid=chart-sft-loss]", "data-points"])
        page.wait_for_function(
            "() => Number(document.querySelector('[data-testid=chart-pretrain-loss]').dataset.points) > 0",
            timeout=300_000,
        )
        console.shot("job-running")
        page.wait_for_selector(".job-head [data-testid=status]:text-is('succeeded')", timeout=600_000)
        page.wait_for_selector("[data-testid=report] img[src^='blob:']")
        page.wait_for_timeout(500)  # let the last chart redraw land
        console.shot("job-succeeded")
        pre = [int(v) for v in page.evaluate("window.__seen['[data-testid=chart-pretrain-loss]']")]
        sft = [int(v) for v in page.evaluate("window.__seen['[data-testid=chart-sft-loss]']")]
        # the charts gained points while the job ran (live), ending with every step
        assert pre == sorted(pre) and len([v for v in pre if 0 < v < 40]) >= 1 and pre[-1] == 40, pre
        assert sft == sorted(sft) and sft[-1] == 10, sft
        # the rest of the job page
        assert set(page.eval_on_selector_all(".timeline .stage", "els => els.map(e => e.className)")) <= {
            "stage stage-succeeded ", "stage stage-succeeded current",
        }  # fmt: skip
        assert page.query_selector_all("[data-testid=checkpoints] tbody tr")
        assert page.query_selector_all("[data-testid=evals] tbody tr")
        assert page.query_selector("[data-testid=samples] .sample")
        assert page.eval_on_selector("[data-testid=report] img", "img => img.naturalWidth") > 100
        assert int(page.get_attribute("[data-testid=chart-pretrain-bpb]", "data-points")) >= 2
        # each training stage's kernel report, from the job status (GET /jobs/{id}: kernels)
        kernel_lines = [e.text_content() or "" for e in page.query_selector_all("[data-testid=kernels]")]
        # (text_content: the label is upper-cased by CSS only)
        assert [line.split()[2] for line in kernel_lines] == ["pretrain", "sft"], kernel_lines
        assert all("device_backend cpu" in line for line in kernel_lines), kernel_lines
        return job_id
    except Exception:
        console.shot("demo-job-failure")
        print(platform.logs())
        raise
    finally:
        console.close()


def test_demo_job_from_the_form_runs_and_its_logs_read_well(demo_job, console, platform):
    console.sign_in(TOKEN)
    console.goto(f"/console/jobs/{demo_job}")
    page = console.page
    page.wait_for_selector("[data-testid=logs] button:text-is('pretrain.log')")
    page.click("[data-testid=logs] button:text-is('pretrain.log')")
    page.wait_for_selector("[data-testid=logs] pre:has-text('step 00040/00040 (100.00%)')")
    log = page.inner_text("[data-testid=logs] pre")
    assert re.search(
        r"step 00001/00040 \(2\.50%\) \| loss: \d+\.\d{6} \| lrm: \d\.\d\d \| dt: [\d.]+ms \| tok/sec: [\d,]+ \| mfu: - \|",
        log,
    )
    console.shot("job-logs")


def test_jobs_list_filters_newest_first(demo_job, console, platform):
    console.sign_in(TOKEN)
    page = console.page
    row = page.wait_for_selector(f"tr[data-job='{demo_job}']")
    assert "succeeded" in row.inner_text() and "demo" in row.inner_text()
    console.shot("jobs")
    page.click("[data-testid=filter-failed]")
    page.wait_for_selector(f"tr[data-job='{demo_job}']", state="detached")
    page.click("[data-testid=filter-succeeded]")
    page.wait_for_selector(f"tr[data-job='{demo_job}']")
    statuses = page.eval_on_selector_all("tr[data-job]", "rows => rows.map(r => r.dataset.status)")
    assert statuses and set(statuses) == {"succeeded"}


def test_chat_streams_the_answer(demo_job, console, platform):
    with platform.api() as api:
        served = api.get(f"/jobs/{demo_job}").json()["stages"]
        model = next(s["outputs"]["model"] for s in served if s["name"] == "serve")
        deadline = time.monotonic() + 180
        while not any(m["id"] == model for m in _models(api)):
            assert time.monotonic() < deadline, "the served model never appeared\n" + platform.logs()
            time.sleep(1)
    console.sign_in(TOKEN)
    console.goto("/console/chat")
    page = console.page
    page.wait_for_selector(f"[data-testid=served-model]:has-text('{model}')")
    page.fill("textarea[name=system]", "You are a terse assistant.")
    page.fill("input[name=max_tokens]", "48")
    page.fill("textarea[name=prompt]", "What does the len() function do?")
    page.evaluate(
        """() => {
          window.__lengths = [];
          new MutationObserver(() => {
            const m = [...document.querySelectorAll('.msg.assistant .text')].pop();
            if (m) window.__lengths.push(m.textContent.length);
          }).observe(document.querySelector('[data-testid=messages]'), {subtree: true, childList: true, characterData: true});
        }"""
    )
    page.click("[data-testid=send]")
    page.wait_for_selector(".msg.assistant:not(.streaming)", timeout=120_000)
    answer = page.inner_text(".msg.assistant .text")
    lengths = page.evaluate("window.__lengths")
    assert answer.strip() and len(set(lengths)) >= 3, lengths  # grew piece by piece: streamed
    console.shot("chat")
    page.click("[data-testid=new-conversation]")
    assert page.query_selector(".msg") is None


def _models(api: httpx.Client) -> list[dict]:
    r = api.get("/v1/models")
    return r.json().get("data", []) if r.status_code == 200 else []


def test_cancel_a_running_job_from_its_page(demo_job, console, platform):
    """A long pretraining run on the demo job's data and tokenizer, cancelled from the console."""
    with platform.api() as api:
        spec = api.get(f"/jobs/{demo_job}").json()["spec"]
        long_run = {
            "kind": "pretrain", "name": "long", "stages": ["pretrain"], "parent_job_id": demo_job,
            "model": spec["model"], "tokenizer": spec["tokenizer"], "hardware": spec["hardware"],
            "batch": spec["batch"], "horizon": {"num_iterations": 100_000},
            "eval": {"every": 0, "tokens": 1024}, "checkpoint": {"every": 0, "keep_last": 1},
        }  # fmt: skip
        job_id = api.post("/jobs", json=long_run).json()["id"]
    console.sign_in(TOKEN)
    console.goto(f"/console/jobs/{job_id}")
    page = console.page
    page.wait_for_function(
        "() => Number((document.querySelector('[data-testid=chart-pretrain-loss]') || {dataset: {}}).dataset.points) > 5",
        timeout=300_000,
    )
    page.click("[data-testid=cancel]")
    page.click("[data-testid=cancel]:text-is('Confirm cancel')")
    page.wait_for_selector(".job-head [data-testid=status]:text-is('cancelled')", timeout=120_000)
    page.wait_for_selector("[data-testid=resume]")
    console.shot("job-cancelled")
    with platform.api() as api:
        job = api.get(f"/jobs/{job_id}").json()
        assert job["status"] == "cancelled" and job["progress"]["step"] < 100_000
    stopped_at = job["progress"]["step"]
    # Resume from the page: the run continues from its checkpoint and the chart keeps growing.
    page.click("[data-testid=resume]")
    page.wait_for_selector(".job-head [data-testid=status]:text-is('running')", timeout=120_000)
    page.wait_for_function(
        f"() => Number(document.querySelector('[data-testid=chart-pretrain-loss]').dataset.points) > {stopped_at + 3}",
        timeout=300_000,
    )
    console.shot("job-resumed")
    with platform.api() as api:  # stop it again: the platform has more tests to run
        assert api.post(f"/jobs/{job_id}/cancel").status_code == 202


def test_cli_on_the_platform(demo_job, platform):
    """`ncp jobs watch`, `ncp jobs logs -f` and `ncp chat -p` against the same platform."""

    def ncp(*args: str) -> subprocess.CompletedProcess:
        env = {**platform.env, "NCP_API_URL": platform.url}
        return subprocess.run(
            [sys.executable, "-m", "services.cli.main", *args],
            cwd=REPO, env=env, capture_output=True, text=True, timeout=180,
        )  # fmt: skip

    watch = ncp("jobs", "watch", demo_job)
    assert watch.returncode == 0 and "succeeded" in watch.stdout, watch.stderr
    logs = ncp("jobs", "logs", demo_job, "-f")
    assert logs.returncode == 0 and "==> pretrain.log <==" in logs.stdout
    assert "step 00040/00040 (100.00%)" in logs.stdout and "step 00010/00010 (100.00%)" in logs.stdout
    chat = ncp("chat", "-p", "Hello", "--max-tokens", "16")
    assert chat.returncode == 0 and chat.stdout.strip(), chat.stderr


def test_demo_console_mode_prints_the_url_and_serves_it(tmp_path):
    """`scripts/demo.sh --console`: the platform comes up, the console's URL is printed, the page
    answers, and Ctrl-C stops everything."""
    import os
    import signal

    from tests.console.conftest import free_port

    env = {k: v for k, v in os.environ.items() if not k.startswith("NCP_")}
    port = free_port()
    env.update(NCP_HOME=str(tmp_path / "home"), NCP_API_PORT=str(port), NCP_INFERENCE_PORT=str(free_port()),
               NCP_INFERENCE_ENGINE="native", PYTHONUNBUFFERED="1")  # fmt: skip
    proc = subprocess.Popen(
        [sys.executable, "-m", "services.cli.main", "demo", "--console"],
        cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )  # fmt: skip
    try:
        url = f"http://127.0.0.1:{port}/console/"
        for line in proc.stdout:
            if "the platform is up" in line:
                assert f"Open {url}, choose New job (preset demo)" in line
                break
        else:
            raise AssertionError("ncp demo --console exited before the platform was up")
        page = httpx.get(url, timeout=10)
        assert page.status_code == 200 and '<script type="module" src="/console/static/app.js">' in page.text
        assert (
            httpx.get(f"http://127.0.0.1:{port}/", follow_redirects=False).headers["location"] == "/console/"
        )
    finally:
        proc.send_signal(signal.SIGINT)
        assert proc.wait(timeout=90) == 0
    with pytest.raises(httpx.TransportError):
        httpx.get(url, timeout=2)  # stopped with it


def test_fp8_checkbox_reaches_the_submitted_spec(console, platform):
    """The new-job form's FP8 box becomes `model.fp8` of the spec the API stores. The job is
    cancelled at once: only the spec is under test."""
    console.sign_in(TOKEN)
    console.goto("/console/new")
    page = console.page
    page.wait_for_selector("[data-testid=plan-params]")
    assert page.is_checked("input[name=fp8]") is False  # the demo preset trains in bf16
    assert '"fp8": false' in (page.text_content("pre.spec") or "")
    page.check("input[name=fp8]")
    page.wait_for_function("() => document.querySelector('pre.spec').textContent.includes('\"fp8\": true')")
    with page.expect_request(lambda r: r.method == "POST" and r.url.endswith("/jobs")) as sent:
        page.click("[data-testid=submit]")
    assert sent.value.post_data_json["model"]["fp8"] is True
    page.wait_for_url(re.compile(r"/console/jobs/[0-9a-f-]{36}$"))
    job_id = page.url.rsplit("/", 1)[1]
    with platform.api() as api:
        assert api.get(f"/jobs/{job_id}").json()["spec"]["model"]["fp8"] is True
        assert api.post(f"/jobs/{job_id}/cancel").status_code == 202
