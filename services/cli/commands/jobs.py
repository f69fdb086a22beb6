"""`ncp jobs submit|list|status|watch|logs|cancel|resume`: the job API from the command line.

Talks to Settings.api_url with the bearer token from NCP_API_TOKEN. `watch` (and `submit --wait`)
follows the job's SSE event stream with progress bars (services/cli/watch_view.py); `logs -f`
follows the stage logs by byte offset. A job id may be given short (its first characters, as the
progress line prints it) wherever it names exactly one job.
"""

from __future__ import annotations

import argparse
import json
import queue
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from services.api.client import TERMINAL, ApiClientError, JobsClient, progress_line
from services.cli import human


def _client(args: argparse.Namespace) -> JobsClient:
    from shared.settings import get_settings

    s = get_settings()
    return JobsClient(args.api_url or s.api_url or "", s.api_token)


def _set_path(spec: dict[str, Any], dotted: str, value: Any) -> None:
    keys = dotted.split(".")
    cur = spec
    for k in keys[:-1]:
        nxt = cur.setdefault(k, {})
        if not isinstance(nxt, dict):
            raise ValueError(f"--set {dotted}: {k} is not a section")
        cur = nxt
    cur[keys[-1]] = value


def build_spec(args: argparse.Namespace) -> dict[str, Any]:
    """The spec to submit: a file or preset as the base, then flags, then --set overrides."""
    if args.spec and args.preset:
        raise ValueError("give either --spec or --preset, not both")
    spec: dict[str, Any] = {}
    if args.spec:
        path = Path(args.spec)
        text = path.read_text(encoding="utf-8")
        if path.suffix in (".yaml", ".yml"):
            import yaml

            spec = yaml.safe_load(text) or {}
        else:
            spec = json.loads(text)
        if not isinstance(spec, dict):
            raise ValueError(f"{path}: a job spec must be a JSON/YAML object")
    elif args.preset:
        from shared.jobs.spec import PRESETS

        if args.preset not in PRESETS:
            raise ValueError(f"--preset {args.preset!r} is unknown; presets: {sorted(PRESETS)}")
        spec = PRESETS[args.preset]().model_dump(mode="json", exclude_none=True)
    flags = {
        "kind": args.kind,
        "name": args.name,
        "model.depth": args.depth,
        "model.fp8": args.fp8,  # True or None: without the flag the spec (or preset) decides
        "horizon.num_iterations": args.num_iterations,
        "hardware.gpus": args.gpus,
        "hardware.device": args.device,
        "data.source": args.data_source,
        "data.path": args.data_path,
    }
    for dotted, value in flags.items():
        if value is not None:
            _set_path(spec, dotted, value)
    for item in args.set or []:
        key, sep, raw = item.partition("=")
        if not sep or not key:
            raise ValueError(f"--set {item!r}: expected key.path=value")
        try:
            value = json.loads(raw)
        except json.JSONDecodeError:
            value = raw  # bare strings need no quotes
        _set_path(spec, key, value)
    return spec


# How long `follow` waits, once the job has finished, for the event stream to deliver its last events.
END_GRACE_SECONDS = 5.0


def follow(client: JobsClient, job_id: str, out: Any = None, poll_seconds: float = 1.0) -> dict[str, Any]:
    """Follow the job until it finishes and return it: events as they stream in, and live progress
    (rich progress bars on a terminal, one plain line per change elsewhere)."""
    out = out or sys.stdout
    if out.isatty():
        from rich.console import Console

        from services.cli.watch_view import WatchView

        with WatchView(Console(file=out)) as view:
            return _follow(client, job_id, view.event, view.update, poll_seconds)

    last = {"line": "", "kernels": ""}

    def on_job(job: dict[str, Any]) -> None:
        report = human.kernel_report(job)
        line = human.kernel_line(report) if report else ""
        if line and line != last["kernels"]:
            last["kernels"] = line
            print(f"kernels: {line}", file=out)
        line = progress_line(job)
        if line != last["line"]:
            print(line, file=out, flush=True)
            last["line"] = line

    return _follow(client, job_id, lambda line: print(line, file=out), on_job, poll_seconds)


