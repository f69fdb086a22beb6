"""The HumanEval sandbox's escapes, tried inside an eval worker container (scripts/e2e_compose.sh).

Read on stdin by the container's own Python (`docker exec -i ... python -`), so it uses only the
standard library and the platform package installed in the image. It prints one JSON object:
{"ok": bool, "checks": {name: detail}}; the same escapes as tests/eval/test_sandbox.py, under the
container's security settings instead of the host's.
"""

import json
import os
import tempfile

from shared.nanochat.eval.sandbox import SandboxLimits, check_sandbox, run_program

CANARY = os.environ.get("NCP_E2E_CANARY", "")
FAST = SandboxLimits(cpu_seconds=10, wall_seconds=20)
checks: dict[str, str] = {}
ok = True


def record(name: str, passed: bool, detail: str) -> None:
    global ok
    ok = ok and passed
    checks[name] = ("ok: " if passed else "FAIL: ") + detail[:160]


check_sandbox()  # raises SandboxUnavailable with the reason when bwrap cannot start here
r = run_program("print(sum(range(10)))", FAST)
record("runs a program", r.status == "passed" and r.stdout.strip() == "45", f"{r.status} {r.stdout.strip()}")

with tempfile.TemporaryDirectory() as tmp:
    target = os.path.join(tmp, "outside.txt")
    # what beat the old audit hook: replace realpath, then write anywhere
    r = run_program(
        f"import os, os.path\nos.path.realpath = lambda p, **k: '/sandbox/x'\nopen({target!r}, 'w').write('x')",
        FAST,
    )
    record("patched realpath cannot write outside", not os.path.exists(target), r.status)

environ = run_program(
    "import os\nout = []\nfor p in os.listdir('/proc'):\n    if p.isdigit():\n"
    "        try: out.append(open(f'/proc/{p}/environ', 'rb').read().decode(errors='replace'))\n"
    "        except OSError: pass\nprint(dict(os.environ), out)",
    FAST,
)
record(
    "the worker's environment is not visible",
    environ.status == "passed"
    and bool(CANARY)
    and CANARY not in environ.stdout
    and "NCP_" not in environ.stdout,
    environ.status,
)
r = run_program("print(open('/etc/hostname').read())", FAST)
record(
    "files outside the temp dir unreadable",
    r.status == "failed" and "FileNotFoundError" in r.stderr,
    r.status,
)
r = run_program("import socket\nprint(sorted(n for _, n in socket.if_nameindex()))", FAST)
record("only loopback network", r.status == "passed" and r.stdout.strip() == "['lo']", r.stdout.strip())
print(json.dumps({"ok": ok, "checks": checks}))
