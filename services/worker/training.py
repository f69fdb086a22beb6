"""The pretrain and SFT stages: JobSpec -> trainer config, launch the child, record the result.

The trainer runs in a child process group (launcher.py) reading a JSON config. A stage that
finds complete checkpoints from an earlier attempt (a redelivered message, a crashed worker, a
cancelled-then-resumed job) resumes from the newest one; the trainer restores model, optimizer,
data-loader and loop state from it, so the loss curve continues instead of starting over.
Multi-node jobs (hardware.nodes > 1) are handed to the Kubernetes launcher
(services/train_worker/k8s.py) and followed through the same progress file on the shared volume.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

from services.worker.launcher import LaunchConfig, ProgressTail, run_training
from services.worker.pipeline import LeaseLost, StageCancelled, StageContext, StageError, StageInterrupted
from services.worker.progress import ProgressForwarder
from shared.db import registry
from shared.db.session import session_scope


def latest_complete_step(ckpt_dir: Path) -> int | None:
    if not ckpt_dir.is_dir():
        return None
    from shared.nanochat.checkpoint import latest_step

    return latest_step(ckpt_dir)


def pretrain_config(
    spec: dict[str, Any], *, data_dir: Path, tokenizer_dir: Path, ckpt_dir: Path, resume: bool
) -> dict[str, Any]:
    """The TrainConfig (shared/nanochat/train.py) a job spec describes, as from_dict input.

    What the spec leaves as None (batch size, horizon, weight decay) is left out, so the trainer's
    own default applies and derived numbers are computed once, in sizing.py. The vocabulary size
    is not passed: the trainer sizes the model from the tokenizer it loads.
    """
    m, hz, b, o = spec["model"], spec.get("horizon", {}), spec.get("batch", {}), spec.get("optim", {})
    ev, ck, hw = spec.get("eval", {}), spec.get("checkpoint", {}), spec.get("hardware", {})
    cfg: dict[str, Any] = {
        "data_dir": str(data_dir),
        "tokenizer_dir": str(tokenizer_dir),
        "checkpoint_dir": str(ckpt_dir),
        "depth": m["depth"],
        "aspect_ratio": m["aspect_ratio"],
        "head_dim": m["head_dim"],
        "max_seq_len": m["sequence_len"],
        "window_pattern": str(m.get("window_pattern", "SSSL")).upper(),
        "n_kv_head": m.get("n_kv_head"),
        "num_iterations": hz.get("num_iterations"),
        "target_flops": hz.get("target_flops"),
        "target_param_data_ratio": hz.get("target_param_data_ratio"),
        "device_batch_size": b.get("device_batch_size"),
        "total_batch_size": b.get("total_batch_size"),
        "embedding_lr": o.get("embedding_lr"),
        "unembedding_lr": o.get("unembedding_lr"),
        "matrix_lr": o.get("matrix_lr"),
        "scalar_lr": o.get("scalar_lr"),
        "weight_decay": o.get("weight_decay"),
        "warmup_steps": o.get("warmup_steps"),
        "warmdown_ratio": o.get("warmdown_ratio"),
        "eval_every": ev.get("every"),
        "eval_tokens": ev.get("tokens"),
        "save_every": ck.get("every"),
        "keep_last": ck.get("keep_last"),
        "resume": resume,
        "device": hw.get("device", "auto"),
        "seed": spec.get("seed", 42),
    }
    return _known_fields("shared.nanochat.train", "TrainConfig", cfg)


def sft_config(
    spec: dict[str, Any],
    *,
    tokenizer_dir: Path,
    base_dir: Path,
    out_dir: Path,
    resume: bool,
    roots: list[Path],
) -> dict[str, Any]:
    """The SFTConfig (shared/nanochat/sft.py) a job spec describes, as from_dict input.

    Spec sources map onto the SFT mixtures: `demo` (generated conversations), `conversations`
    (user JSONL files, added to the mixture), and Hub-layout task folders (`smoltalk`, `mmlu`,
    `gsm8k`) which select the reference's default mixture read from that folder.
    """
    from shared.paths import resolve_under_roots

    sft, b, hw = spec.get("sft", {}), spec.get("batch", {}), spec.get("hardware", {})
    sources = sft.get("sources") or [{"kind": "demo"}]
    conversations = [
        str(resolve_under_roots(s["path"], roots)) for s in sources if s["kind"] == "conversations"
    ]
    hub = [s for s in sources if s["kind"] in ("smoltalk", "mmlu", "gsm8k")]
    kinds = {s["kind"] for s in sources}
    cfg: dict[str, Any] = {
        "base_checkpoint_dir": str(base_dir),
        "tokenizer_dir": str(tokenizer_dir),
        "out_dir": str(out_dir),
        "conversations": conversations or None,
        "num_iterations": sft.get("num_iterations") or -1,
        "device_batch_size": sft.get("device_batch_size") or b.get("device_batch_size"),
        "resume": resume,
        "device": hw.get("device", "auto"),
        "seed": spec.get("seed", 42),
    }
    if hub:
        cfg["mixture"] = "default"
        cfg["tasks_dir"] = str(resolve_under_roots(hub[0]["path"], roots))
        # A mixture component the spec does not name gets 0 epochs: SFTConfig's defaults (MMLU x3,
        # GSM8K x4) would otherwise make SFT look for folders the user never provided.
        repeats = {s["kind"]: s.get("repeat", 1) for s in hub}
        for kind in ("smoltalk", "mmlu", "gsm8k"):
            cfg[f"{kind}_epochs"] = repeats.get(kind, 0)
    else:
        cfg["mixture"] = "demo" if "demo" in kinds else "jsonl"
    return _known_fields("shared.nanochat.sft", "SFTConfig", cfg)


def _known_fields(module: str, cls: str, cfg: dict[str, Any]) -> dict[str, Any]:
    """Drop Nones (the config's own default applies); a key the config class lacks is a bug here.

    Imported only to read field names (no model is built in the worker process).
    """
    import dataclasses
    import importlib

    klass = getattr(importlib.import_module(module), cls)
    names = {f.name for f in dataclasses.fields(klass)}
    unknown = sorted(set(cfg) - names)
    if unknown:
        raise StageError(
            "config_mapping", f"{cls} has no field(s) {unknown}; the spec mapping is out of date"
        )
    return {k: v for k, v in cfg.items() if v is not None}


def _nproc(ctx: StageContext) -> int:
    """Training processes on this node: one per GPU the job asks for, within the worker's GPUs."""
    if ctx.settings.nproc_per_node > 0:
        return ctx.settings.nproc_per_node
    hw = ctx.spec.get("hardware", {})
    if hw.get("device") == "cpu" or not hw.get("gpus"):
        return 1
    wanted = int(hw["gpus"])
    owned = [g for g in ctx.settings.gpus.split(",") if g.strip()]
    if owned and wanted > len(owned):
        raise StageError(
            "insufficient_gpus",
            f"hardware.gpus={wanted} but this train worker owns "
            f"{len(owned)} GPU(s) (NCP_GPUS={ctx.settings.gpus!r})",
        )
    return wanted


def _log_tail(path: Path, chars: int = 1500) -> str:
    try:
        text = path.read_text(errors="replace")
    except OSError:
        return ""
    return text[-chars:]


def _train(
    ctx: StageContext, mode: str, cfg: dict[str, Any], ckpt_dir: Path, kind: str, resume_step: int | None
) -> dict[str, Any]:
    cfg_path = ctx.run.root / "config" / f"{mode}.json"
    cfg_path.parent.mkdir(parents=True, exist_ok=True)
    cfg_path.write_text(json.dumps(cfg, indent=2))
    if resume_step is not None:
        ctx.event("resume", f"{mode} resumes from checkpoint step {resume_step}", {"step": resume_step})
    forward = ProgressForwarder(ctx.sessions, ctx.job_id, ctx.stage, kind)
    if resume_step is not None:
        _replay_unforwarded(ctx, forward, resume_step)
        _sync_checkpoints(ctx, ckpt_dir, kind)

    if int(ctx.spec.get("hardware", {}).get("nodes", 1)) > 1:
        rc, cancelled, error = _train_multinode(ctx, mode, cfg_path, forward)
        log_path = ctx.run.logs / f"{mode}.log"
    else:
        launch = LaunchConfig(
            mode=mode,
            config_path=cfg_path,
            run=ctx.run,
            nproc=_nproc(ctx),
            gpus=ctx.settings.gpus,
            cancel_grace_seconds=ctx.settings.cancel_grace_seconds,
        )
        result = run_training(
            launch, on_records=forward,
            should_cancel=lambda: ctx.heartbeat.lost.is_set() or ctx.cancel_requested(),
        )  # fmt: skip
        rc, cancelled, error, log_path = (
            result.returncode,
            result.cancelled,
            result.last_error,
            launch.log_path,
        )
        if result.escalation:
            ctx.event(
                "stop_escalated",
                f"trainer did not stop in time: sent {result.escalation}",
                {"signal": result.escalation},
            )
    _sync_checkpoints(ctx, ckpt_dir, kind)
    if ctx.heartbeat.lost.is_set():
        raise LeaseLost(ctx.job_id)
    if cancelled:
        raise StageCancelled(ctx.job_id)
    if rc != 0 or forward.done is None:
        detail = error or forward.error or f"exit code {rc}"
        raise StageError(f"{mode}_failed", f"{detail}; log tail ({log_path}):\n{_log_tail(log_path)}")
    done = forward.done
    if done.get("stopped"):
        raise StageInterrupted(
            f"the trainer stopped at step {done.get('step')} without a cancel (signalled?)"
        )
    return {
        "checkpoint_dir": str(ckpt_dir),
        "step": done.get("step"),
        "total_steps": done.get("total_steps"),
        "checkpoint_step": done.get("checkpoint_step"),
        "last_loss": done.get("last_loss"),
        "val_bpb": done.get("val_bpb"),
        "resumed_from": resume_step,
        "checkpoints": sorted(set(forward.checkpoints)),
    }


def _replay_unforwarded(ctx: StageContext, forward: ProgressForwarder, resume_step: int) -> None:
    """Forward the steps a killed attempt trained and wrote to progress.jsonl but whose records never
    reached the registry (its worker died first). Only steps the checkpoint covers are replayed:
    later ones are trained again, identically, and forwarded live. Pretraining records carry no
    `stage` key; SFT's say "sft"."""
    old = ProgressTail(ctx.run.progress_file, start_at_end=False).read()
    mine = [
        r
        for r in old
        if r.get("type") == "progress"
        and r.get("stage", "pretrain") == ctx.stage
        and isinstance(r.get("step"), int)
        and r["step"] <= resume_step
    ]
    if mine:
        forward(mine)


def _sync_checkpoints(ctx: StageContext, ckpt_dir: Path, kind: str) -> None:
    """Register every complete checkpoint on disk that the progress records did not announce: an
    attempt killed between writing a checkpoint and forwarding its record leaves one (or several,
    if the forwarder lagged) that the registry must still list."""
    if not ckpt_dir.is_dir():
        return
    from shared.nanochat.checkpoint import META_FILE, list_checkpoints

    on_disk = [c for c in list_checkpoints(ckpt_dir) if c.complete]
    if not on_disk:
        return
    with session_scope(ctx.sessions) as s:
        known = {c.step for c in registry.list_checkpoints(s, ctx.job_id, kind=kind)}
        for c in on_disk:
            if c.step not in known:
                meta = c.meta or {}
                # Same shape as a forwarded record: the meta file's path and the file names.
                path = ckpt_dir / META_FILE.format(step=c.step)
                registry.record_checkpoint(
                    s, ctx.job_id, ctx.stage, c.step, str(path), kind=kind,
                    val_bpb=meta.get("val_bpb"), files=sorted(meta.get("files") or {}),
                )  # fmt: skip


def _train_multinode(
    ctx: StageContext, mode: str, cfg_path: Path, forward: ProgressForwarder
) -> tuple[int, bool, str | None]:
    """Hand the run to the Kubernetes launcher and follow it through the shared progress file."""
    try:
        from services.train_worker import k8s
    except ImportError as e:
        raise StageError(
            "multinode_unavailable",
            f"hardware.nodes > 1 needs the Kubernetes launcher (services/train_worker/k8s.py): {e}",
        ) from None
    last_reason = None
    while True:
        info = k8s.launch_multinode(ctx.job_id, ctx.spec, ctx.settings, mode=mode, config_path=cfg_path)
        status, reason = info.get("status"), str(info.get("reason", ""))
        if status == "unavailable":
            raise StageError("multinode_unavailable", reason)
        if status in ("created", "exists"):
            ctx.event("multinode_launched", reason, _plain(info))
            break
        # "queued": the cluster cannot hold the pods now. The job waits (visibly) instead of failing.
        if reason != last_reason:
            ctx.event("waiting_for_gpus", reason, _plain(info))
            last_reason = reason
        if ctx.heartbeat.lost.is_set() or ctx.cancel_requested():
            return 0, True, None
        time.sleep(15.0)

    tail = ProgressTail(ctx.run.progress_file)
    cancelled = False
    stop_deadline = None
    while forward.done is None and forward.error is None:
        records = tail.read()
        if records:
            forward(records)
            continue
        if not cancelled and (ctx.heartbeat.lost.is_set() or ctx.cancel_requested()):
            cancelled = True
            ctx.run.stop_file.write_text("cancel requested\n")
            stop_deadline = time.monotonic() + ctx.settings.cancel_grace_seconds
        if stop_deadline is not None and time.monotonic() > stop_deadline:
            break  # the pods did not stop in time; deleting the Job kills them
        state = k8s.multinode_status(_k8s_job(k8s, ctx))
        if state in ("failed", "missing"):
            return 1, cancelled, f"Kubernetes Job {k8s.resource_name(ctx.job_id)} is {state}"
        time.sleep(2.0)
    if cancelled:
        k8s.delete_multinode(ctx.job_id, ctx.settings)
    return (0 if forward.done is not None else 1), cancelled, forward.error


def _k8s_job(k8s, ctx: StageContext) -> dict | None:  # noqa: ANN001 - the k8s module
    client = k8s.KubeClient(ctx.settings)
    try:
        return client.get_job(k8s.resource_name(ctx.job_id))
    finally:
        client.close()


def _plain(info: Any) -> dict[str, Any]:
    if isinstance(info, dict):
        return {k: v for k, v in info.items() if isinstance(v, (str, int, float, bool, type(None), list))}
    return {"result": str(info)}


def run_pretrain(ctx: StageContext, *, data_dir: Path, tokenizer_dir: Path, ckpt_dir: Path) -> dict[str, Any]:
    resume_step = latest_complete_step(ckpt_dir)
    cfg = pretrain_config(
        ctx.spec,
        data_dir=data_dir,
        tokenizer_dir=tokenizer_dir,
        ckpt_dir=ckpt_dir,
        resume=resume_step is not None,
    )
    return _train(ctx, "pretrain", cfg, ckpt_dir, "base", resume_step)


def run_sft(ctx: StageContext, *, tokenizer_dir: Path, base_dir: Path, out_dir: Path) -> dict[str, Any]:
    resume_step = latest_complete_step(out_dir)
    cfg = sft_config(
        ctx.spec,
        tokenizer_dir=tokenizer_dir,
        base_dir=base_dir,
        out_dir=out_dir,
        resume=resume_step is not None,
        roots=[ctx.settings.home, *ctx.settings.data_roots],
    )
    return _train(ctx, "sft", cfg, out_dir, "sft", resume_step)
