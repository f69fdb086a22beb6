"""GSM8K: answer extraction and the solution -> tool-call conversation conversion.

A GSM8K solution writes calculator steps as `<<48/2=24>>` and ends with `#### 72`. For SFT the
calculator steps become python tool calls (the expression) and tool outputs (the result), which
is how the model learns to use the calculator; for grading, only the number after `#### ` counts,
compared exactly as upstream does.
"""

from __future__ import annotations

import re

# Upstream's rule (nanochat tasks/gsm8k.py, after the official grade-school-math code): exactly
# "#### " then digits, dots and commas (an optional minus); commas dropped, nothing else
# normalised, compared as strings. So "#### 10.00", "####10", "#### $5" and "#### 7." do not match
# a reference of 10, 5 or 7: accuracy means what upstream's means.
_ANSWER_RE = re.compile(r"#### (\-?[0-9\.\,]+)")
_CALC_RE = re.compile(r"(<<[^>]*>>)")


def extract_answer(completion: str) -> str | None:
    """The text after the first `#### ` marker, commas removed (upstream's extract_answer)."""
    match = _ANSWER_RE.search(completion)
    if not match:
        return None
    return match.group(1).strip().replace(",", "")


def is_correct(completion: str, reference_solution: str) -> bool:
    """Whether a completion's `####` answer equals the reference solution's, as strings."""
    ref = extract_answer(reference_solution)
    if ref is None:
        raise ValueError("reference solution has no '#### <number>' answer")
    return extract_answer(completion) == ref


def solution_to_parts(solution: str) -> list[dict]:
    """Split a GSM8K solution into text / python / python_output parts for chat rendering."""
    parts: list[dict] = []
    for piece in _CALC_RE.split(solution):
        if not piece:
            continue
        if piece.startswith("<<") and piece.endswith(">>"):
            inner = piece[2:-2]
            expr, _, result = inner.rpartition("=") if "=" in inner else (inner, "", "")
            parts.append({"type": "python", "text": expr})
            parts.append({"type": "python_output", "text": result})
        else:
            parts.append({"type": "text", "text": piece})
    return parts


def gsm8k_conversation(question: str, answer: str) -> dict:
    """A GSM8K row as a conversation whose assistant turn uses the calculator tool."""
    return {
        "messages": [
            {"role": "user", "content": question},
            {"role": "assistant", "content": solution_to_parts(answer)},
        ]
    }
