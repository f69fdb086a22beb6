"""`ncp demo`: the whole pipeline end to end on this machine, in a few minutes on a CPU.

Starts `ncp up` in the background (or reuses a running platform), prints the web console's URL,
submits the tiny demo pipeline
(offline demo corpus, small tokenizer, tiny model, short pretraining, base eval on the fixture
CORE bundle, short SFT, chat eval on fixture tasks, export, serve), follows it with a live
progress line, then asks the served model a question over the OpenAI-compatible API and prints
the answer, the eval numbers and where the report is. Exits non-zero if any of it failed. With
`--console` it only starts the platform and waits, for a person to run the demo in the browser.
"""

from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

TERMINAL = {"succeeded", "failed", "cancelled"}


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("demo", help="run the tiny demo pipeline end to end and chat with the result")
    p.add_argument("--question", default="What does the len() function do?", help="what to ask the model")
    p.add_argument("--timeout", type=float, default=1800.0, help="seconds before giving up on the job")
    p.add_argument(
        "--keep-running",
        action="store_true",
        help="leave the platform running afterwards when the demo started it",
    )
    p.add_argument(
        "--console",
        action="store_true",
        help="start the platform and wait: run the demo from the web console (Ctrl-C stops)",
    )
    p.set_defaults(func=run)


def console_url(settings: Any) -> str:
    return f"{settings.api_url}/console/"


def wait_in_console(console: str, settings: Any, started: subprocess.Popen | None) -> int:
    """Leave the demo to the browser: New job (the demo preset), watch it, then Chat."""
    sign_in = " (sign in with NCP_API_TOKEN)" if settings.api_token else ""
    print(
        f"ncp demo: the platform is up. Open {console}{sign_in}, choose New job (preset demo), submit, "
        "watch it run, then chat with the model on the Chat page. Ctrl-C stops.",
        flush=True,
    )
    try:
        while started is None or started.poll() is None:
            time.sleep(1.0)
    except KeyboardInterrupt:
        pass
    return 0


def _headers(settings: Any) -> dict[str, str]:
    return {"Authorization": f"Bearer {settings.api_token}"} if settings.api_token else {}


def api_ready(client: Any, settings: Any) -> bool:
    import httpx

    try:
        return (
            client.get(f"{settings.api_url}/healthz", headers=_headers(settings), timeout=2).status_code
            == 200
        )
    except httpx.HTTPError:
        return False


def start_platform(settings: Any) -> subprocess.Popen:
    log_dir = settings.home / "logs"
    log_dir.mkdir(parents=True, exist_ok=True)
    out = open(log_dir / "up.log", "ab")  # noqa: SIM115 - handed to the child for its lifetime
    repo = str(Path(__file__).resolve().parents[3])
    return subprocess.Popen(
        [sys.executable, "-m", "services.cli.main", "up"],
        stdout=out,
        stderr=subprocess.STDOUT,
        stdin=subprocess.DEVNULL,
        cwd=repo,
        start_new_session=True,
    )


def stop_platform(proc: subprocess.Popen) -> None:
    if proc.poll() is not None:
        return
    proc.send_signal(signal.SIGTERM)  # `ncp up` stops its children's process groups itself
    try:
        proc.wait(timeout=60)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()


def progress_line(job: dict) -> str:
    p = job.get("progress") or {}
    parts = [
        f"{job['status']:<9}",
        f"{p.get('percent', 0):5.1f}%",
        f"stage {job.get('current_stage') or '-'}",
    ]
    if p.get("step") is not None and p.get("total_steps"):
        parts.append(f"step {p['step']}/{p['total_steps']}")
    if p.get("loss") is not None:
        parts.append(f"loss {p['loss']:.3f}")
    if p.get("tokens_per_sec"):
        parts.append(f"{p['tokens_per_sec']:,.0f} tok/s")
    if p.get("eta_seconds") is not None:
        parts.append(f"ETA {p['eta_seconds']:.0f}s")
    return "  ".join(parts)


def follow(client: Any, settings: Any, job_id: str, timeout: float) -> dict:
    deadline = time.monotonic() + timeout
    last = ""
    tty = sys.stdout.isatty()
    while True:
        r = client.get(f"{settings.api_url}/jobs/{job_id}", headers=_headers(settings), timeout=10)
        r.raise_for_status()
        job = r.json()
        line = progress_line(job)
        if line != last:
            print(("\r" + line.ljust(100)) if tty else line, end="" if tty else "\n", flush=True)
            last = line
        if job["status"] in TERMINAL:
            if tty:
                print()
            return job
        if time.monotonic() > deadline:
            if tty:
                print()
            raise TimeoutError(f"job {job_id} did not finish within {timeout:.0f}s (status {job['status']})")
        time.sleep(1.0)