def _follow(
    client: JobsClient,
    job_id: str,
    on_event: Callable[[str], None],
    on_job: Callable[[dict[str, Any]], None],
    poll_seconds: float,
) -> dict[str, Any]:
    events: queue.Queue[Any] = queue.Queue()

    def reader() -> None:
        try:
            for ev in client.stream_events(job_id):
                events.put(ev)
        except ApiClientError as e:
            events.put(e)
        events.put(None)

    threading.Thread(target=reader, daemon=True, name="sse-reader").start()
    stream_done = False
    finished_at: float | None = None
    while True:
        while True:
            try:
                item = events.get_nowait()
            except queue.Empty:
                break
            if item is None:
                stream_done = True
            elif isinstance(item, ApiClientError):
                on_event(f"(event stream: {item}; polling instead)")
            elif item.event == "error":
                on_event(f"(event stream error: {item.data})")
            elif item.event != "end":
                ev = item.json()
                stage = f"[{ev['stage']}] " if ev.get("stage") else ""
                on_event(f"{ev['ts'][11:19]} {stage}{ev['message']}")
        job = client.get(job_id)  # carries the kernel report once the trainer has written it
        on_job(job)
        if job["status"] in TERMINAL:
            if stream_done and events.empty():
                return job
            if finished_at is None:
                finished_at = time.monotonic()
            elif time.monotonic() - finished_at > END_GRACE_SECONDS:
                stream_done = True  # the stream never said goodbye; the job is over regardless
            time.sleep(0.1)
            continue
        time.sleep(poll_seconds)


def _print_json(obj: Any) -> None:
    print(json.dumps(obj, indent=2, default=str))


def _exit_code(job: dict[str, Any]) -> int:
    return 0 if job["status"] == "succeeded" else 1


def _run(fn: Any) -> Any:
    def wrapped(args: argparse.Namespace) -> int:
        try:
            with _client(args) as client:
                return int(fn(client, args) or 0)
        except ApiClientError as e:
            print(f"ncp jobs: {e}", file=sys.stderr)
            return 1

    return wrapped


def _submit(client: JobsClient, args: argparse.Namespace) -> int:
    job = client.submit(build_spec(args), args.idempotency_key)
    if args.json:
        _print_json(job)
    else:
        print(
            f"submitted job {job['id']} ({job['kind']}, stages: {', '.join(s['name'] for s in job['stages'])})"
        )
    if args.wait:
        return _exit_code(follow(client, job["id"]))
    return 0


def _list(client: JobsClient, args: argparse.Namespace) -> int:
    page = client.list_jobs(status=args.status, limit=args.limit, cursor=args.cursor)
    if args.json:
        _print_json(page)
        return 0
    print(f"{'ID':36}  {'KIND':8}  {'STATUS':10}  {'STAGE':10}  {'%':>5}  CREATED")
    for j in page["data"]:
        print(
            f"{j['id']:36}  {j['kind']:8}  {j['status']:10}  {(j['current_stage'] or '-'):10}  "
            f"{j['progress']['percent']:5.1f}  {j['created_at'][:19]}"
        )
    if page.get("next_cursor"):
        print(f"(more: --cursor {page['next_cursor']})")
    return 0


def _status(client: JobsClient, args: argparse.Namespace) -> int:
    job = client.get(client.resolve(args.job_id))
    if args.json:
        _print_json(job)
        return 0
    print(progress_line(job))
    for st in job["stages"]:
        err = f"  {st['error']}" if st.get("error") else ""
        print(f"  {st['order'] + 1}. {st['name']:10} {st['status']}{err}")
    for stage, report in (job.get("kernels") or {}).items():
        print(f"  kernels · {stage}: {human.kernel_line(report)}")
    if job.get("latest_checkpoint"):
        c = job["latest_checkpoint"]
        bpb = f", val_bpb {c['val_bpb']:.4f}" if c.get("val_bpb") is not None else ""
        print(f"  newest checkpoint: {c['kind']} step {c['step']}{bpb} at {c['path']}")
    return 0


def _watch(client: JobsClient, args: argparse.Namespace) -> int:
    return _exit_code(follow(client, client.resolve(args.job_id)))


def _logs(client: JobsClient, args: argparse.Namespace) -> int:
    job_id = client.resolve(args.job_id)
    if args.follow:
        return follow_logs(client, job_id, file=args.file)
    logs = client.logs(job_id, lines=args.lines, file=args.file)
    if not logs:
        print("(no log files yet)")
    for name, text in logs.items():
        if len(logs) > 1:
            print(f"==> {name} <==")
        print(text)
    return 0


