"""The shared JSONL reader: every bad line is reported as path:line with the caller's error type."""

from __future__ import annotations

import pytest

from shared.nanochat.eval.core import BundleError
from shared.nanochat.jsonl import iter_jsonl


def test_yields_values_with_their_line_and_skips_blank_lines(tmp_path):
    p = tmp_path / "a.jsonl"
    p.write_bytes(b'{"x": 1}\n\n  \n[2, 3]\n')
    assert list(iter_jsonl(p)) == [(f"{p}:1", {"x": 1}), (f"{p}:4", [2, 3])]


def test_bad_lines_name_file_and_line_with_the_callers_error(tmp_path):
    p = tmp_path / "b.jsonl"
    p.write_bytes(b'{"x": 1}\n{"x": \n')
    with pytest.raises(BundleError, match=r"b\.jsonl:2: invalid JSON"):
        list(iter_jsonl(p, BundleError))
    q = tmp_path / "c.jsonl"
    q.write_bytes(b'{"x": 1}\n{"x": "\xff"}\n')
    with pytest.raises(ValueError, match=r"c\.jsonl:2: non-UTF-8 bytes at offset 7"):
        list(iter_jsonl(q))