def wait_for_model(client: Any, settings: Any, model: str, timeout: float = 180.0) -> None:
    import httpx

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            r = client.get(
                f"{settings.inference_url}/v1/models", timeout=5, headers=settings.inference_headers
            )
            if r.status_code == 200 and any(m.get("id") == model for m in r.json().get("data", [])):
                return
        except httpx.HTTPError:
            pass
        time.sleep(1.0)
    raise TimeoutError(
        f"the model server at {settings.inference_url} did not serve {model!r} "
        f"within {timeout:.0f}s (see {settings.home / 'logs' / 'inference.log'})"
    )


def ask(client: Any, settings: Any, model: str, question: str) -> str:
    r = client.post(
        f"{settings.inference_url}/v1/chat/completions",
        timeout=120,
        headers=settings.inference_headers,
        json={
            "model": model,
            "messages": [{"role": "user", "content": question}],
            "max_tokens": 48,
            "temperature": 0.0,
        },
    )
    if r.status_code != 200:
        raise RuntimeError(f"/v1/chat/completions answered {r.status_code}: {r.text[:500]}")
    return r.json()["choices"][0]["message"]["content"]


# The headline numbers of each eval stage (the full tables are in the report).
_HEADLINE = ("val_bpb", "core/core", "core/centered/", "chatcore", "/accuracy")


def print_results(job: dict) -> None:
    for st in job["stages"]:
        results = (st.get("outputs") or {}).get("results")
        if not results:
            continue
        print(f"{st['name']}:")
        for key, value in sorted(results.items()):
            if any(h in key for h in _HEADLINE):
                print(f"  {key:<40} {value:.4f}")


def run(args: argparse.Namespace) -> int:
    import httpx

    from shared.jobs.spec import demo_spec
    from shared.settings import get_settings

    settings = get_settings()
    started: subprocess.Popen | None = None
    with httpx.Client() as client:
        try:
            if api_ready(client, settings):
                print(f"ncp demo: using the platform at {settings.api_url}", flush=True)
            else:
                print(
                    f"ncp demo: starting the platform (ncp up; logs in {settings.home / 'logs'})", flush=True
                )
                started = start_platform(settings)
                deadline = time.monotonic() + 120
                while not api_ready(client, settings):
                    if started.poll() is not None:
                        print(
                            f"ncp demo: `ncp up` exited with {started.returncode}; "
                            f"see {settings.home / 'logs' / 'up.log'}",
                            file=sys.stderr,
                        )
                        return 1
                    if time.monotonic() > deadline:
                        print("ncp demo: the API did not come up within 120s", file=sys.stderr)
                        return 1
                    time.sleep(0.5)
            console = console_url(settings)
            if args.console:
                return wait_in_console(console, settings, started)
            print(f"ncp demo: web console {console} (watch the job there)", flush=True)
            spec = demo_spec().model_dump(mode="json")
            r = client.post(f"{settings.api_url}/jobs", json=spec, headers=_headers(settings), timeout=30)
            if r.status_code != 202:
                print(f"ncp demo: POST /jobs answered {r.status_code}: {r.text[:500]}", file=sys.stderr)
                return 1
            job_id = r.json()["id"]
            print(
                f"ncp demo: job {job_id} submitted; following it (live: {console}jobs/{job_id})", flush=True
            )
            job = follow(client, settings, job_id, args.timeout)
            if job["status"] != "succeeded":
                err = job.get("error") or {}
                print(
                    f"ncp demo: job {job['status']}: {err.get('code')}: {err.get('message')}", file=sys.stderr
                )
                print(f"ncp demo: logs in {settings.runs_dir / job_id / 'logs'}", file=sys.stderr)
                return 1
            outputs = {st["name"]: st.get("outputs") or {} for st in job["stages"]}
            model = (outputs.get("serve") or {}).get("model")
            if model:
                wait_for_model(client, settings, model)
                print(f"\nYou: {args.question}")
                print(f"{model}: {ask(client, settings, model, args.question).strip()}\n")
            print_results(job)
            report = (outputs.get("report") or {}).get("report")
            if report:
                print(f"report: {report}")
            return 0
        except (httpx.HTTPError, TimeoutError, RuntimeError) as e:
            print(f"ncp demo: {type(e).__name__}: {e}", file=sys.stderr)
            return 1
        finally:
            if started is not None:
                if args.keep_running:
                    print(
                        f"ncp demo: the platform keeps running (pid {started.pid}); stop it with "
                        f"kill {started.pid}",
                        flush=True,
                    )
                else:
                    stop_platform(started)
