"""Which accelerator we run on, how its process environment is set up, and distributed init.

ROCm builds of PyTorch present AMD GPUs as "cuda" devices; `torch.version.hip` tells them apart.
The MI300X environment defaults come from the seed document (the user's working setup): they are
applied only where the variable is unset, so an operator's explicit value always wins, and they
must be applied before the first GPU allocation (the caching allocator reads its config once).
"""

from __future__ import annotations

import os
import re
from collections.abc import MutableMapping
from dataclasses import dataclass

import torch
import torch.distributed as dist

from shared.nanochat import sizing

ROCM_ENV_DEFAULTS = {
    # Kernel arguments in device memory: lower launch latency on MI300X.
    "HIP_FORCE_DEV_KERNARG": "1",
    # Fewer OOMs from fragmentation with the long-lived, variably sized activations of training.
    "PYTORCH_ALLOC_CONF": "expandable_segments:True",
}
CUDA_ENV_DEFAULTS = {"PYTORCH_ALLOC_CONF": "expandable_segments:True"}
# The caching allocator's config, under the unified name and its older per-vendor aliases.
ALLOC_CONF_NAMES = ("PYTORCH_ALLOC_CONF", "PYTORCH_CUDA_ALLOC_CONF", "PYTORCH_HIP_ALLOC_CONF")
# Before this torch release the CUDA/HIP allocator silently ignores expandable_segments given as
# PYTORCH_ALLOC_CONF (pytorch/pytorch#183387, seen on 2.9.1); it still honours the old alias.
UNIFIED_ALLOC_CONF_SINCE = (2, 11)
DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}


@dataclass(frozen=True)
class DeviceInfo:
    type: str  # torch device type: "cuda" (also ROCm), "mps" or "cpu"
    backend: str  # "cuda", "rocm", "mps" or "cpu"
    name: str  # e.g. "AMD Instinct MI300X", "cpu"
    gpu_key: str  # sizing.PEAK_FLOPS key; "cpu" when unknown
    count: int  # visible accelerators (1 for cpu/mps)

    @property
    def peak_flops(self) -> float | None:
        return sizing.PEAK_FLOPS.get(self.gpu_key)


def detect_device(requested: str = "auto") -> DeviceInfo:
    """requested: "auto" (GPU if present, then MPS, then CPU), "cuda", "rocm", "mps" or "cpu"."""
    if requested not in ("auto", "cuda", "rocm", "mps", "cpu"):
        raise ValueError(f"device must be one of auto/cuda/rocm/mps/cpu, got {requested!r}")
    gpu = torch.cuda.is_available()
    mps = getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available()
    if requested in ("cuda", "rocm") and not gpu:
        raise ValueError(f"device {requested!r} requested but torch sees no GPU (torch {torch.__version__})")
    if requested == "mps" and not mps:
        raise ValueError("device 'mps' requested but MPS is not available")
    if requested in ("auto", "cuda", "rocm") and gpu:
        rocm = torch.version.hip is not None
        if requested == "rocm" and not rocm:
            raise ValueError("device 'rocm' requested but this torch is a CUDA build")
        name = torch.cuda.get_device_name(0)
        key = sizing.gpu_key(name)
        if key is None and rocm:
            # Some ROCm containers report an empty or generic marketing name; the ISA still says
            # which Instinct generation this is, so MFU is not silently lost.
            key = rocm_arch_key(str(torch.cuda.get_device_properties(0).gcnArchName))
        return DeviceInfo("cuda", "rocm" if rocm else "cuda", name, key or "cpu", torch.cuda.device_count())
    if requested in ("auto", "mps") and mps:
        return DeviceInfo("mps", "mps", "mps", "cpu", 1)
    return DeviceInfo("cpu", "cpu", "cpu", "cpu", 1)


# ISA -> sizing.PEAK_FLOPS key, for ROCm devices whose name sizing.gpu_key does not know.
# gfx942 is also the MI300A (980 TFLOP/s); the discrete MI300X/MI325X is the common case.
ROCM_ARCH_KEYS = {"gfx942": "mi300x", "gfx950": "mi355x", "gfx90a": "mi250x"}


def rocm_arch_key(gcn_arch: str) -> str | None:
    """ "gfx942:sramecc+:xnack-" -> "mi300x"; None for an ISA without an entry."""
    return ROCM_ARCH_KEYS.get(gcn_arch.split(":")[0])


def is_rocm_build() -> bool:
    return torch.version.hip is not None


