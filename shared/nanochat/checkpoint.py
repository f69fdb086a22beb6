"""Checkpoints in the reference layout, written atomically, loaded safely, rebuilt from meta alone.

Layout of one checkpoint directory (e.g. `base_checkpoints/d12/`), as in the reference:
    model_{step:06d}.pt            model state_dict (rank 0)
    optim_{step:06d}_rank{r}.pt    optimizer shard of rank r (the optimizer state is sharded)
    meta_{step:06d}.json           step, val_bpb, model_config, user_config, batch sizes,
                                   dataloader state, loop state -- and, ours, "files"

Atomicity: every file is written to a temp name, fsynced and renamed; the meta is written LAST and
lists every file of the checkpoint with its size. A checkpoint is complete only when its meta
exists and every listed file has the listed size, so a crash at any point leaves either the old
complete checkpoint or an incomplete one that `latest_step` skips. Re-saving a step first removes
its meta, so old and new files can never be mixed. Reference checkpoints (no "files" in the meta)
count as complete when their model file exists; `import_reference` rewrites them into our form.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

MODEL_FILE = "model_{step:06d}.pt"
META_FILE = "meta_{step:06d}.json"
OPTIM_FILE = "optim_{step:06d}_rank{rank}.pt"
_META_RE = re.compile(r"^meta_(\d{6,})\.json$")
_ANY_RE = re.compile(r"^(?:model|meta|optim)_(\d{6,})(?:_rank\d+)?\.(?:pt|json)$")
# Temp files of an interrupted write (see _atomic_write).
_TMP_RE = re.compile(r"^\.(?:model|meta|optim)_(\d{6,})(?:_rank\d+)?\.(?:pt|json)\.tmp-\d+$")
FORMAT = "ncp-checkpoint-1"
# torch.compile wraps modules; their state-dict keys gain this prefix.
COMPILE_PREFIX = "_orig_mod."


class CheckpointError(ValueError):
    """A checkpoint is incomplete, truncated, foreign or does not fit the model."""


# --------------------------------------------------------------------------------------------
# Atomic file writing


def _fsync_dir(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _atomic_write(path: Path, write) -> int:
    """Write through `write(file_object)` to a temp file, fsync, rename over `path`; returns size."""
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()
    _fsync_dir(path.parent)
    return path.stat().st_size


def _save_torch(path: Path, obj: Any) -> int:
    return _atomic_write(path, lambda f: torch.save(obj, f))


def _save_json(path: Path, obj: dict) -> int:
    data = json.dumps(obj, indent=2, allow_nan=True).encode()
    return _atomic_write(path, lambda f: f.write(data))


def _copy_into(src: Path, out) -> None:
    with open(src, "rb") as f:
        shutil.copyfileobj(f, out)


def _barrier(world_size: int) -> None:
    if world_size > 1 and dist.is_available() and dist.is_initialized():
        dist.barrier()


# --------------------------------------------------------------------------------------------
# Saving


def save_checkpoint(
    ckpt_dir,
    step: int,
    model_state: dict | None,
    optim_state: dict | None,
    meta: dict,
    rank: int = 0,
    world_size: int = 1,
) -> Path:
    """Save one checkpoint; call on every rank (each writes its optimizer shard). Returns the
    meta path. Under a process group the ranks synchronise so rank 0 writes the meta only after
    every shard is on disk; without one, rank 0 waits (up to 10 min) for the shard files."""
    if step < 0:
        raise ValueError(f"step must be >= 0, got {step}")
    if not 0 <= rank < world_size:
        raise ValueError(f"rank must be in [0, world_size={world_size}), got {rank}")
    d = Path(ckpt_dir)
    meta_path = d / META_FILE.format(step=step)
    if rank == 0:
        if model_state is None:
            raise ValueError("rank 0 must pass model_state")
        d.mkdir(parents=True, exist_ok=True)
        # Invalidate any previous save of this step before touching its files.
        if meta_path.exists():
            meta_path.unlink()
            _fsync_dir(d)
    _barrier(world_size)
    d.mkdir(parents=True, exist_ok=True)
    if optim_state is not None:
        _save_torch(d / OPTIM_FILE.format(step=step, rank=rank), optim_state)
    if rank == 0:
        _save_torch(d / MODEL_FILE.format(step=step), model_state)
    _barrier(world_size)
    if rank == 0:
        names = [MODEL_FILE.format(step=step)]
        if optim_state is not None:
            names += [OPTIM_FILE.format(step=step, rank=r) for r in range(world_size)]
        files = {n: _wait_for(d / n) for n in names}
        full_meta = dict(meta)
        full_meta["step"] = step
        full_meta["format"] = FORMAT
        full_meta["world_size"] = world_size
        full_meta["files"] = files
        _save_json(meta_path, full_meta)
    _barrier(world_size)
    return meta_path


def _wait_for(path: Path, timeout: float = 600.0) -> int:
    deadline = time.monotonic() + timeout
    while not path.exists():
        if time.monotonic() > deadline:
            raise CheckpointError(
                f"{path.name} did not appear within {timeout:.0f}s; checkpoint left incomplete"
            )
        time.sleep(0.05)
    return path.stat().st_size


# --------------------------------------------------------------------------------------------
# Inspecting


@dataclass(frozen=True)
class CheckpointInfo:
    step: int
    complete: bool
    problem: str | None  # why it is incomplete
    meta: dict | None
    size_bytes: int


def _read_meta(path: Path) -> dict:
    try:
        meta = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{path}: unreadable checkpoint meta ({e})") from e
    if not isinstance(meta, dict):
        raise CheckpointError(f"{path}: checkpoint meta is not a JSON object")
    return meta


def _check(d: Path, step: int) -> tuple[dict | None, str | None]:
    """(meta, None) when the checkpoint at `step` is complete, else (meta or None, problem)."""
    meta_path = d / META_FILE.format(step=step)
    if not meta_path.exists():
        return None, f"{meta_path.name} missing (save incomplete)"
    try:
        meta = _read_meta(meta_path)
    except CheckpointError as e:
        return None, str(e)
    files = meta.get("files")
    if files is None:  # reference checkpoint: the model file is all we can check
        files = {MODEL_FILE.format(step=step): None}
    if not isinstance(files, dict):
        return meta, f"{meta_path.name}: 'files' must be an object"
    for name, size in files.items():
        p = d / name
        if not p.exists():
            return meta, f"{name} missing"
        if size is not None and p.stat().st_size != size:
            return meta, f"{name} has {p.stat().st_size} bytes, meta says {size} (truncated or replaced)"
    return meta, None


def _steps_present(d: Path) -> list[int]:
    if not d.is_dir():
        return []
    return sorted({int(m.group(1)) for f in d.iterdir() if (m := _ANY_RE.match(f.name))})


def list_checkpoints(ckpt_dir) -> list[CheckpointInfo]:
    d = Path(ckpt_dir)
    out = []
    for step in _steps_present(d):
        meta, problem = _check(d, step)
        size = sum(
            f.stat().st_size for f in d.iterdir() if (m := _ANY_RE.match(f.name)) and int(m.group(1)) == step
        )
        out.append(CheckpointInfo(step, problem is None, problem, meta, size))
    return out


def latest_step(ckpt_dir) -> int | None:
    """Newest *complete* checkpoint step, or None."""
    d = Path(ckpt_dir)
    for step in reversed(_steps_present(d)):
        if _check(d, step)[1] is None:
            return step
    return None


# --------------------------------------------------------------------------------------------
# Loading


def _torch_load(path: Path, device) -> Any:
    try:
        return torch.load(path, map_location=device, weights_only=True)
    except FileNotFoundError:
        raise
    except Exception as e:  # truncated zip, pickle with forbidden globals, not a torch file ...
        raise CheckpointError(f"{path}: not a loadable checkpoint file ({type(e).__name__}: {e})") from e


def normalize_model_state(state: Any, source: Path) -> dict[str, torch.Tensor]:
    if not isinstance(state, dict) or not all(
        isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in state.items()
    ):
        raise CheckpointError(f"{source}: expected a state_dict of name -> tensor")
    return {k.removeprefix(COMPILE_PREFIX): v for k, v in state.items()}


def load_checkpoint(
    ckpt_dir, step: int | None = None, device="cpu", load_optimizer: bool = False, rank: int = 0
) -> tuple[dict, dict | None, dict]:
    """(model_state, optim_state or None, meta). step None = newest complete checkpoint.
    Everything is verified before anything is returned; a bad checkpoint raises CheckpointError."""
    d = Path(ckpt_dir)
    if step is None:
        step = latest_step(d)
        if step is None:
            raise FileNotFoundError(f"no complete checkpoint in {d}")
    meta, problem = _check(d, step)
    if problem is not None:
        raise CheckpointError(f"checkpoint step {step} in {d} is incomplete: {problem}")
    assert meta is not None
    model_path = d / MODEL_FILE.format(step=step)
    model_state = normalize_model_state(_torch_load(model_path, device), model_path)
    optim_state = None
    if load_optimizer:
        world = meta.get("world_size")
        if world is not None and rank >= world:
            raise CheckpointError(
                f"{d}: checkpoint step {step} was saved by {world} rank(s); no shard for rank {rank}"
            )
        optim_state = load_optimizer_shard(d, step, rank, device)
    return model_state, optim_state, meta


def load_optimizer_shard(ckpt_dir, step: int, rank: int, device="cpu") -> dict:
    """The optimizer state_dict rank `rank` saved at `step` (no weights read)."""
    optim_path = Path(ckpt_dir) / OPTIM_FILE.format(step=step, rank=rank)
    if not optim_path.exists():
        raise CheckpointError(f"{optim_path} missing: checkpoint step {step} has no optimizer state")
    optim_state = _torch_load(optim_path, device)
    if not isinstance(optim_state, dict) or "state" not in optim_state or "param_groups" not in optim_state:
        raise CheckpointError(f"{optim_path}: not an optimizer state_dict")
    return optim_state


def checkpoint_meta(ckpt_dir, step: int | None = None) -> dict:
    """The meta of complete checkpoint `step` (None = newest) without loading any weights: what a
    stage checks (model config vs tokenizer) before it starts real work."""
    d = Path(ckpt_dir)
    if step is None:
        step = latest_step(d)
        if step is None:
            raise FileNotFoundError(f"no complete checkpoint in {d}")
    meta, problem = _check(d, step)
    if problem is not None:
        raise CheckpointError(f"checkpoint step {step} in {d} is incomplete: {problem}")
    assert meta is not None
    return {**meta, "step": meta.get("step", step)}


def model_config_from_meta(meta: dict, source: Path | str = "meta"):
    from shared.nanochat.config import GPTConfig

    cfg = meta.get("model_config")
    if not isinstance(cfg, dict):
        raise CheckpointError(f"{source}: meta has no 'model_config' object")
    cfg = dict(cfg)
    cfg.setdefault("window_pattern", "L")  # older reference checkpoints trained with full context
    try:
        return GPTConfig.from_dict(cfg)
    except (TypeError, ValueError) as e:
        raise CheckpointError(f"{source}: invalid model_config ({e})") from e


def check_state_matches(state: dict[str, torch.Tensor], config, source: Path | str) -> None:
    """Key set and shapes of `state` equal those of GPT(config); otherwise a CheckpointError
    naming the first differences."""
    from shared.nanochat.gpt import GPT

    with torch.device("meta"):
        expected = {k: tuple(v.shape) for k, v in GPT(config).state_dict().items()}
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    wrong = sorted(k for k in set(expected) & set(state) if tuple(state[k].shape) != expected[k])
    if missing or unexpected or wrong:
        parts = []
        if missing:
            parts.append(f"missing keys {missing[:5]}{' ...' if len(missing) > 5 else ''}")
        if unexpected:
            parts.append(f"unexpected keys {unexpected[:5]}{' ...' if len(unexpected) > 5 else ''}")
        if wrong:
            k = wrong[0]
            parts.append(
                f"shape of {k} is {tuple(state[k].shape)}, model needs {expected[k]}"
                + (f" (+{len(wrong) - 1} more)" if len(wrong) > 1 else "")
            )
        raise CheckpointError(f"{source}: state does not fit the model config: " + "; ".join(parts))


def build_model(
    ckpt_dir,
    step: int | None = None,
    device="cpu",
    *,
    compute_dtype: torch.dtype | None = None,
    attn_backend: str = "auto",
):
    """(GPT in eval mode, meta): the model rebuilt from the checkpoint's meta alone.

    compute_dtype None: fp32 on CPU/MPS, bf16 on CUDA/ROCm (embeddings stored in it, as in training)."""
    from shared.nanochat.gpt import GPT

    device = torch.device(device)
    model_state, _, meta = load_checkpoint(ckpt_dir, step, device="cpu")
    source = Path(ckpt_dir) / META_FILE.format(step=meta["step"])
    config = model_config_from_meta(meta, source)
    check_state_matches(model_state, config, source)
    if compute_dtype is None:
        compute_dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    with torch.device("meta"):
        model = GPT(config, attn_backend=attn_backend, compute_dtype=compute_dtype)
    model.to_empty(device=device)
    # init_weights sets the per-parameter storage dtypes and the rotary tables; the values are
    # then overwritten by the (dtype-converting) copy of load_state_dict.
    model.init_weights()
    model.load_state_dict(model_state, strict=True)
    model.eval()
    return model, meta


# --------------------------------------------------------------------------------------------
# Retention and import


def _remove_step(d: Path, step: int) -> None:
    meta = d / META_FILE.format(step=step)
    if meta.exists():  # meta first: the checkpoint becomes incomplete before any file vanishes
        meta.unlink()
    for f in d.iterdir():
        m = _ANY_RE.match(f.name)
        if m and int(m.group(1)) == step:
            f.unlink()


def apply_retention(ckpt_dir, keep_last: int, milestone_every: int = 0) -> list[int]:
    """Delete all but the newest `keep_last` complete checkpoints, keeping every step that is a
    multiple of `milestone_every` (> 0). Incomplete checkpoints older than the newest complete one
    are debris from crashes and are removed; newer ones may be a save in progress and are kept.
    Returns the removed steps."""
    if keep_last < 1:
        raise ValueError(f"keep_last must be >= 1, got {keep_last}")
    if milestone_every < 0:
        raise ValueError(f"milestone_every must be >= 0, got {milestone_every}")
    d = Path(ckpt_dir)
    infos = list_checkpoints(d)
    complete = [i.step for i in infos if i.complete]
    if not complete:
        return []
    keep = set(complete[-keep_last:])
    if milestone_every:
        keep |= {s for s in complete if s % milestone_every == 0}
    newest = complete[-1]
    removed = [i.step for i in infos if i.step not in keep and (i.complete or i.step < newest)]
    for step in removed:
        _remove_step(d, step)
    for f in d.iterdir():  # temp files of writes killed before their rename
        m = _TMP_RE.match(f.name)
        if m and int(m.group(1)) < newest:
            f.unlink()
    if removed:
        _fsync_dir(d)
    return removed


def import_reference(src_dir, dst_dir, step: int | None = None) -> list[int]:
    """Copy checkpoints of a reference nanochat checkpoint dir (or one of ours) into `dst_dir`,
    validating each model against its meta's model_config, and writing our meta with the file
    list. step None = every step present. Returns the imported steps."""
    src, dst = Path(src_dir), Path(dst_dir)
    if not src.is_dir():
        raise FileNotFoundError(f"checkpoint source {src} is not a directory")
    steps = (
        [step]
        if step is not None
        else [s for s in _steps_present(src) if (src / META_FILE.format(step=s)).exists()]
    )
    if not steps:
        raise CheckpointError(f"{src}: no meta_<step>.json files (not a nanochat checkpoint dir)")
    dst.mkdir(parents=True, exist_ok=True)
    for s in steps:
        meta, problem = _check(src, s)
        if problem is not None:
            raise CheckpointError(f"{src}: step {s} is incomplete: {problem}")
        assert meta is not None
        model_path = src / MODEL_FILE.format(step=s)
        state = normalize_model_state(_torch_load(model_path, "cpu"), model_path)
        config = model_config_from_meta(meta, src / META_FILE.format(step=s))
        # Older upstream checkpoints predate the per-layer lambdas; upstream's loader fills them
        # with their identity values (checkpoint_manager._patch_missing_keys), and so do we.
        state.setdefault("resid_lambdas", torch.ones(config.n_layer))
        state.setdefault("x0_lambdas", torch.zeros(config.n_layer))
        check_state_matches(state, config, model_path)
        optim_files = sorted(src.glob(f"optim_{s:06d}_rank*.pt"))
        for f in optim_files:
            _torch_load(f, "cpu")  # readable with weights_only before we vouch for it
        out_meta = {k: v for k, v in meta.items() if k not in ("files", "format", "world_size")}
        out_meta["model_config"] = config.to_dict()
        out_meta.setdefault("imported_from", str(src.resolve()))
        if (dst / META_FILE.format(step=s)).exists():
            (dst / META_FILE.format(step=s)).unlink()
        files = {MODEL_FILE.format(step=s): _save_torch(dst / MODEL_FILE.format(step=s), state)}
        for f in optim_files:
            files[f.name] = _atomic_write(dst / f.name, lambda out, f=f: _copy_into(f, out))
        out_meta.update(step=s, format=FORMAT, world_size=max(len(optim_files), 1), files=files)
        _save_json(dst / META_FILE.format(step=s), out_meta)
    return steps


def saved_world_size(ckpt_dir, step: int) -> int:
    """How many ranks wrote the optimizer state of `step` (0 = none): our meta's world_size when
    it lists shards, else the number of optim_<step>_rank*.pt files (reference checkpoints)."""
    d = Path(ckpt_dir)
    shards = list(d.glob(f"optim_{step:06d}_rank*.pt"))
    meta_path = d / META_FILE.format(step=step)
    files = _read_meta(meta_path).get("files") if meta_path.exists() else None
    if isinstance(files, dict):
        return sum(1 for n in files if n.startswith(f"optim_{step:06d}_rank"))
    return len(shards)


def copy_checkpoint(
    src_dir, step: int | None, dst_dir, *, world_size: int | None = None, with_optimizer: bool = True
) -> int:
    """Write checkpoint `step` (None = newest complete) of `src_dir` into `dst_dir` as a complete
    checkpoint of ours, to continue training from: the optimizer shards resharded for
    `world_size` ranks (None = as saved), or left out (`with_optimizer=False`: weights only, the
    trainer starts a fresh optimizer). Returns the step."""
    from shared.nanochat.optim_reshard import group_layout, reshard_optimizer_states

    src, dst = Path(src_dir), Path(dst_dir)
    model_state, _, meta = load_checkpoint(src, step, device="cpu")
    step = int(meta["step"])
    config = model_config_from_meta(meta, src / META_FILE.format(step=step))
    check_state_matches(model_state, config, src / MODEL_FILE.format(step=step))
    shards: list[dict] = []
    if with_optimizer:
        n = saved_world_size(src, step)
        if n == 0:
            raise CheckpointError(
                f"{src}: checkpoint step {step} has no optimizer state; continue it weights-only "
                "(a fresh optimizer) instead"
            )
        shards = [load_optimizer_shard(src, step, r) for r in range(n)]
        m = world_size or n
        if m != n:
            shards = reshard_optimizer_states(shards, group_layout(config), m)
    out_meta = {k: v for k, v in meta.items() if k not in ("files", "format", "world_size", "step")}
    out_meta["model_config"] = config.to_dict()
    out_meta.setdefault("copied_from", {"checkpoint_dir": str(src.resolve()), "step": step})
    # weights-only: no shards; the ranks it is meant for still count (the trainer checks it)
    world = len(shards) or world_size or 1
    dst.mkdir(parents=True, exist_ok=True)
    if (dst / META_FILE.format(step=step)).exists():
        (dst / META_FILE.format(step=step)).unlink()
    for stale in dst.glob(f"optim_{step:06d}_rank*.pt"):  # a previous copy with more ranks
        stale.unlink()
    files = {MODEL_FILE.format(step=step): _save_torch(dst / MODEL_FILE.format(step=step), model_state)}
    for r, shard in enumerate(shards):
        name = OPTIM_FILE.format(step=step, rank=r)
        files[name] = _save_torch(dst / name, shard)
    out_meta.update(step=step, format=FORMAT, world_size=world, files=files)
    _save_json(dst / META_FILE.format(step=step), out_meta)
    return step