def follow_logs(
    client: JobsClient, job_id: str, file: str | None = None, out: Any = None, poll_seconds: float = 1.0
) -> int:
    """Print the job's log lines as they are written (each once, from about the last 64 KiB of each
    file on), picking up the log of every stage that starts, until the job has finished."""
    out = out or sys.stdout
    offsets: dict[str, int] = {}
    current: str | None = None
    while True:
        job = client.get(job_id)  # status first: a finished job's logs are complete when read next
        names = [file] if file else sorted(client.logs(job_id, lines=1))
        for name in names:
            try:
                chunk = client.log_chunk(job_id, name, offsets.get(name))
            except ApiClientError as e:
                if e.status == 404:
                    continue  # that stage's log does not exist yet
                raise
            offsets[name] = chunk["next_offset"]
            if not chunk["text"]:
                continue
            if not file and name != current:
                print(f"==> {name} <==", file=out)
                current = name
            print(chunk["text"], end="", file=out, flush=True)
        if job["status"] in TERMINAL:
            return 0
        time.sleep(poll_seconds)


def _cancel(client: JobsClient, args: argparse.Namespace) -> int:
    job = client.cancel(client.resolve(args.job_id))
    print(f"job {job['id']}: {job['status']}")
    return 0


def _resume(client: JobsClient, args: argparse.Namespace) -> int:
    job = client.resume(client.resolve(args.job_id))
    print(f"job {job['id']}: {job['status']}")
    if args.wait:
        return _exit_code(follow(client, job["id"]))
    return 0


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("jobs", help="submit and follow jobs through the API")
    p.add_argument("--api-url", help="API base URL (default: NCP_API_URL)")
    sub = p.add_subparsers(dest="jobs_command", metavar="ACTION")
    p.set_defaults(func=lambda _a: (p.print_help(), 2)[1])

    s = sub.add_parser("submit", help="submit a job")
    s.add_argument("--spec", help="job spec file (JSON or YAML)")
    s.add_argument("--preset", help="named preset, e.g. demo")
    s.add_argument("--kind", choices=["pipeline", "pretrain", "sft", "eval", "import"])
    s.add_argument("--name")
    s.add_argument("--depth", type=int)
    s.add_argument("--num-iterations", type=int)
    s.add_argument(
        "--fp8",
        action="store_true",
        default=None,
        help="pretrain in FP8 (model.fp8; needs an FP8 GPU; SFT and eval stay bf16)",
    )
    s.add_argument("--gpus", type=int)
    s.add_argument("--device", choices=["auto", "cpu", "cuda"])
    s.add_argument("--data-source", choices=["demo", "local", "remote"])
    s.add_argument("--data-path")
    s.add_argument(
        "--set", action="append", metavar="KEY.PATH=VALUE", help="override any spec field (JSON value)"
    )
    s.add_argument("--idempotency-key")
    s.add_argument("--wait", action="store_true", help="follow the job until it finishes")
    s.add_argument("--json", action="store_true")
    s.set_defaults(func=_run(_submit))

    ls = sub.add_parser("list", help="list jobs, newest first")
    ls.add_argument("--status", action="append")
    ls.add_argument("--limit", type=int, default=20)
    ls.add_argument("--cursor")
    ls.add_argument("--json", action="store_true")
    ls.set_defaults(func=_run(_list))

    st = sub.add_parser("status", help="one job's status, stages and progress")
    st.add_argument("job_id")
    st.add_argument("--json", action="store_true")
    st.set_defaults(func=_run(_status))

    w = sub.add_parser("watch", help="follow a job live until it finishes")
    w.add_argument("job_id")
    w.set_defaults(func=_run(_watch))

    lg = sub.add_parser("logs", help="tail of the job's log files")
    lg.add_argument("job_id")
    lg.add_argument("--lines", type=int, default=200)
    lg.add_argument("--file", help="one log file, e.g. pretrain.log")
    lg.add_argument(
        "-f", "--follow", action="store_true", help="print new lines as they are written until the job ends"
    )
    lg.set_defaults(func=_run(_logs))

    c = sub.add_parser("cancel", help="cancel a job")
    c.add_argument("job_id")
    c.set_defaults(func=_run(_cancel))

    r = sub.add_parser("resume", help="resume a cancelled or failed job")
    r.add_argument("job_id")
    r.add_argument("--wait", action="store_true")
    r.set_defaults(func=_run(_resume))
