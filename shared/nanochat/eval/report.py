"""Per-run Markdown report: the job as it ended, a summary table, training curves, eval tables,
samples.

Inputs are what the stages leave in the run folder: `progress.jsonl` (one JSON object per line;
`type` progress carries step, loss, lr multiplier, tokens/s, MFU; `type` eval carries val_bpb;
SFT's records carry `stage` "sft", pretraining's none) and the results JSON files of the eval
stages in `eval/`. Unreadable lines are skipped and counted rather than failing the report: it is
written at the end of a run whose progress file may have been cut mid-line by a crash.

Plots are one per stage and unit, never mixed: `<stage>_loss.png` (loss in nats per token: the raw
per-step loss and its smoothed curve) and `<stage>_bpb.png` (validation bits per byte). Pretraining
and SFT count their steps from 1 each, so drawing them on one axis would overlay unrelated steps.
"""

from __future__ import annotations

import json
import math
import os
import statistics
from dataclasses import dataclass, field
from pathlib import Path

from shared.paths import RunPaths

# Smoothing of the loss curve: the trainer's own (train.py EMA_BETA), debiased the same way.
SMOOTHING = 0.9
# The report is the job's closing stage: once it is written, the job ends with what the other
# stages did (pipeline.py marks the job succeeded right after, or records the failure).
REPORT_STAGE = "report"
_DONE = ("succeeded", "skipped")


@dataclass
class StageCurves:
    """One training stage's series, one value per step (a resumed run's repeated steps overwrite)."""

    loss: dict[int, float] = field(default_factory=dict)  # raw per-step training loss
    lr_mult: dict[int, float] = field(default_factory=dict)
    tokens_per_sec: dict[int, float] = field(default_factory=dict)
    mfu: dict[int, float] = field(default_factory=dict)
    val_bpb: dict[int, float] = field(default_factory=dict)
    train_seconds: float | None = None
    total_steps: int | None = None


def _num(x) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


def read_progress(path: Path) -> tuple[dict[str, StageCurves], int]:
    """(curves per stage, number of unreadable lines)."""
    stages: dict[str, StageCurves] = {}
    bad = 0
    if not path.is_file():
        return stages, bad
    for line in path.read_text(encoding="utf-8", errors="replace").splitlines():
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
            kind = rec.get("type")
            if kind not in ("progress", "eval"):
                continue
            cur = stages.setdefault(str(rec.get("stage", "pretrain")), StageCurves())
            step = int(rec["step"])
            if kind == "eval":
                if _num(rec.get("val_bpb")):
                    cur.val_bpb[step] = float(rec["val_bpb"])
                continue
            # Pretraining reports the smoothed loss as `loss` and the step's own as `raw_loss`.
            raw = rec.get("raw_loss", rec.get("loss"))
            for series, value in (
                (cur.loss, raw),
                (cur.lr_mult, rec.get("lr_mult")),
                (cur.tokens_per_sec, rec.get("tokens_per_sec")),
                (cur.mfu, rec.get("mfu")),
            ):
                if _num(value):
                    series[step] = float(value)
            if _num(rec.get("total_training_seconds")):
                cur.train_seconds = float(rec["total_training_seconds"])
            if isinstance(rec.get("total_steps"), int):
                cur.total_steps = rec["total_steps"]
        except (ValueError, KeyError, TypeError, AttributeError):
            bad += 1
    return stages, bad


def smooth(values: list[float], beta: float = SMOOTHING) -> list[float]:
    """Debiased exponential moving average (starts at the data, not at zero)."""
    out, avg = [], 0.0
    for i, v in enumerate(values):
        avg = beta * avg + (1 - beta) * v
        out.append(avg / (1 - beta ** (i + 1)))
    return out


def _save(fig, out: Path) -> None:  # noqa: ANN001 - a matplotlib Figure
    import matplotlib.pyplot as plt

    fig.tight_layout()
    tmp = out.with_name(out.stem + ".tmp.png")
    fig.savefig(tmp)
    plt.close(fig)
    os.replace(tmp, out)


