"""What a worker container checks before it takes jobs, so a misconfigured deployment stops at once
with the fix in its log instead of failing the first job hours later.

- GPU device nodes (train and eval workers): the container was given /dev/kfd + /dev/dri/renderD*
  (ROCm) or /dev/nvidiactl (NVIDIA) but this non-root process cannot open them. On ROCm that means
  the host's render/video groups are missing: compose's `group_add` needs their NUMERIC GIDs (a
  name is resolved in the image's /etc/group, whose GIDs mean nothing on the host).
- NCP_HOME must be writable: on a shared volume (NFS) the server decides, not the pod's fsGroup.

Each check returns problems as sentences that name the variable or value to change.
"""

from __future__ import annotations

import errno
import os
import tempfile
from collections.abc import Mapping
from pathlib import Path

# .env variables (compose) that become `group_add` entries of the ROCm services.
GID_VARIABLES = ("VIDEO_GID", "RENDER_GID")
GETENT = "`getent group video render` on the host prints name:x:GID:members"


def _open_error(node: Path) -> OSError | None:
    try:
        os.close(os.open(node, os.O_RDWR))
    except OSError as e:
        return e
    return None


def _identity() -> str:
    return f"uid {os.getuid()}, groups {sorted(set(os.getgroups()) | {os.getgid()})}"


def gpu_access_problems(env: Mapping[str, str] | None = None, dev: Path = Path("/dev")) -> list[str]:
    """Why this process cannot use the GPU devices it was given ([] = fine or no GPU devices)."""
    env = os.environ if env is None else env
    problems = []
    for var in GID_VARIABLES:
        value = env.get(var, "")
        if value and not value.isdigit():
            problems.append(
                f"{var}={value!r} is not a number: set it in .env to the numeric GID of the host's "
                f"{var.removesuffix('_GID').lower()} group ({GETENT})"
            )
    rocm_nodes = [dev / "kfd", *sorted((dev / "dri").glob("renderD*"))]
    for node in rocm_nodes:
        if not node.exists():
            continue
        err = _open_error(node)
        if err is None:
            continue
        fix = (
            "the container lacks the host group that owns it: set RENDER_GID and VIDEO_GID in .env "
            f"to the numeric GIDs ({GETENT}); Helm: gpu.supplementalGroups"
        )
        if err.errno not in (errno.EACCES, errno.EPERM):
            fix = "check that the host's amdgpu driver is loaded and the device is passed to the container"
        problems.append(f"cannot open {node} ({err.strerror}) as {_identity()}: {fix}")
        break  # one node tells the story; the others share its group
    nvidia = dev / "nvidiactl"
    if nvidia.exists():
        err = _open_error(nvidia)
        if err is not None:
            problems.append(
                f"cannot open {nvidia} ({err.strerror}) as {_identity()}: run the container with the "
                "NVIDIA Container Toolkit (compose.nvidia.yaml's device reservation; Helm: "
                "values-nvidia.yaml with nvidia.com/gpu)"
            )
    return problems


def home_problem(home: Path) -> str | None:
    """Why this process cannot write run folders under NCP_HOME (None = it can)."""
    try:
        home.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=home, prefix=".ncp-write-check-"):
            pass
    except OSError as e:
        return (
            f"NCP_HOME {home} is not writable as {_identity()} ({e.strerror}). On a shared volume "
            "(NFS) the server decides: make the export writable by this uid/gid (e.g. chown -R "
            "10001:10001 on the server), or run the containers as the export's owner (Helm: "
            "podSecurityContext.runAsUser/runAsGroup/fsGroup; persistence.initPermissions=true "
            "where root may chown the volume)"
        )
    return None