def _major_minor(version: str) -> tuple[int, int]:
    parts = re.findall(r"\d+", version)[:2]
    return (int(parts[0]), int(parts[1])) if len(parts) == 2 else (0, 0)


def apply_env_defaults(
    env: MutableMapping[str, str] | None = None,
    *,
    rocm: bool | None = None,
    hsa_override_gfx_version: str | None = None,
    torch_version: str | None = None,
) -> dict[str, str]:
    """Set the vendor env defaults where unset; returns what was set. HSA_OVERRIDE_GFX_VERSION is
    only set when asked for (it makes ROCm treat the GPU as another gfx target). An allocator
    config under any of its names counts as set; on a torch older than UNIFIED_ALLOC_CONF_SINCE
    (`torch_version`, default the installed one) PYTORCH_ALLOC_CONF is also copied to the alias
    that torch actually reads."""
    env = os.environ if env is None else env
    rocm = is_rocm_build() if rocm is None else rocm
    wanted = dict(ROCM_ENV_DEFAULTS if rocm else CUDA_ENV_DEFAULTS)
    if hsa_override_gfx_version:
        wanted["HSA_OVERRIDE_GFX_VERSION"] = hsa_override_gfx_version
    applied = {}
    for key, value in wanted.items():
        if key == "PYTORCH_ALLOC_CONF" and any(name in env for name in ALLOC_CONF_NAMES):
            continue
        if key not in env:
            env[key] = value
            applied[key] = value
    old_torch = _major_minor(torch_version or torch.__version__) < UNIFIED_ALLOC_CONF_SINCE
    if old_torch and "PYTORCH_ALLOC_CONF" in env and not any(n in env for n in ALLOC_CONF_NAMES[1:]):
        env["PYTORCH_CUDA_ALLOC_CONF"] = applied["PYTORCH_CUDA_ALLOC_CONF"] = env["PYTORCH_ALLOC_CONF"]
    return applied


def visible_devices_env(gpus: str | list[int]) -> dict[str, str]:
    """Environment that pins a child process to `gpus` ("0,1" or [0, 1]) on either vendor; ROCm
    honours HIP_VISIBLE_DEVICES and CUDA_VISIBLE_DEVICES, CUDA only the latter."""
    ids = gpus.split(",") if isinstance(gpus, str) else [str(g) for g in gpus]
    ids = [i.strip() for i in ids if i.strip()]
    for i in ids:
        if not i.isdigit():
            raise ValueError(f"gpus must be a comma list of device indices, got {gpus!r}")
    value = ",".join(ids)
    return {"CUDA_VISIBLE_DEVICES": value, "HIP_VISIBLE_DEVICES": value}


def choose_dtype(device_type: str, requested: str = "auto") -> torch.dtype:
    """Compute dtype: bf16 on GPUs that have it, fp32 on CPU/MPS (and pre-Ampere NVIDIA)."""
    if requested != "auto":
        if requested not in DTYPES:
            raise ValueError(f"dtype must be auto or one of {sorted(DTYPES)}, got {requested!r}")
        return DTYPES[requested]
    if device_type == "cuda":
        if torch.version.hip is not None or torch.cuda.get_device_capability() >= (8, 0):
            return torch.bfloat16
    return torch.float32


@dataclass(frozen=True)
class DistInfo:
    rank: int
    local_rank: int
    world_size: int
    device: torch.device

    @property
    def is_distributed(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def init_distributed(device_type: str) -> DistInfo:
    """Read torchrun's env (RANK, LOCAL_RANK, WORLD_SIZE); with more than one rank, init the
    process group (nccl -- rccl on ROCm -- on GPU, gloo on CPU) and bind this rank's GPU."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local = int(os.environ.get("LOCAL_RANK", "0"))
    if device_type == "cuda":
        device = torch.device("cuda", local)
        torch.cuda.set_device(device)
    else:
        device = torch.device(device_type)
    if world > 1 and not dist.is_initialized():
        if device_type == "cuda":
            dist.init_process_group(backend="nccl", device_id=device)
        else:
            dist.init_process_group(backend="gloo")
    return DistInfo(rank, local, world, device)


def cleanup_distributed(synchronize: bool = False) -> None:
    """Tear down the process group. `synchronize=True` (clean exits only) first waits for every
    rank: a rank destroying its gloo/nccl group while a peer still has a collective or the
    rendezvous store in flight can make that peer abort (seen as SIGABRT across nodes). On an
    error path peers may be inside other collectives, so no barrier is attempted there."""
    if dist.is_available() and dist.is_initialized():
        if synchronize:
            dist.barrier()
        dist.destroy_process_group()
