"""Fetch a Hugging Face Hub kernel for this image's torch at IMAGE BUILD time (never at run time).

    python fetch_hub_kernel.py REPO (--version N | --revision REV) --dest DIR

`kernels.install_kernel` picks the build variant that matches the installed torch (CUDA or ROCm
version, C++ ABI, architecture) and downloads only it; the variant folder is copied, symlinks
resolved, to DIR/build/<variant>/, where shared/nanochat/attention.py loads it with
`kernels.get_local_kernel(DIR)` from disk. No GPU is needed here: the kernel is imported, and
checked against the math reference, by the attention probe on first use. A torch build the repo
has no variant for fails the image build, not a training run.
"""

from __future__ import annotations

import argparse
import shutil
import sys
from pathlib import Path


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("repo", help="Hub repository, e.g. kernels-community/flash-attn3")
    which = p.add_mutually_exclusive_group(required=True)
    which.add_argument("--version", type=int, help="kernel major version (a v<N> branch)")
    which.add_argument("--revision", help="branch, tag or commit")
    p.add_argument("--dest", type=Path, required=True)
    args = p.parse_args()

    from kernels import install_kernel

    variant = Path(install_kernel(args.repo, version=args.version, revision=args.revision))
    if not (variant / "metadata.json").exists():
        raise SystemExit(f"{args.repo}: variant {variant.name} has no metadata.json")
    target = args.dest / "build" / variant.name
    shutil.rmtree(target, ignore_errors=True)
    shutil.copytree(variant, target, symlinks=False, ignore=shutil.ignore_patterns("__pycache__"))
    print(f"{args.repo} ({args.version or args.revision}): {variant.name} -> {target}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
