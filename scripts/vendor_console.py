#!/usr/bin/env python3
"""Re-fetch the web console's front-end libraries from the npm registry and check them.

The console (services/api/console/static/) ships its libraries in the repository so that it works
offline and the API image needs no network or Node: Preact and its hooks, htm, uPlot. Which files
come from which package version is pinned in services/api/console/static/vendor/vendor.json:
the registry tarball URL with its npm `integrity` (sha512 of the tarball) and the sha256 of every
file taken from it, licences included.

    scripts/vendor_console.py            # check: the files in the repository match vendor.json (offline)
    scripts/vendor_console.py --fetch    # download the pinned tarballs, verify them, write the files
    scripts/vendor_console.py --lock     # after editing a version in vendor.json: fetch and record hashes

`--fetch` writes nothing unless the tarball's sha512 and every file's sha256 match the lock, so
running it reproduces the committed files byte for byte or fails. Set NPM_REGISTRY to use a mirror.
"""

from __future__ import annotations

import argparse
import base64
import hashlib
import io
import json
import os
import sys
import tarfile
import urllib.request
from pathlib import Path

VENDOR = Path(__file__).resolve().parents[1] / "services" / "api" / "console" / "static" / "vendor"
LOCK = VENDOR / "vendor.json"
DEFAULT_REGISTRY = "https://registry.npmjs.org"


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def tarball_url(pkg: dict) -> str:
    registry = os.environ.get("NPM_REGISTRY", DEFAULT_REGISTRY).rstrip("/")
    base = pkg["name"].split("/")[-1]
    return f"{registry}/{pkg['name']}/-/{base}-{pkg['version']}.tgz"


def fetch_tarball(pkg: dict, verify: bool) -> bytes:
    url = tarball_url(pkg)
    with urllib.request.urlopen(url, timeout=60) as r:  # noqa: S310 - a pinned https registry URL
        data = r.read()
    algo, _, digest = pkg["integrity"].partition("-")
    actual = base64.b64encode(hashlib.new(algo, data).digest()).decode()
    if verify and actual != digest:
        raise SystemExit(f"{pkg['name']}@{pkg['version']}: tarball {algo} {actual} != lock {digest} ({url})")
    pkg["integrity"] = f"{algo}-{actual}"
    return data


def extract(data: bytes, member: str) -> bytes:
    with tarfile.open(fileobj=io.BytesIO(data), mode="r:gz") as tar:
        f = tar.extractfile(member)
        if f is None:
            raise SystemExit(f"{member} is not a file in the tarball")
        return f.read()


def check(lock: dict) -> int:
    bad = 0
    for pkg in lock["packages"]:
        for member, spec in pkg["files"].items():
            path = VENDOR / spec["to"]
            if not path.is_file():
                print(f"missing  {path.relative_to(VENDOR)} ({pkg['name']}@{pkg['version']} {member})")
                bad += 1
            elif sha256(path.read_bytes()) != spec["sha256"]:
                print(f"changed  {path.relative_to(VENDOR)} ({pkg['name']}@{pkg['version']} {member})")
                bad += 1
    total = sum(len(p["files"]) for p in lock["packages"])
    print(f"vendor: {total - bad}/{total} files match {LOCK.name}")
    return 1 if bad else 0


def fetch(lock: dict, relock: bool) -> int:
    staged: dict[Path, bytes] = {}
    for pkg in lock["packages"]:
        data = fetch_tarball(pkg, verify=not relock)
        for member, spec in pkg["files"].items():
            content = extract(data, member)
            digest = sha256(content)
            if relock:
                spec["sha256"] = digest
            elif digest != spec["sha256"]:
                raise SystemExit(
                    f"{pkg['name']}@{pkg['version']} {member}: sha256 {digest} != lock {spec['sha256']}"
                )
            staged[VENDOR / spec["to"]] = content
        print(f"fetched  {pkg['name']}@{pkg['version']} ({len(pkg['files'])} files, {pkg['license']})")
    for path, content in staged.items():  # only once everything verified
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(content)
    if relock:
        LOCK.write_text(json.dumps(lock, indent=2) + "\n")
        print(f"recorded hashes in {LOCK}")
    return 0


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    mode = ap.add_mutually_exclusive_group()
    mode.add_argument("--fetch", action="store_true", help="download, verify against the lock, write")
    mode.add_argument("--lock", action="store_true", help="download and record new hashes in the lock")
    args = ap.parse_args(argv)
    lock = json.loads(LOCK.read_text())
    if args.fetch or args.lock:
        return fetch(lock, relock=args.lock)
    return check(lock)


if __name__ == "__main__":
    sys.exit(main())
