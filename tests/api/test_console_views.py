"""What the console reads besides the job API: its pages, eval samples, the kernel report of each
training stage (in the job status), and the report as HTML (with model output escaped, never executed)."""

from __future__ import annotations

import json

import pytest
from fastapi.testclient import TestClient

from services.api.app import create_app
from shared.jobs.spec import demo_spec
from shared.paths import run_paths

pytestmark = pytest.mark.parametrize("db_url", ["sqlite"], indirect=True)


@pytest.fixture
def client(settings):
    with TestClient(create_app(settings)) as c:
        yield c


@pytest.fixture
def job(client, settings):
    job_id = client.post("/jobs", json=demo_spec().model_dump(mode="json")).json()["id"]
    run = run_paths(settings.runs_dir, job_id)
    run.root.mkdir(parents=True)
    return job_id, run


def test_pages_and_their_security_headers(client):
    assert client.get("/", follow_redirects=False).headers["location"] == "/console/"
    for path in ("/console/", "/console/jobs/abc", "/console/chat"):
        r = client.get(path)
        assert r.status_code == 200 and '<div id="app">' in r.text
        csp = r.headers["content-security-policy"]
        assert "script-src 'self' 'sha256-" in csp and "frame-ancestors 'none'" in csp
    js = client.get("/console/static/app.js")
    assert js.status_code == 200 and "javascript" in js.headers["content-type"]
    assert client.get("/console/static/vendor/uPlot.esm.js").status_code == 200
    assert client.get("/console/static/nope.js").status_code == 404


def test_import_map_hash_matches_the_page(client):
    import base64
    import hashlib
    import re

    r = client.get("/console/")
    (importmap,) = re.findall(r'<script type="importmap">(.*?)</script>', r.text, re.S)
    digest = base64.b64encode(hashlib.sha256(importmap.encode()).digest()).decode()
    assert f"'sha256-{digest}'" in r.headers["content-security-policy"]


def test_samples(client, job):
    job_id, run = job
    assert client.get(f"/jobs/{job_id}/samples").json() == {
        "base": [],
        "base_step": None,
        "chat": [],
        "chat_step": None,
    }
    run.eval.mkdir()
    for step in (10, 20):
        (run.eval / f"base_eval_{step:06d}.json").write_text(
            json.dumps({"step": step, "samples": [{"prompt": "The sky is", "completion": f" blue {step}"}]})
        )
    body = client.get(f"/jobs/{job_id}/samples").json()
    assert body["base_step"] == 20 and body["base"] == [{"prompt": "The sky is", "completion": " blue 20"}]


def test_job_status_carries_the_kernel_report_of_each_training_stage(client, job):
    job_id, run = job
    assert client.get(f"/jobs/{job_id}").json()["kernels"] == {}  # no trainer has written one yet
    pre = {"attention": {"S": "flex", "L": "fa3"}, "compiled": True, "dtype": "bfloat16", "fp8": False}
    lines = [
        {"type": "progress", "step": 1, "loss": 5.0, "kernels": pre},
        *({"type": "progress", "step": s, "loss": 5.0} for s in range(2, 500)),
        {"type": "progress", "step": 1, "loss": 5.0, "kernels": {"dtype": "a resumed run's"}},
    ]
    run.progress_file.write_text("\n".join(json.dumps(r) for r in lines) + '\n{"type": "progress", "kern')
    assert client.get(f"/jobs/{job_id}").json()["kernels"] == {"pretrain": pre}
    # The file grows (the torn line completes, SFT starts): the next status reads on from there.
    with run.progress_file.open("a") as f:
        f.write('el_report": {"dtype": "torn"}, "stage": "sft", "step": 1}\n')
        for step, dtype in ((1, "float32"), (2, "changed")):
            rec = {"type": "progress", "stage": "sft", "step": step, "kernel_report": {"dtype": dtype}}
            f.write(json.dumps(rec) + "\n")
    body = client.get(f"/jobs/{job_id}").json()
    assert body["kernels"] == {"pretrain": pre, "sft": {"dtype": "torn"}}  # the first of each stage
    assert client.post(f"/jobs/{job_id}/cancel").json()["kernels"] == body["kernels"]
    assert client.get("/jobs").json()["data"][0]["kernels"] is None  # lists do not read run folders
    assert client.get(f"/jobs/{job_id}/kernels").status_code == 404  # one reader: the job status


def test_report_html_escapes_raw_html(client, job):
    job_id, run = job
    assert client.get(f"/jobs/{job_id}/report.html").status_code == 404
    run.report.mkdir()
    (run.report / "report.md").write_text(
        "# Run report: demo\n\n| a | b |\n| --- | --- |\n| 1 | 2 |\n\n![pretrain training loss](pretrain_loss.png)\n\n"
        "<script>alert('x')</script>\n\n[bad](javascript:alert(1))\n"
    )
    r = client.get(f"/jobs/{job_id}/report.html")
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/html")
    html = r.text
    assert "<h1>Run report: demo</h1>" in html and "<table>" in html
    assert '<img src="pretrain_loss.png" alt="pretrain training loss"' in html
    assert "<script>" not in html and "&lt;script&gt;" in html and 'href="javascript:' not in html
