"""Running untrusted model-written Python (HumanEval completions) in a bubblewrap sandbox.

The program runs under `bwrap` (bubblewrap) in namespaces of its own:
- user: it is uid/gid 65534 with no capabilities; it cannot raise its resource limits back;
- PID: it sees only its own processes, so /proc/<the worker>/environ (the database URL) does not
  exist for it; killing the sandbox's init on a timeout kills everything it started;
- mount: the root is an empty read-only tmpfs with read-only binds of the system and Python (/usr,
  /lib*, /bin, the interpreter's prefix), a fresh /proc, a read-only /dev of the usual devices, and
  one writable folder, its temp dir, at /sandbox (cwd, HOME, TMPDIR). Nothing else of the host is
  there: not the run folders, not /etc, not the platform's data;
- network: only a loopback interface;
- an empty environment (PATH, HOME, TMPDIR, LANG and a fixed hash seed only), also for bwrap
  itself, which is the sandbox's PID 1.
Inside, before the program, `resource` limits cap CPU seconds, address space, file size and open
files. A wall-clock timeout kills the whole sandbox. Timeouts, memory exhaustion and kills count
as a failed run.

There is no weaker fallback: where bubblewrap is missing or cannot create its namespaces (a
container without user namespaces), `run_program` raises `SandboxUnavailable` saying why, and the
HumanEval evaluation fails with that reason.
"""

from __future__ import annotations

import functools
import os
import shutil
import signal
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

BWRAP = "bwrap"
INSIDE = "/sandbox"  # where the temp dir appears inside the sandbox
SANDBOX_UID = 65534  # nobody
# Read-only system folders the interpreter may need; absent ones are skipped.
SYSTEM_DIRS = ("/usr", "/lib", "/lib64", "/lib32", "/bin", "/sbin")

# Runs inside the sandbox before the program: `sys.argv[1]` is the program file, argv[2:] the
# limits (cpu seconds, address-space bytes, file bytes, open files). Soft = hard, and without
# capabilities the program cannot raise a hard limit again.
_GUARD = r"""
import sys, resource
_cpu, _mem, _fsize, _nofile = (int(a) for a in sys.argv[2:6])
resource.setrlimit(resource.RLIMIT_CPU, (_cpu, _cpu + 1))
resource.setrlimit(resource.RLIMIT_AS, (_mem, _mem))
resource.setrlimit(resource.RLIMIT_FSIZE, (_fsize, _fsize))
resource.setrlimit(resource.RLIMIT_NOFILE, (_nofile, _nofile))
resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
_code = compile(open(sys.argv[1], encoding="utf-8").read(), "program.py", "exec")
del sys, resource, _cpu, _mem, _fsize, _nofile
exec(_code, {"__name__": "__main__", "__builtins__": __builtins__})
"""

_ENV = {"PATH": "/usr/bin:/bin", "LANG": "C.UTF-8", "PYTHONHASHSEED": "0", "HOME": INSIDE, "TMPDIR": INSIDE}


class SandboxUnavailable(RuntimeError):
    """No sandbox can be created here; untrusted code is not run at all."""


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


def _python() -> tuple[str, str]:
    """(interpreter, the prefix holding it and its standard library), symlinks resolved."""
    return os.path.realpath(sys.executable), os.path.realpath(sys.base_prefix)


def bwrap_command(work: Path, argv: list[str]) -> list[str]:
    """The bwrap command line running `argv` with `work` as the only writable folder."""
    bwrap = shutil.which(BWRAP)
    if bwrap is None:
        raise SandboxUnavailable(
            f"bubblewrap ({BWRAP}) is not installed: HumanEval runs model-written code only inside its "
            "sandbox (Debian/Ubuntu: apt-get install bubblewrap)"
        )
    _, prefix = _python()
    binds: list[str] = []
    for d in SYSTEM_DIRS:
        binds += ["--ro-bind-try", d, d]
    if not any(prefix == d or prefix.startswith(d + "/") for d in SYSTEM_DIRS):
        binds += ["--ro-bind", prefix, prefix]
    env: list[str] = []
    for k, v in _ENV.items():
        env += ["--setenv", k, v]
    return [
        bwrap,
        "--unshare-all",  # user, pid, net (loopback only), ipc, uts, cgroup namespaces
        "--die-with-parent",
        "--new-session",
        "--cap-drop", "ALL",
        "--uid", str(SANDBOX_UID),
        "--gid", str(SANDBOX_UID),
        "--hostname", "sandbox",
        "--clearenv", *env,
        *binds,
        "--proc", "/proc",
        "--dev", "/dev",
        "--remount-ro", "/dev",
        "--bind", str(work), INSIDE,
        "--chdir", INSIDE,
        "--remount-ro", "/",
        *argv,
    ]  # fmt: skip


