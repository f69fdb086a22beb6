"""The Python packages bench/gpu_check.sh needs beyond torch and Triton, carried as wheels.

    python bench/gpu_check_deps.py download [--python-version 3.12] [--skip numpy,pyarrow]  # here, online
    python bench/gpu_check_deps.py install --target /tmp/ncp-gpu-check-site                 # the GPU box

`download` fetches one manylinux x86-64 wheel per line of bench/gpu_check_requirements.txt into
.whl/ (pip download --no-deps; ignored by git, carried to the GPU box). The carry limit is 64 MiB,
and numpy + pyarrow alone weigh ~70 MB: skip what the box already has (the lent H200 image has
numpy, pyarrow, tokenizers, regex, safetensors, pytest and friends; see --skip). `install` checks
each requirement against what the box's Python has and installs only the missing ones from .whl/
into --target, without reaching any index; it prints the folder to put on PYTHONPATH.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import re
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
REQUIREMENTS = REPO / "bench" / "gpu_check_requirements.txt"
WHEELS = REPO / ".whl"
PLATFORMS = (
    "manylinux_2_28_x86_64",
    "manylinux_2_27_x86_64",
    "manylinux_2_17_x86_64",
    "manylinux2014_x86_64",
)
CARRY_LIMIT = 64 * 2**20


def norm(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def requirements(path: Path = REQUIREMENTS) -> list[tuple[str, str]]:
    """[(distribution name, minimum version)] from "name>=version" lines."""
    out = []
    for line in path.read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if not line:
            continue
        m = re.fullmatch(r"([A-Za-z0-9_.-]+)\s*>=\s*([0-9][0-9.]*)", line)
        if not m:
            raise ValueError(f"{path}: expected 'name>=version', got {line!r}")
        out.append((m.group(1), m.group(2)))
    return out


def _version_tuple(v: str) -> tuple[int, ...]:
    return tuple(int(x) for x in re.findall(r"\d+", v)[:3])


def missing(reqs: list[tuple[str, str]]) -> list[tuple[str, str]]:
    """The requirements this interpreter lacks, or has older than the minimum."""
    out = []
    for name, minimum in reqs:
        try:
            have = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            out.append((name, minimum))
            continue
        if _version_tuple(have) < _version_tuple(minimum):
            out.append((name, minimum))
    return out


def wheel_for(name: str, wheels: Path) -> Path | None:
    for whl in sorted(wheels.glob("*.whl")):
        if norm(whl.name.split("-", 1)[0]) == norm(name):
            return whl
    return None


def install(target: Path, wheels: Path, reqs_path: Path = REQUIREMENTS) -> int:
    need = missing(requirements(reqs_path))
    if not need:
        print("gpu_check deps: everything is installed already")
        return 0
    found = {name: wheel_for(name, wheels) for name, _ in need}
    absent = [name for name, whl in found.items() if whl is None]
    if absent:
        print(
            f"gpu_check deps: missing here and no wheel in {wheels}: {', '.join(absent)} "
            "(run `python bench/gpu_check_deps.py download` on a machine with internet access)",
            file=sys.stderr,
        )
        return 1
    cmd = [sys.executable, "-m", "pip", "install", "-q", "--no-index", "--no-deps", "--no-compile", "--upgrade",
           "--disable-pip-version-check", "--target", str(target), *map(str, found.values())]  # fmt: skip
    subprocess.run(cmd, check=True)
    print(f"gpu_check deps: installed {', '.join(sorted(found))} into {target}")
    return 0


def download(python_version: str, skip: set[str], wheels: Path) -> int:
    wheels.mkdir(exist_ok=True)
    names = [f"{n}>={v}" for n, v in requirements() if norm(n) not in skip]
    platforms = [arg for p in PLATFORMS for arg in ("--platform", p)]
    cmd = [sys.executable, "-m", "pip", "download", "-q", "--no-deps", "--only-binary=:all:",
           "--python-version", python_version, "--implementation", "cp", *platforms, "-d", str(wheels), *names]  # fmt: skip
    subprocess.run(cmd, check=True)
    total = sum(p.stat().st_size for p in wheels.glob("*.whl"))
    print(f"gpu_check deps: {len(list(wheels.glob('*.whl')))} wheels, {total / 2**20:.1f} MiB in {wheels}")
    if total > CARRY_LIMIT:
        print(
            f"warning: over the {CARRY_LIMIT // 2**20} MiB carry limit: --skip what the box has",
            file=sys.stderr,
        )
    return 0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    d = sub.add_parser("download", help="fetch the wheels into .whl/ (needs PyPI)")
    d.add_argument("--python-version", default=f"{sys.version_info.major}.{sys.version_info.minor}")
    d.add_argument("--skip", default="", help="comma list of distributions the GPU box already has")
    d.add_argument("--wheels", type=Path, default=WHEELS)
    i = sub.add_parser("install", help="install what is missing from .whl/ (offline)")
    i.add_argument("--target", type=Path, required=True)
    i.add_argument("--wheels", type=Path, default=WHEELS)
    sub.add_parser("missing", help="list the requirements this interpreter lacks")
    args = p.parse_args(argv)
    if args.cmd == "download":
        return download(args.python_version, {norm(s) for s in args.skip.split(",") if s}, args.wheels)
    if args.cmd == "install":
        return install(args.target, args.wheels)
    for name, minimum in missing(requirements()):
        print(f"{name}>={minimum}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
