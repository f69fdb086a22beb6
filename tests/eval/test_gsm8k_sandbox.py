"""GSM8K answer extraction and HumanEval grading (the sandbox itself: test_sandbox.py)."""

from __future__ import annotations

import pytest

from shared.nanochat.eval.chat import humaneval_passes
from shared.nanochat.eval.gsm8k import extract_answer, is_correct, solution_to_parts
from shared.nanochat.eval.sandbox import SandboxLimits


@pytest.mark.parametrize(
    "text,expected",
    [  # upstream's extract_answer (tasks/gsm8k.py), case by case
        ("so she earns 10.\n#### 10", "10"),
        ("#### 1,234", "1234"),
        ("#### -7", "-7"),
        ("#### 3.50", "3.50"),  # not normalised
        ("#### 10.00", "10.00"),
        ("#### 7.", "7."),  # the sentence's full stop is part of the answer
        ("####10", None),  # exactly one space after the marker
        ("#### $18", None),  # no currency sign
        ("####  5", None),
        ("The answer is 12", None),
        ("#### 5 then #### 6", "5"),
    ],
)
def test_extract_answer_is_upstreams(text, expected):
    assert extract_answer(text) == expected


def test_grading_follows_upstream_exactly():
    ref = "x <<2*500=1000>>1000\n#### 1000"
    assert is_correct("work...\n#### 1,000", ref)  # commas are dropped
    assert not is_correct("#### 999", ref)
    for near_miss in ("#### 1000.00", "####1000", "#### $1000", "#### 1000.", "1000"):
        assert not is_correct(near_miss, ref), near_miss
    assert is_correct("#### 7.5", "#### 7.5") and not is_correct("#### 7.50", "#### 7.5")
    with pytest.raises(ValueError, match="####"):
        is_correct("#### 1", "no marker here")


def test_solution_to_tool_calls():
    parts = solution_to_parts("She has 2*3=<<2*3=6>>6 eggs.\n#### 6")
    assert parts == [
        {"type": "text", "text": "She has 2*3="},
        {"type": "python", "text": "2*3"},
        {"type": "python_output", "text": "6"},
        {"type": "text", "text": "6 eggs.\n#### 6"},
    ]


# generous wall clock: CI shares 2 cores; the CPU limit is what stops a busy loop
FAST = SandboxLimits(wall_seconds=15.0, cpu_seconds=2, memory_bytes=512 * 1024 * 1024)


def test_humaneval_grading():
    conv = {
        "prompt": "from typing import List\n\n\ndef add(a: int, b: int):\n",
        "test": "def check(candidate):\n    assert candidate(2, 3) == 5\n",
        "entry_point": "add",
    }
    assert humaneval_passes(conv, "```python\ndef add(a: int, b: int):\n    return a + b\n```", FAST)
    assert not humaneval_passes(conv, "def add(a, b):\n    return a - b\n", FAST)
    assert not humaneval_passes(conv, "def add(a, b):\n    while True: pass\n", FAST)