@functools.lru_cache(maxsize=1)
def _unavailable_reason() -> str | None:
    """None when a sandbox can be created here (checked once per process), else why not."""
    with tempfile.TemporaryDirectory(prefix="ncp-sandbox-probe-") as tmp:
        try:
            cmd = bwrap_command(Path(tmp), [_python()[0], "-I", "-S", "-c", "print('sandbox-ok')"])
        except SandboxUnavailable as e:
            return str(e)
        try:
            proc = subprocess.run(cmd, env=dict(_ENV), capture_output=True, text=True, timeout=60)
        except (OSError, subprocess.TimeoutExpired) as e:
            return f"bubblewrap could not be started: {e}"
    if proc.returncode == 0 and proc.stdout.strip() == "sandbox-ok":
        return None
    detail = (proc.stderr or proc.stdout).strip().splitlines()
    return (
        f"bubblewrap cannot create its sandbox here ({detail[-1] if detail else f'exit {proc.returncode}'}): "
        "it needs user, PID, mount and network namespaces (in a container: see docs/deploy.md, "
        "'HumanEval sandbox')"
    )


def check_sandbox() -> None:
    """Raise SandboxUnavailable (with the reason) unless untrusted code can be sandboxed here."""
    reason = _unavailable_reason()
    if reason is not None:
        raise SandboxUnavailable(reason)


def _kill_group(proc: subprocess.Popen) -> None:
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass


def run_program(code: str, limits: SandboxLimits | None = None) -> SandboxResult:
    """Run `code` as a Python program in the sandbox; passed means exit status 0."""
    limits = limits or SandboxLimits()
    check_sandbox()
    with tempfile.TemporaryDirectory(prefix="ncp-sandbox-") as tmp:
        work = Path(tmp)
        (work / "program.py").write_text(code, encoding="utf-8")
        (work / "guard.py").write_text(_GUARD, encoding="utf-8")
        argv = [
            _python()[0], "-I", "-B", "guard.py", "program.py",
            str(limits.cpu_seconds), str(limits.memory_bytes), str(limits.file_bytes), str(limits.open_files),
        ]  # fmt: skip
        # output goes to files in the sandbox so RLIMIT_FSIZE also caps a runaway print loop
        with (work / "stdout.txt").open("wb") as out_f, (work / "stderr.txt").open("wb") as err_f:
            proc = subprocess.Popen(
                bwrap_command(work, argv),
                env=dict(_ENV),  # bwrap is the sandbox's PID 1: its environment is visible inside
                stdin=subprocess.DEVNULL,
                stdout=out_f,
                stderr=err_f,
                start_new_session=True,
            )
            timed_out = False
            try:
                proc.wait(timeout=limits.wall_seconds)
            except subprocess.TimeoutExpired:
                timed_out = True
            finally:
                # Killing bwrap (the namespace's init) takes every process of the sandbox with it.
                _kill_group(proc)
                proc.wait()
        out, err = _tail(work / "stdout.txt"), _tail(work / "stderr.txt")
    rc = proc.returncode
    if timed_out:
        return SandboxResult("timeout", rc, out, err)
    if rc == 0:
        return SandboxResult("passed", rc, out, err)
    if "MemoryError" in err:
        return SandboxResult("memory", rc, out, err)
    # bwrap exits with 128 + N when the program died of signal N
    sig = -rc if rc < 0 else rc - 128 if rc > 128 else None
    if sig == signal.SIGXCPU:  # the CPU limit sends SIGXCPU first, SIGKILL at the hard limit
        return SandboxResult("timeout", rc, out, err)
    if sig is not None:
        return SandboxResult("killed", rc, out, err)
    return SandboxResult("failed", rc, out, err)


def _tail(path: Path, limit: int = 20000) -> str:
    # keep the end, where the traceback is; the results must not carry megabytes of output
    with path.open("rb") as f:
        f.seek(max(0, path.stat().st_size - limit))
        return f.read().decode("utf-8", errors="replace")
