"""Running untrusted model-written Python (HumanEval completions) in a constrained subprocess.

Layers, each covering what the others miss:
- its own process group in a fresh temp dir (cwd, HOME and TMPDIR all point there), killed as a
  group on a wall-clock timeout so forked children die too;
- `resource` limits: CPU seconds, address space, file size, open files, no core dumps;
- an audit hook installed before the program runs that refuses writes, deletes and renames
  outside the temp dir, process spawning and ctypes (a Python-level guard: it stops ordinary
  code, not a determined attacker with native code, which the rlimits still contain).
Timeouts, memory exhaustion and kills all count as a failed run.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

# Runs inside the child before the program: `sys.argv[1]` is the program file, argv[2:] the limits
# (cpu seconds, address-space bytes, file bytes, open files). Setting them here rather than in a
# preexec_fn keeps the fork safe in a multi-threaded parent (torch, Celery).
_GUARD = r"""
import os, sys, resource
_cpu, _mem, _fsize, _nofile = (int(a) for a in sys.argv[2:6])
resource.setrlimit(resource.RLIMIT_CPU, (_cpu, _cpu + 1))
resource.setrlimit(resource.RLIMIT_AS, (_mem, _mem))
resource.setrlimit(resource.RLIMIT_FSIZE, (_fsize, _fsize))
resource.setrlimit(resource.RLIMIT_NOFILE, (_nofile, _nofile))
resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
_ROOT = os.path.realpath(os.getcwd()) + os.sep
_WRITE = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_APPEND | os.O_TRUNC
_PATH_EVENTS = {"os.remove", "os.rename", "os.rmdir", "os.mkdir", "os.chmod", "os.chown",
                "os.symlink", "os.link", "os.truncate", "os.utime", "shutil.rmtree", "shutil.move",
                "os.replace"}
_BANNED = ("os.system", "os.exec", "os.posix_spawn", "os.spawn", "os.fork", "os.forkpty",
           "subprocess.Popen", "ctypes.", "os.kill", "os.killpg", "socket.connect", "pty.",
           "resource.setrlimit", "resource.prlimit")

def _inside(p):
    if isinstance(p, int):
        return True  # an fd already opened under these rules
    if isinstance(p, bytes):
        p = os.fsdecode(p)
    return (os.path.realpath(p) + os.sep).startswith(_ROOT) or os.path.realpath(p) == "/dev/null"

def _hook(event, args):
    if event == "open":
        path, mode, flags = args
        writing = (flags or 0) & _WRITE or (mode is not None and any(c in str(mode) for c in "wax+"))
        if writing and path is not None and not _inside(path):
            raise PermissionError(f"sandbox: write outside the sandbox dir refused: {path}")
    elif event in _PATH_EVENTS:
        for a in args:
            if isinstance(a, (str, bytes)) and not _inside(a):
                raise PermissionError(f"sandbox: {event} outside the sandbox dir refused: {a}")
    elif event.startswith(_BANNED):
        raise PermissionError(f"sandbox: {event} is not allowed")

_src = open(sys.argv[1], encoding="utf-8").read()
_code = compile(_src, "program.py", "exec")
sys.addaudithook(_hook)
exec(_code, {"__name__": "__main__", "__builtins__": __builtins__})
"""


@dataclass(frozen=True)
class SandboxLimits:
    wall_seconds: float = 10.0
    cpu_seconds: int = 10
    memory_bytes: int = 512 * 1024 * 1024  # address space, Python itself needs some of it
    file_bytes: int = 4 * 1024 * 1024
    open_files: int = 64

    def __post_init__(self) -> None:
        for name in ("wall_seconds", "cpu_seconds", "memory_bytes", "file_bytes", "open_files"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name}: must be positive, got {getattr(self, name)}")


@dataclass(frozen=True)
class SandboxResult:
    status: str  # passed | failed | timeout | memory | killed
    returncode: int | None
    stdout: str
    stderr: str

    @property
    def success(self) -> bool:
        return self.status == "passed"


def _kill_group(proc: subprocess.Popen) -> None:
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass


def run_program(code: str, limits: SandboxLimits | None = None) -> SandboxResult:
    """Run `code` as a Python program in the sandbox; passed means exit status 0."""
    limits = limits or SandboxLimits()
    with tempfile.TemporaryDirectory(prefix="ncp-sandbox-") as tmp:
        work = Path(tmp)
        (work / "program.py").write_text(code, encoding="utf-8")
        (work / "guard.py").write_text(_GUARD, encoding="utf-8")
        env = {
            "HOME": tmp,
            "TMPDIR": tmp,
            "PATH": "/usr/bin:/bin",
            "LANG": "C.UTF-8",
            "PYTHONHASHSEED": "0",
            "OMP_NUM_THREADS": "1",
        }
        # output goes to files in the sandbox so RLIMIT_FSIZE also caps a runaway print loop
        with (work / "stdout.txt").open("wb") as out_f, (work / "stderr.txt").open("wb") as err_f:
            proc = subprocess.Popen(
                [
                    sys.executable,
                    "-I",
                    "-B",
                    "guard.py",
                    "program.py",
                    str(limits.cpu_seconds),
                    str(limits.memory_bytes),
                    str(limits.file_bytes),
                    str(limits.open_files),
                ],  # fmt: skip
                cwd=tmp,
                env=env,
                stdin=subprocess.DEVNULL,
                stdout=out_f,
                stderr=err_f,
                start_new_session=True,  # own process group, so the kill reaches its children
            )
            timed_out = False
            try:
                proc.wait(timeout=limits.wall_seconds)
            except subprocess.TimeoutExpired:
                timed_out = True
                _kill_group(proc)
                proc.wait()
            finally:
                _kill_group(proc)  # stray grandchildren left behind by a finished program
        out, err = _tail(work / "stdout.txt"), _tail(work / "stderr.txt")
    if timed_out:
        return SandboxResult("timeout", proc.returncode, out, err)
    stdout, stderr = out, err
    rc = proc.returncode
    if rc == 0:
        return SandboxResult("passed", rc, stdout, stderr)
    if "MemoryError" in stderr:
        return SandboxResult("memory", rc, stdout, stderr)
    if rc in (-signal.SIGXCPU, -signal.SIGKILL):
        # the CPU limit first sends SIGXCPU, then SIGKILL at the hard limit
        return SandboxResult("timeout" if rc == -signal.SIGXCPU else "killed", rc, stdout, stderr)
    if rc is not None and rc < 0:
        return SandboxResult("killed", rc, stdout, stderr)
    return SandboxResult("failed", rc, stdout, stderr)


def _tail(path: Path, limit: int = 20000) -> str:
    # keep the end, where the traceback is; the results must not carry megabytes of output
    with path.open("rb") as f:
        f.seek(max(0, path.stat().st_size - limit))
        return f.read().decode("utf-8", errors="replace")
