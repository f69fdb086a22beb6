"""Per-run Markdown report: job summary, loss curve, eval tables, samples.

Inputs are what the stages leave in the run folder: `progress.jsonl` (one JSON object per line;
`type` progress carries step/loss, `type` eval carries val_bpb; SFT's records carry `stage` "sft",
pretraining's none) and the results JSON files of the eval stage in `eval/`. Unreadable lines
are skipped and counted rather than failing the report: it is written at the end of a run whose
progress file may have been cut mid-line by a crash.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

from shared.paths import RunPaths


def _read_progress(
    path: Path,
) -> tuple[dict[str, list[tuple[int, float]]], dict[str, list[tuple[int, float]]], int]:
    """(loss series per stage, val bpb series per stage, number of bad lines)."""
    losses: dict[str, list[tuple[int, float]]] = {}
    bpbs: dict[str, list[tuple[int, float]]] = {}
    bad = 0
    if not path.is_file():
        return losses, bpbs, bad
    for line in path.read_text(encoding="utf-8", errors="replace").splitlines():
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
            stage = str(rec.get("stage", "pretrain"))  # SFT records carry stage "sft"
            step = int(rec["step"])
            if rec.get("type") == "progress" and _num(rec.get("loss")):
                losses.setdefault(stage, []).append((step, float(rec["loss"])))
            elif rec.get("type") == "eval" and _num(rec.get("val_bpb")):
                bpbs.setdefault(stage, []).append((step, float(rec["val_bpb"])))
        except (ValueError, KeyError, TypeError, AttributeError):
            bad += 1
    return losses, bpbs, bad


def _num(x) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


def _plot(losses, bpbs, out: Path) -> bool:
    if not losses and not bpbs:
        return False
    import matplotlib

    matplotlib.use("Agg")  # no display in workers and containers
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4), dpi=100)
    for stage, pts in losses.items():
        pts = sorted(pts)
        ax.plot([s for s, _ in pts], [v for _, v in pts], label=f"{stage} loss")
    for stage, pts in bpbs.items():
        pts = sorted(pts)
        ax.plot([s for s, _ in pts], [v for _, v in pts], "o--", label=f"{stage} val bpb")
    ax.set_xlabel("step")
    ax.set_ylabel("loss (nats) / bits per byte")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    tmp = out.with_name(out.stem + ".tmp.png")
    fig.savefig(tmp)
    plt.close(fig)
    os.replace(tmp, out)
    return True


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


def _job_section(job: dict | None) -> list[str]:
    if not job:
        return []
    lines = ["## Job", "", "| field | value |", "| --- | --- |"]
    for k, v in job.items():
        if isinstance(v, (dict, list)):
            continue
        lines.append(f"| {k} | {str(v).replace('|', '/')} |")
    nested = {k: v for k, v in job.items() if isinstance(v, (dict, list))}
    if nested:
        lines += ["", "```json", json.dumps(nested, indent=2, default=str), "```"]
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
    """Write run_dir/report/report.md (and loss.png when there is anything to plot)."""
    paths = RunPaths(Path(run_dir))
    if not paths.root.is_dir():
        raise FileNotFoundError(f"run_dir: {paths.root} is not a directory")
    paths.report.mkdir(parents=True, exist_ok=True)
    losses, bpbs, bad = _read_progress(paths.progress_file)
    has_plot = _plot(losses, bpbs, paths.report / "loss.png")
    title = (job or {}).get("name") or (job or {}).get("id") or paths.root.name
    lines = [f"# Run report: {title}", ""]
    lines += _job_section(job)
    lines += ["## Training", ""]
    for stage, pts in losses.items():
        pts = sorted(pts)
        lines.append(
            f"- {stage}: {len(pts)} logged steps, last step {pts[-1][0]}, first loss {_fmt(pts[0][1])}, last loss {_fmt(pts[-1][1])}"
        )
    for stage, pts in bpbs.items():
        lines.append(f"- {stage}: last val bpb {_fmt(sorted(pts)[-1][1])} (step {sorted(pts)[-1][0]})")
    if bad:
        lines.append(f"- {bad} unreadable line(s) in progress.jsonl skipped")
    if has_plot:
        lines += ["", "![loss curve](loss.png)"]
    elif not losses:
        lines.append("- no training progress recorded")
    lines.append("")
    base, chat = latest_eval(paths.eval, "base"), latest_eval(paths.eval, "chat")
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
