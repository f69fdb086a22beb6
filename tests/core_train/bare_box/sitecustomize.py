"""Loaded at start-up by every Python process of the gpu_check dry-run test (it is on PYTHONPATH):
the interpreter's site-packages is swapped for NCP_BARE_VIEW, a folder of links to only the
allowed distributions (torch with its requirements, Triton, bench/gpu_check_requirements.txt), so
every other package is simply absent, as on the bare GPU box the check is written for. A module
that only the full site-packages would have provided is appended to NCP_BARE_LOG."""

from __future__ import annotations

import importlib.machinery
import os
import sys

_VIEW = os.environ.get("NCP_BARE_VIEW")
_LOG = os.environ.get("NCP_BARE_LOG")


class _LogAbsent:
    """Last on sys.meta_path: sees only names no other finder resolved."""

    def __init__(self, hidden: list[str]):
        self.hidden = hidden

    def find_spec(self, fullname, path=None, target=None):
        if (
            "." not in fullname
            and importlib.machinery.PathFinder.find_spec(fullname, self.hidden) is not None
        ):
            with open(_LOG, "a", encoding="utf-8") as f:  # type: ignore[arg-type]
                f.write(fullname + "\n")
        return None


if _VIEW:
    _hidden = [p for p in sys.path if p.rstrip("/").endswith("site-packages")]
    sys.path[:] = [p for p in sys.path if p not in _hidden] + [_VIEW]
    importlib.invalidate_caches()
    if _LOG:
        sys.meta_path.append(_LogAbsent(_hidden))