def plot_stage(stage: str, curves: StageCurves, out_dir: Path) -> list[tuple[str, str]]:
    """Write `<stage>_loss.png` and `<stage>_bpb.png` (what has data); returns (title, file name)."""
    import matplotlib

    matplotlib.use("Agg")  # no display in workers and containers
    import matplotlib.pyplot as plt

    written = []
    if curves.loss:
        steps = sorted(curves.loss)
        raw = [curves.loss[s] for s in steps]
        fig, ax = plt.subplots(figsize=(7, 3.6), dpi=100)
        ax.plot(steps, raw, color="#93c5fd", linewidth=0.8, label="per step")
        ax.plot(steps, smooth(raw), color="#1d4ed8", linewidth=2, label=f"smoothed (EMA {SMOOTHING})")
        ax.set(xlabel=f"{stage} step", ylabel="loss (nats per token)", title=f"{stage}: training loss")
        ax.grid(alpha=0.3)
        ax.legend()
        _save(fig, out_dir / f"{stage}_loss.png")
        written.append((f"{stage} training loss", f"{stage}_loss.png"))
    if curves.val_bpb:
        steps = sorted(curves.val_bpb)
        fig, ax = plt.subplots(figsize=(7, 3.6), dpi=100)
        ax.plot(steps, [curves.val_bpb[s] for s in steps], "o-", color="#dc2626")
        ax.set(xlabel=f"{stage} step", ylabel="bits per byte", title=f"{stage}: validation bits per byte")
        ax.grid(alpha=0.3)
        _save(fig, out_dir / f"{stage}_bpb.png")
        written.append((f"{stage} validation bpb", f"{stage}_bpb.png"))
    return written


def latest_eval(eval_dir: Path, kind: str) -> dict | None:
    """The newest (highest step) `{kind}_eval_<step>.json` result in `eval_dir`, or None."""
    best = None
    for p in sorted(eval_dir.glob(f"{kind}_eval_*.json")):
        try:
            data = json.loads(p.read_text(encoding="utf-8"))
        except (OSError, json.JSONDecodeError):
            continue
        if isinstance(data, dict) and (best is None or data.get("step", -1) >= best.get("step", -1)):
            best = data
    return best


def _fmt(x, digits: int = 4) -> str:
    return f"{x:.{digits}f}" if _num(x) else "-"


def _duration(seconds: float | None) -> str:
    if seconds is None or not _num(seconds):
        return "-"
    h, rem = divmod(int(round(seconds)), 3600)
    return f"{h}h {rem // 60:02d}m" if h else f"{rem // 60}m {rem % 60:02d}s"


def final_state(job: dict) -> dict:
    """The job as it ends. The report stage runs while the job is still `running`; when every
    other stage is done, the job ends `succeeded` as soon as this report is written, so that is
    what the report says (a failed or cancelled job's status is kept as it is)."""
    stages = job.get("stages")
    if job.get("status") != "running" or not isinstance(stages, dict):
        return job
    others = {k: v for k, v in stages.items() if k != REPORT_STAGE}
    if not all(v in _DONE for v in others.values()):
        return job
    return {**job, "status": "succeeded", "stages": {**stages, REPORT_STAGE: "succeeded"}}


def _job_section(job: dict | None) -> list[str]:
    if not job:
        return []
    job = final_state(job)
    lines = ["## Job", "", "| field | value |", "| --- | --- |"]
    for k, v in job.items():
        if isinstance(v, (dict, list)):
            continue
        lines.append(f"| {k} | {str(v).replace('|', '/')} |")
    stages, checkpoints = job.get("stages"), job.get("checkpoints")
    if isinstance(stages, dict) and stages:
        lines += ["", "| stage | status |", "| --- | --- |", *(f"| {k} | {v} |" for k, v in stages.items())]
    if isinstance(checkpoints, list) and checkpoints:
        lines += ["", "| checkpoint | step | val bpb |", "| --- | --- | --- |"]
        lines += [
            f"| {c.get('kind')} | {c.get('step')} | {_fmt(c.get('val_bpb'))} |"
            for c in checkpoints
            if isinstance(c, dict)
        ]
    # Eval numbers have their own sections below; anything else nested is shown as it is.
    nested = {
        k: v
        for k, v in job.items()
        if isinstance(v, (dict, list)) and k not in ("stages", "checkpoints", "eval")
    }
    if nested:
        lines += ["", "```json", json.dumps(nested, indent=2, default=str), "```"]
    return lines + [""]


