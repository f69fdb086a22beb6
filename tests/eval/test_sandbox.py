"""The HumanEval sandbox (bubblewrap): limits hold, and the escapes found by probing fail.

Escapes tried: a program that replaces os.path.realpath before writing outside (which beat the
old audit-hook guard), reading the worker's environment through /proc (a planted variable stands
for the database password), reading files the worker can read (a planted file next to the test,
this test file, /etc), raising its own limits, and the network: inside, the only interface is
loopback (checked by listing interfaces; nothing is sent anywhere).
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

from shared.nanochat.eval import sandbox
from shared.nanochat.eval.sandbox import SandboxLimits, SandboxUnavailable, run_program

# generous wall clock: CI shares 2 cores; the CPU limit is what stops a busy loop
FAST = SandboxLimits(wall_seconds=15.0, cpu_seconds=2, memory_bytes=512 * 1024 * 1024)
CANARY = "ncp-canary-7f3a9c"


def test_pass_and_fail():
    assert run_program("print('ok')", FAST).status == "passed"
    r = run_program("assert 1 == 2", FAST)
    assert r.status == "failed" and "AssertionError" in r.stderr


def test_kills_loop_and_sleeper():
    assert run_program("while True:\n    pass\n", FAST).status == "timeout"
    # a sleeping program uses no CPU: the wall clock kills the whole sandbox
    assert run_program("import time\ntime.sleep(60)\n", SandboxLimits(wall_seconds=1.0)).status == "timeout"
    # ... including what it started (the PID namespace dies with its init)
    r = run_program(
        "import os, time\nif os.fork() == 0:\n    time.sleep(60)\nelse:\n    time.sleep(60)\n",
        SandboxLimits(wall_seconds=1.0),
    )
    assert r.status == "timeout"


def test_stops_memory_eater():
    # one allocation past the address-space limit fails at once, however loaded the machine is
    r = run_program("x = bytearray(1 << 30)\n", FAST)
    assert r.status == "memory" and not r.success
    r = run_program("x = []\nwhile True:\n    x.append(bytearray(10**7))\n", FAST)
    assert r.status in ("memory", "timeout") and not r.success


def test_writes_only_inside_its_temp_dir(tmp_path):
    target = tmp_path / "outside.txt"
    programs = [
        f"open({str(target)!r}, 'w').write('x')",
        f"import pathlib\npathlib.Path({str(target)!r}).write_text('x')",
        f"import os\nos.system('touch {target}')",
        # what beat the audit hook: replace realpath, then write anywhere
        f"import os, os.path\nos.path.realpath = lambda p, **k: '/sandbox/x'\nopen({str(target)!r}, 'w').write('x')",
        f"import os\nos.remove({__file__!r})",
        "open('/usr/evil', 'w').write('x')",
        "open('/etc-evil', 'w').write('x')",
    ]
    for code in programs:
        run_program(code, FAST)
        assert not target.exists(), code
    assert Path(__file__).exists()
    # inside its own temp dir (cwd, HOME, TMPDIR) it may write freely; the dir goes afterwards
    code = (
        "import os, tempfile\nopen('a.txt', 'w').write('x')\nopen(os.path.join(os.environ['HOME'], 'b'), 'w')\n"
        "tempfile.mkstemp()\nprint(os.getcwd())"
    )
    r = run_program(code, FAST)
    assert r.status == "passed" and r.stdout.strip() == "/sandbox"
    big = run_program("open('big', 'wb').write(b'x' * (10 * 1024 * 1024))", FAST)
    assert big.status != "passed"  # RLIMIT_FSIZE


def test_cannot_read_the_workers_environment(monkeypatch):
    monkeypatch.setenv("NCP_DATABASE_URL", f"postgresql://ncp:{CANARY}@db/ncp")
    code = r"""
import os
seen = [repr(dict(os.environ))]
for pid in os.listdir('/proc'):
    if pid.isdigit():
        for name in ('environ', 'cmdline'):
            try:
                seen.append(open(f'/proc/{pid}/{name}', 'rb').read().decode(errors='replace'))
            except OSError as e:
                seen.append(f'{pid}/{name}: {e}')
print(os.getppid(), sorted(int(p) for p in os.listdir('/proc') if p.isdigit()))
print('\n'.join(seen))
"""
    r = run_program(code, FAST)
    assert r.status == "passed", r.stderr
    assert CANARY not in r.stdout and "NCP_" not in r.stdout
    assert str(os.getpid()) + "/" not in r.stdout  # the worker's pid is no process it can see


def test_cannot_read_outside_its_temp_dir(tmp_path):
    secret = tmp_path / "secret.txt"
    secret.write_text(CANARY)
    for path in (str(secret), __file__, "/etc/hostname", "/etc/passwd", str(Path(sys.prefix) / "pyvenv.cfg")):
        code = f"print(open({path!r}).read())"
        r = run_program(code, FAST)
        assert r.status == "failed" and CANARY not in r.stdout and "FileNotFoundError" in r.stderr, path
    listing = run_program("import os\nprint(sorted(os.listdir('/')))", FAST)
    assert listing.status == "passed"
    assert set(eval(listing.stdout)) <= {
        "sandbox",
        "usr",
        "lib",
        "lib64",
        "lib32",
        "bin",
        "sbin",
        "proc",
        "dev",
        "root",
    }


def test_cannot_raise_its_limits_or_gain_privileges():
    r = run_program("import resource\nresource.setrlimit(resource.RLIMIT_FSIZE, (-1, -1))", FAST)
    assert r.status == "failed" and "ValueError" in r.stderr
    r = run_program("import os\nprint(os.getuid(), os.getgid())\nos.setuid(0)", FAST)
    # uid 0 does not even exist in its user namespace
    assert r.status == "failed" and r.stdout.split() == ["65534", "65534"] and "Error" in r.stderr


def test_only_loopback_network():
    code = "import socket\nprint(sorted(name for _, name in socket.if_nameindex()))\nprint(open('/proc/net/dev').read())"
    r = run_program(code, FAST)
    assert r.status == "passed", r.stderr
    first, *dev = r.stdout.splitlines()
    assert first == "['lo']"
    interfaces = {line.split(":")[0].strip() for line in dev if ":" in line}
    assert interfaces == {"lo"}


def test_no_sandbox_means_no_run(monkeypatch):
    """Without bubblewrap (or where it cannot create namespaces) nothing runs, and the reason says
    what is missing; HumanEval grading fails with it rather than running the code unguarded."""
    from shared.nanochat.eval.chat import humaneval_passes

    monkeypatch.setattr(sandbox, "BWRAP", "bwrap-not-installed-here")
    sandbox._unavailable_reason.cache_clear()
    try:
        with pytest.raises(SandboxUnavailable, match="bubblewrap .* is not installed"):
            run_program("print('unguarded')", FAST)
        conv = {"prompt": "def f():\n", "test": "def check(c):\n    pass\n", "entry_point": "f"}
        with pytest.raises(SandboxUnavailable):
            humaneval_passes(conv, "def f():\n    return 1\n", FAST)
        monkeypatch.setattr(sandbox, "BWRAP", "false")  # present, but creates nothing
        sandbox._unavailable_reason.cache_clear()
        with pytest.raises(SandboxUnavailable, match="cannot create its sandbox"):
            run_program("print('unguarded')", FAST)
    finally:
        sandbox._unavailable_reason.cache_clear()
