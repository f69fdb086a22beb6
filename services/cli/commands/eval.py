"""`ncp eval base|chat|report|bundle|fixtures`: evaluate checkpoints and write run reports."""

from __future__ import annotations

import argparse
import json
from pathlib import Path


def _print(obj: dict) -> None:
    print(json.dumps(obj, indent=2, default=str))


def _base(args: argparse.Namespace) -> int:
    from shared.nanochat.eval.runner import run_base_eval

    res = run_base_eval(
        Path(args.checkpoint),
        args.step,
        Path(args.tokenizer),
        Path(args.data),
        Path(args.out),
        bundle_dir=Path(args.bundle) if args.bundle else None,
        max_per_task=args.max_per_task,
        device=args.device,
        bpb_tokens=args.bpb_tokens,
        bpb_batch_size=args.batch_size,
    )
    core = res["core"]
    _print(
        {
            "step": res["step"],
            "val_bpb": res["val_bpb"],
            "core": core["core"],
            "tasks": core["centered"],
            "failed": core["failed"],
            "samples": res["samples"],
        }
    )
    return 1 if core["failed"] else 0


def _chat(args: argparse.Namespace) -> int:
    from shared.nanochat.eval.runner import run_chat_eval

    res = run_chat_eval(
        Path(args.checkpoint),
        args.step,
        Path(args.tokenizer),
        Path(args.out),
        tasks_dir=Path(args.tasks_dir) if args.tasks_dir else None,
        tasks=args.tasks.split(",") if args.tasks else None,
        max_per_task=args.max_per_task,
        device=args.device,
        num_samples=args.num_samples,
        max_new_tokens=args.max_new_tokens,
        temperature=args.temperature,
    )
    _print({k: res[k] for k in ("step", "tasks", "chatcore", "chatcore_complete", "failed", "samples")})
    return 1 if res["failed"] else 0


def _report(args: argparse.Namespace) -> int:
    from shared.nanochat.eval.report import write_report

    job = json.loads(Path(args.job).read_text(encoding="utf-8")) if args.job else None
    print(write_report(Path(args.run_dir), job))
    return 0


def _bundle(args: argparse.Namespace) -> int:
    from shared.nanochat.eval.bundle import EVAL_BUNDLE_URL, BundleDownloadError, download_bundle

    try:
        out = download_bundle(
            Path(args.out), url=args.url or EVAL_BUNDLE_URL, sha256=args.sha256, size=args.size
        )
    except BundleDownloadError as e:
        raise ValueError(str(e)) from e
    print(out)
    return 0


def _fixtures(args: argparse.Namespace) -> int:
    from shared.nanochat.eval.fixtures import write_fixture_bundle, write_fixture_chat_tasks

    out = Path(args.out)
    print(write_fixture_bundle(out / "core_bundle"))
    print(write_fixture_chat_tasks(out / "chat_tasks"))
    return 0


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--checkpoint", required=True, help="checkpoint folder, e.g. RUN/base_checkpoints/d12")
    p.add_argument("--step", type=int, default=None, help="checkpoint step (default: newest complete)")
    p.add_argument("--tokenizer", required=True, help="tokenizer folder (tokenizer.json)")
    p.add_argument("--out", required=True, help="folder for the results JSON")
    p.add_argument("--max-per-task", type=int, default=None, help="evaluate at most N items per task")
    p.add_argument("--device", default="auto", help="auto|cuda|rocm|mps|cpu")


def register(subparsers: argparse._SubParsersAction) -> None:
    ev = subparsers.add_parser("eval", help="evaluate checkpoints (bpb, CORE, chat tasks) and write reports")
    sub = ev.add_subparsers(dest="eval_command", metavar="ACTION")
    ev.set_defaults(func=lambda _a: (ev.print_help(), 2)[1])

    base = sub.add_parser("base", help="val bits-per-byte, CORE and samples of a base checkpoint")
    _common(base)
    base.add_argument("--data", required=True, help="corpus folder; its last shard is the validation split")
    base.add_argument("--bundle", help="CORE eval bundle folder (default: the generated fixture bundle)")
    base.add_argument("--bpb-tokens", type=int, default=1 << 20, help="validation tokens for bits per byte")
    base.add_argument("--batch-size", type=int, default=8, help="rows per forward for bits per byte")
    base.set_defaults(func=_base)

    chat = sub.add_parser("chat", help="ARC/MMLU/GSM8K/HumanEval and ChatCORE of a chat checkpoint")
    _common(chat)
    chat.add_argument(
        "--tasks-dir", help="local dataset folder in the Hub layout (default: generated fixtures)"
    )
    chat.add_argument("--tasks", help="comma list, e.g. ARC-Easy,GSM8K (default: all five)")
    chat.add_argument("--num-samples", type=int, default=1, help="samples per generative problem (pass@n)")
    chat.add_argument("--max-new-tokens", type=int, default=256)
    chat.add_argument("--temperature", type=float, default=0.0)
    chat.set_defaults(func=_chat)

    rep = sub.add_parser("report", help="write RUN_DIR/report/report.md with a loss plot and eval tables")
    rep.add_argument("run_dir")
    rep.add_argument("--job", help="JSON file with the job summary to include")
    rep.set_defaults(func=_report)

    bundle = sub.add_parser("bundle", help="download and verify the DCLM eval bundle for CORE")
    bundle.add_argument("--out", required=True, help="destination folder (holds core.yaml afterwards)")
    bundle.add_argument("--url", help="bundle zip URL (default: the reference nanochat's)")
    bundle.add_argument("--sha256", help="expected sha256 of the zip")
    bundle.add_argument("--size", type=int, help="expected size of the zip in bytes")
    bundle.set_defaults(func=_bundle)

    fx = sub.add_parser("fixtures", help="write the generated CORE bundle and chat task files")
    fx.add_argument("--out", required=True)
    fx.set_defaults(func=_fixtures)
