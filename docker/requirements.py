"""Print the platform's pip requirements from pyproject.toml, one per line (image build helper).

Images install dependencies in a layer built from pyproject.toml alone, before the source is
copied, so editing code does not reinstall them. GPU images keep their own torch: `torch` is never
a core dependency, and `--only` narrows the list to what a vendor image (vLLM) lacks.

    python requirements.py pyproject.toml [--only a,b,c] [--extra name]
"""

from __future__ import annotations

import argparse
import re
import sys

import tomllib


def requirement_name(req: str) -> str:
    return re.split(r"[\s\[<>=!~;]", req, maxsplit=1)[0].lower().replace("_", "-")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("pyproject")
    p.add_argument("--only", default="", help="comma list of distribution names to keep")
    p.add_argument("--extra", action="append", default=[], help="optional-dependency group to add")
    args = p.parse_args(argv)
    with open(args.pyproject, "rb") as f:
        project = tomllib.load(f)["project"]
    reqs = list(project["dependencies"])
    for extra in args.extra:
        if extra not in project.get("optional-dependencies", {}):
            p.error(f"--extra {extra!r} is not an optional-dependency group of {args.pyproject}")
        reqs += project["optional-dependencies"][extra]
    if args.only:
        wanted = {n.strip().lower() for n in args.only.split(",") if n.strip()}
        missing = wanted - {requirement_name(r) for r in reqs}
        if missing:
            p.error(f"--only names not in {args.pyproject}: {sorted(missing)}")
        reqs = [r for r in reqs if requirement_name(r) in wanted]
    sys.stdout.write("".join(f"{r}\n" for r in reqs))
    return 0


if __name__ == "__main__":
    sys.exit(main())
