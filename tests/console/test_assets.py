"""The console's files: the vendored libraries match their pinned hashes, every import of every
module resolves to a shipped file (the console works offline), and the wheel the api image is
built from carries all of it."""

from __future__ import annotations

import json
import re
import subprocess
import sys
import zipfile
from pathlib import Path

from tests.console.conftest import REPO

STATIC = REPO / "services" / "api" / "console" / "static"


def test_vendored_files_match_the_lock():
    r = subprocess.run(
        [sys.executable, "scripts/vendor_console.py"], cwd=REPO, capture_output=True, text=True, timeout=60
    )
    assert r.returncode == 0, r.stdout + r.stderr
    lock = json.loads((STATIC / "vendor" / "vendor.json").read_text())
    assert {p["name"] for p in lock["packages"]} == {"preact", "htm", "uplot"}
    for pkg in lock["packages"]:
        assert pkg["integrity"].startswith("sha512-") and pkg["license"]
        assert any(f["to"].startswith("LICENSES/") for f in pkg["files"].values()), pkg["name"]


def test_every_import_resolves_to_a_shipped_file():
    index = (STATIC / "index.html").read_text()
    imports = json.loads(re.search(r'<script type="importmap">(.*?)</script>', index, re.S).group(1))[
        "imports"
    ]
    local = {s: STATIC / u.removeprefix("/console/static/") for s, u in imports.items()}
    assert all(p.is_file() for p in local.values()), local
    refs = re.findall(r'(?:href|src)="(/console/static/[^"]+)"', index)
    assert refs and all((STATIC / r.removeprefix("/console/static/")).is_file() for r in refs)
    for module in [*STATIC.glob("*.js"), *STATIC.glob("pages/*.js"), *STATIC.glob("vendor/*.js")]:
        for spec in re.findall(r'\b(?:from|import)\s*"([^"\n]+)"', module.read_text()):
            if spec.startswith("."):
                assert (module.parent / spec).resolve().is_file(), f"{module.name}: {spec}"
            else:
                assert spec in imports, f"{module.name} imports {spec!r}, which the import map lacks"
    # no network at run time: nothing loads from another origin
    for f in [
        STATIC / "index.html",
        *STATIC.glob("*.js"),
        *STATIC.glob("pages/*.js"),
        STATIC / "console.css",
    ]:
        assert not re.search(r"https?://(?!www\.w3\.org)", f.read_text()), f


def test_the_wheel_carries_the_console(tmp_path):
    r = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(tmp_path), str(REPO)],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert r.returncode == 0, r.stderr[-2000:]
    (wheel,) = tmp_path.glob("*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    tracked = subprocess.run(
        ["git", "ls-files", "services/api/console/static"],
        cwd=REPO,
        capture_output=True,
        text=True,
        check=True,
    ).stdout.split()
    on_disk = {str(p.relative_to(REPO)) for p in STATIC.rglob("*") if p.is_file()}
    expected = set(tracked) | on_disk
    assert expected and expected <= names, sorted(expected - names)
    assert Path("services/api/console/static/vendor/LICENSES/uplot.txt").as_posix() in names
