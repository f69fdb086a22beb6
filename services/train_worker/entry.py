"""The training child: `python -m services.train_worker.entry {pretrain|sft} --config CFG.json
--progress PROGRESS.jsonl --stop STOPFILE`, run directly or under torchrun.

Rank 0 appends one JSON object per line to the progress file (`type`: progress, eval, checkpoint,
done, error), flushed line by line so the worker can tail it. Every rank polls the stop file (and
treats SIGTERM the same way): the trainer saves a checkpoint and the process exits 0 with a done
record saying `"stopped": true`. Exit codes: 0 finished or stopped, 1 training failed, 2 bad
arguments or config.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import time
import traceback
from pathlib import Path
from typing import Any, TextIO

from services.train_worker.steplog import StepLogger, printer


class ProgressWriter:
    """Appends JSON lines; a no-op on ranks other than 0."""

    def __init__(self, path: Path, enabled: bool):
        self._f: TextIO | None = None
        if enabled:
            path.parent.mkdir(parents=True, exist_ok=True)
            self._f = open(path, "a", encoding="utf-8")  # noqa: SIM115 - lives as long as the run

    def write(self, kind: str, payload: dict[str, Any]) -> None:
        if self._f is None:
            return
        record = {"type": kind, "time": time.time(), **payload}
        # One write per line so a reader never sees half a record followed by another.
        self._f.write(json.dumps(record, default=_jsonable, allow_nan=False) + "\n")
        self._f.flush()

    def close(self) -> None:
        if self._f is not None:
            self._f.close()


def _jsonable(value: Any) -> Any:
    if isinstance(value, Path):
        return str(value)
    return repr(value)


def _finite(d: dict) -> dict:
    """JSON has no inf/nan: report them as null."""
    out = {}
    for k, v in d.items():
        if isinstance(v, float) and (v != v or v in (float("inf"), float("-inf"))):
            v = None
        out[k] = v
    return out


def _parse(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m services.train_worker.entry")
    p.add_argument("mode", choices=["pretrain", "sft"])
    p.add_argument("--config", required=True, type=Path, help="JSON: TrainConfig or SFTConfig fields")
    p.add_argument("--progress", required=True, type=Path, help="JSONL file rank 0 appends to")
    p.add_argument("--stop", required=True, type=Path, help="its existence asks the run to save and stop")
    return p.parse_args(argv)


def _load_config(mode: str, path: Path):
    try:
        data = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise ValueError(f"config {path}: {e}") from e
    if mode == "pretrain":
        from shared.nanochat.train import TrainConfig, train

        return TrainConfig.from_dict(data), train
    from shared.nanochat.sft import SFTConfig, sft  # only SFT runs need the SFT data machinery

    return SFTConfig.from_dict(data), sft


def main(argv: list[str] | None = None) -> int:
    args = _parse(argv)
    rank = int(os.environ.get("RANK", "0"))
    out = ProgressWriter(args.progress, enabled=rank == 0)

    from shared.settings import get_settings

    if get_settings().rocm_env_defaults:
        # Before torch touches the GPU: the allocator reads its config once.
        from shared.nanochat.device import apply_env_defaults

        apply_env_defaults()

    try:
        cfg, run = _load_config(args.mode, args.config)
    except ValueError as e:
        out.write("error", {"message": str(e), "error_type": "config"})
        print(f"entry: {e}", file=sys.stderr)
        out.close()
        return 2

    term = {"requested": False}

    def on_term(signum, frame):  # noqa: ARG001 - signal handler signature
        term["requested"] = True

    signal.signal(signal.SIGTERM, on_term)

    from shared.nanochat.device import cleanup_distributed
    from shared.nanochat.train import TrainHooks

    stop_file = args.stop
    # Readable step lines on stdout, which the launcher sends to the stage log (rank 0 only: the
    # trainer calls these hooks on rank 0).
    steps = StepLogger(printer(sys.stdout))

    def on_progress(d: dict) -> None:
        out.write("progress", _finite(d))
        steps.progress(d)

    def on_eval(d: dict) -> None:
        out.write("eval", _finite(d))
        steps.eval(d)

    def on_checkpoint(d: dict) -> None:
        out.write("checkpoint", _finite(d))
        steps.checkpoint(d)

    hooks = TrainHooks(
        on_progress=on_progress,
        on_eval=on_eval,
        on_checkpoint=on_checkpoint,
        should_stop=lambda: term["requested"] or stop_file.exists(),
    )
    clean_exit = False
    try:
        result = run(cfg, hooks)
        clean_exit = True
        out.write(
            "done",
            _finite(
                {
                    "mode": args.mode,
                    "step": result.step,
                    "total_steps": result.total_steps,
                    "stopped": result.stopped,
                    "last_loss": result.last_loss,
                    "val_bpb": result.val_bpb,
                    "checkpoint_step": result.checkpoint_step,
                }
            ),
        )
        return 0
    except Exception as e:
        out.write(
            "error",
            {
                "message": f"{type(e).__name__}: {e}",
                "error_type": type(e).__name__,
                "traceback": traceback.format_exc(),
            },
        )
        traceback.print_exc()
        return 1
    finally:
        out.close()
        cleanup_distributed(synchronize=clean_exit)


if __name__ == "__main__":
    sys.exit(main())
