"""The API's Prometheus /metrics carries every running job's live numbers, labelled by job, name
and stage, read from the registry at scrape time (any number of API replicas agree)."""

from __future__ import annotations

from fastapi.testclient import TestClient

from services.api.app import create_app
from shared.db import registry as r
from shared.jobs.spec import demo_spec


def test_running_job_gauges(settings, sessions):
    with sessions() as s:
        jid = r.create_job(s, demo_spec()).id
        other = r.create_job(s, demo_spec(name="idle")).id  # queued: not exported
        r.start_stage(s, jid, "data")
        r.finish_stage(s, jid, "data")
        r.start_stage(s, jid, "pretrain")
        r.update_progress(
            s, jid, current_stage="pretrain", step=20, total_steps=40, loss=3.25, tokens_per_sec=5000.0,
            mfu=0.31, eta_seconds=12.5, peak_memory=123_000_000,
        )  # fmt: skip
    with TestClient(create_app(settings)) as c:
        text = c.get("/metrics").text
        labels = f'job="{jid}",name="demo",stage="pretrain"'
        for line in (
            f"ncp_job_step{{{labels}}} 20.0",
            f"ncp_job_total_steps{{{labels}}} 40.0",
            f"ncp_job_loss{{{labels}}} 3.25",
            f"ncp_job_tokens_per_second{{{labels}}} 5000.0",
            f"ncp_job_mfu{{{labels}}} 0.31",
            f"ncp_job_eta_seconds{{{labels}}} 12.5",
            f"ncp_job_gpu_memory_peak_bytes{{{labels}}} 1.23e+08",
        ):
            assert line in text, line
        assert other not in text
        with sessions() as s:
            r.set_job_status(s, jid, "cancelled")
        assert jid not in c.get("/metrics").text  # a finished job's series ends


def test_grafana_dashboard_queries_metrics_the_api_exports(settings, sessions):
    """docs/grafana/training.json may only chart series that /metrics really has."""
    import json
    import re
    from pathlib import Path

    dashboard = json.loads(
        (Path(__file__).resolve().parents[2] / "docs" / "grafana" / "training.json").read_text()
    )
    exprs = [t["expr"] for p in dashboard["panels"] for t in p.get("targets", [])]
    exprs += [v["definition"] for v in dashboard["templating"]["list"] if "definition" in v]
    wanted = {m for e in exprs for m in re.findall(r"\bncp_[a-z_]+", e)}
    with sessions() as s:
        jid = r.create_job(s, demo_spec()).id
        r.start_stage(s, jid, "data")
        r.update_progress(
            s,
            jid,
            step=1,
            total_steps=2,
            loss=1.0,
            tokens_per_sec=1.0,
            mfu=0.1,
            eta_seconds=1.0,
            peak_memory=1,
        )
    with TestClient(create_app(settings)) as c:
        c.get("/jobs")
        exported = set(re.findall(r"^(ncp_[a-z_]+)", c.get("/metrics").text, flags=re.M))
    assert wanted and wanted <= exported, wanted - exported
