"""bench/gpu_check.sh --dry-run: every section of the GPU check on the CPU at tiny sizes, in
processes whose site-packages holds only torch and its requirements, Triton and
bench/gpu_check_requirements.txt (bare_box/sitecustomize.py swaps in a folder of links), as on the
bare GPU box the check is written for: a dependency missing from that list fails here first."""

from __future__ import annotations

import importlib.metadata
import os
import re
import subprocess
import sys
from pathlib import Path

from packaging.markers import default_environment
from packaging.requirements import Requirement

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "bench"))

import gpu_check_deps  # noqa: E402


def _closure(names: list[str]) -> set[str]:
    """The distributions `names` need at run time (extras left out), names included."""
    env = dict(default_environment(), extra="")
    seen: set[str] = set()
    todo = list(names)
    while todo:
        name = gpu_check_deps.norm(todo.pop())
        if name in seen:
            continue
        seen.add(name)
        try:
            reqs = importlib.metadata.requires(name) or []
        except importlib.metadata.PackageNotFoundError:
            continue
        for text in reqs:
            req = Requirement(text)
            if req.marker is None or req.marker.evaluate(env):
                todo.append(req.name)
    return seen


def _site_view(dists: set[str], view: Path) -> None:
    """Links to every top-level file and folder (packages, .libs, .dist-info) of `dists`."""
    view.mkdir()
    for dist in importlib.metadata.distributions():
        if gpu_check_deps.norm(dist.metadata["Name"]) not in dists:
            continue
        for top in {Path(str(f)).parts[0] for f in dist.files or []}:
            src = Path(str(dist.locate_file(top)))
            if top not in ("..", "__pycache__") and src.exists() and not (view / top).exists():
                (view / top).symlink_to(src)


def test_dry_run_passes_on_a_bare_box(tmp_path):
    listed = {gpu_check_deps.norm(n) for n, _ in gpu_check_deps.requirements()}
    _site_view(_closure(["torch", "triton"]) | listed, tmp_path / "site")
    log = tmp_path / "absent.log"
    env = dict(
        os.environ,
        PYTHON=sys.executable,
        PYTHONPATH=str(Path(__file__).with_name("bare_box")),
        NCP_BARE_VIEW=str(tmp_path / "site"),
        NCP_BARE_LOG=str(log),
    )
    p = subprocess.run(
        ["bash", "bench/gpu_check.sh", "--dry-run", "--work-dir", str(tmp_path / "work")],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    absent = sorted(set(log.read_text().split())) if log.exists() else []
    assert p.returncode == 0, f"{p.stdout[-4000:]}\n{p.stderr[-2000:]}\nabsent on the bare box: {absent}"
    rows = [
        line.split(" | ") for line in p.stdout.splitlines() if line.startswith("| ") and "---" not in line
    ]
    by_check = {(r[0].strip("| "), r[1]): r for r in rows[1:]}
    assert {section for section, _ in by_check} == {"env", "tests", "step", "resume", "serve"}
    assert not [r for r in rows if r[2] == "FAIL"]
    # Every check of the issue has its row.
    assert by_check[("tests", "pytest -m gpu (2 files)")][3].endswith("skipped")  # no GPU here
    assert {
        "d2 T256 auto",
        "d2 T256 auto fp8",
        "d2 T256 math",
        "auto / math tokens/s",
        "fp8 / bf16 tokens/s",
    } <= {check for section, check in by_check if section == "step"}
    # On the CPU a killed-and-resumed run is bit-identical to the uninterrupted one.
    assert by_check[("resume", "resumed vs uninterrupted run")][3] == "bit-identical"
    assert by_check[("resume", "resumed vs killed run (same steps)")][3] == "bit-identical"
    assert re.match(r"[\d,.]+ tok/s", by_check[("serve", "native decode, concurrency 32")][3])


def test_requirements_parse_and_missing(tmp_path):
    reqs = gpu_check_deps.requirements()
    assert ("pyarrow", "14") in reqs and all(re.fullmatch(r"[0-9.]+", v) for _, v in reqs)
    assert gpu_check_deps.missing(reqs) == []  # the dev venv has them all
    assert gpu_check_deps.missing([("numpy", "999")]) == [("numpy", "999")]
    assert gpu_check_deps.missing([("no-such-dist-ncp", "1")]) == [("no-such-dist-ncp", "1")]
    bad = tmp_path / "req.txt"
    bad.write_text("numpy==1.0\n")
    try:
        gpu_check_deps.requirements(bad)
    except ValueError as e:
        assert "name>=version" in str(e)
    else:
        raise AssertionError("a pinned requirement must be rejected")
    (tmp_path / "Pydantic_Core-2.50.5-cp312-cp312-manylinux2014_x86_64.whl").write_bytes(b"")
    assert gpu_check_deps.wheel_for("pydantic-core", tmp_path) is not None
    assert gpu_check_deps.wheel_for("pydantic", tmp_path) is None


def test_install_puts_only_the_missing_wheels_into_the_target(tmp_path):
    """Offline: a requirement this interpreter lacks comes from the wheel folder; one it has is left
    alone; one with no wheel is an error naming it."""
    pkg = tmp_path / "src"
    (pkg / "ncp_gpu_check_probe").mkdir(parents=True)
    (pkg / "ncp_gpu_check_probe" / "__init__.py").write_text("VALUE = 42\n")
    (pkg / "pyproject.toml").write_text(
        '[build-system]\nrequires = ["setuptools"]\nbuild-backend = "setuptools.build_meta"\n'
        '[project]\nname = "ncp-gpu-check-probe"\nversion = "1.0"\n'
    )
    wheels = tmp_path / "wheels"
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "-q",
            "--no-deps",
            "--no-build-isolation",
            "-w",
            str(wheels),
            str(pkg),
        ],
        check=True,
        timeout=120,
    )
    reqs = tmp_path / "req.txt"
    reqs.write_text("ncp-gpu-check-probe>=1.0\nnumpy>=1.0  # installed here: not taken from wheels\n")
    target = tmp_path / "site"
    assert gpu_check_deps.install(target, wheels, reqs) == 0
    assert sorted(p.name for p in target.iterdir() if not p.name.endswith(".dist-info")) == [
        "ncp_gpu_check_probe"
    ]
    out = subprocess.run(
        [sys.executable, "-c", "import ncp_gpu_check_probe as m; print(m.VALUE)"],
        env=dict(os.environ, PYTHONPATH=str(target)),
        capture_output=True,
        text=True,
        check=True,
    )
    assert out.stdout.strip() == "42"
    reqs.write_text("ncp-no-such-dist>=1.0\n")
    assert gpu_check_deps.install(target, wheels, reqs) == 1