def _summary(stages: dict[str, StageCurves], base: dict | None, chat: dict | None) -> list[str]:
    lines = ["## Summary", ""]
    if stages:
        lines += [
            "| stage | steps | final loss (smoothed) | best val bpb | final val bpb | tokens/s (median) | MFU (mean) | training time |",
            "| --- | --- | --- | --- | --- | --- | --- | --- |",
        ]
        for name, c in stages.items():
            steps = sorted(c.loss)
            final = smooth([c.loss[s] for s in steps])[-1] if steps else None
            last_bpb = c.val_bpb[max(c.val_bpb)] if c.val_bpb else None
            done = f"{steps[-1]:,}" + (f" / {c.total_steps:,}" if c.total_steps else "") if steps else "-"
            tps = statistics.median(c.tokens_per_sec.values()) if c.tokens_per_sec else None
            mfu = f"{100 * statistics.fmean(c.mfu.values()):.1f}%" if c.mfu else "-"
            lines.append(
                f"| {name} | {done} | {_fmt(final)} | {_fmt(min(c.val_bpb.values()) if c.val_bpb else None)} "
                f"| {_fmt(last_bpb)} | {f'{tps:,.0f}' if tps else '-'} | {mfu} | {_duration(c.train_seconds)} |"
            )
    else:
        lines.append("- no training progress recorded")
    headline = []
    if base:
        headline.append(
            f"| base model (step {base.get('step')}) | val bpb {_fmt(base.get('val_bpb'))} | CORE {_fmt((base.get('core') or {}).get('core'))} |"
        )
    if chat:
        headline.append(f"| chat model (step {chat.get('step')}) | ChatCORE {_fmt(chat.get('chatcore'))} | |")
    if headline:
        lines += ["", "| model | | |", "| --- | --- | --- |", *headline]
    return lines + [""]


def _base_section(base: dict) -> list[str]:
    core = base.get("core") or {}
    lines = [
        f"## Base model (step {base.get('step')})",
        "",
        f"- validation bits per byte: **{_fmt(base.get('val_bpb'))}**",
    ]
    lines.append(
        f"- CORE: **{_fmt(core.get('core'))}**"
        + (" (fixture bundle)" if "fixture" in str(base.get("bundle_dir", "")) else "")
    )
    lines += ["", "| CORE task | accuracy | centred |", "| --- | --- | --- |"]
    for label, acc in (core.get("results") or {}).items():
        lines.append(f"| {label} | {_fmt(acc)} | {_fmt((core.get('centered') or {}).get(label))} |")
    for label, err in (core.get("failed") or {}).items():
        lines.append(f"| {label} | failed | {str(err).replace('|', '/')[:200]} |")
    lines.append(f"| **mean (CORE)** | | **{_fmt(core.get('core'))}** |")
    return lines + [""] + _samples(base.get("samples"), "Base model samples")


def _chat_section(chat: dict) -> list[str]:
    lines = [
        f"## Chat model (step {chat.get('step')})",
        "",
        "| chat task | accuracy | centred | problems |",
        "| --- | --- | --- | --- |",
    ]
    for name, r in (chat.get("tasks") or {}).items():
        lines.append(
            f"| {name} | {_fmt(r.get('accuracy'))} | {_fmt(r.get('centered'))} | {r.get('n', '-')} |"
        )
    for name, err in (chat.get("failed") or {}).items():
        lines.append(f"| {name} | failed | {str(err).replace('|', '/')[:200]} | |")
    partial = "" if chat.get("chatcore_complete") else " (over the tasks run, not all five)"
    lines.append(f"| **ChatCORE**{partial} | | **{_fmt(chat.get('chatcore'))}** | |")
    return lines + [""] + _samples(chat.get("samples"), "Chat samples")


def _samples(samples, title: str) -> list[str]:
    if not samples:
        return []
    lines = [f"### {title}", ""]
    for s in samples:
        completion = str(s.get("completion", "")).replace("```", "'''")
        lines += [f"**{s.get('prompt', '')}**", "", "```", completion, "```", ""]
    return lines


def write_report(run_dir, job: dict | None = None) -> Path:
    """Write run_dir/report/report.md and one plot per stage and unit (what has data)."""
    paths = RunPaths(Path(run_dir))
    if not paths.root.is_dir():
        raise FileNotFoundError(f"run_dir: {paths.root} is not a directory")
    paths.report.mkdir(parents=True, exist_ok=True)
    stages, bad = read_progress(paths.progress_file)
    base, chat = latest_eval(paths.eval, "base"), latest_eval(paths.eval, "chat")
    title = (job or {}).get("name") or (job or {}).get("id") or paths.root.name
    lines = [f"# Run report: {title}", ""]
    lines += _job_section(job)
    lines += _summary(stages, base, chat)
    lines += ["## Training", ""]
    for name, curves in stages.items():
        for caption, file in plot_stage(name, curves, paths.report):
            lines += [f"![{caption}]({file})", ""]
    if bad:
        lines += [f"- {bad} unreadable line(s) in progress.jsonl skipped", ""]
    if base:
        lines += _base_section(base)
    if chat:
        lines += _chat_section(chat)
    if not base and not chat:
        lines += ["## Evaluation", "", "No evaluation results in eval/.", ""]
    out = paths.report / "report.md"
    tmp = out.with_suffix(".md.tmp")
    tmp.write_text("\n".join(lines), encoding="utf-8")
    os.replace(tmp, out)
    return out
