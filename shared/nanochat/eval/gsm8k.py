"""GSM8K: answer extraction and the solution -> tool-call conversation conversion.

A GSM8K solution writes calculator steps as `<<48/2=24>>` and ends with `#### 72`. For SFT the
calculator steps become python tool calls (the expression) and tool outputs (the result), which
is how the model learns to use the calculator; for grading, only the number after `####` counts.
"""

from __future__ import annotations

import re
from decimal import Decimal, InvalidOperation

# The marker the official grader looks for; the number may carry a sign, commas and decimals.
_ANSWER_RE = re.compile(r"####\s*\$?\s*(-?[0-9][0-9,]*(?:\.[0-9]+)?|-?\.[0-9]+)")
_CALC_RE = re.compile(r"(<<[^>]*>>)")


def normalize_number(text: str) -> str | None:
    """Canonical text of a number: no thousands commas, no trailing zeros ("1,000.50" -> "1000.5")."""
    cleaned = text.strip().replace(",", "").rstrip(".")
    try:
        value = Decimal(cleaned)
    except InvalidOperation:
        return None
    if not value.is_finite():
        return None
    if value == value.to_integral_value():
        return str(int(value))
    return format(value.normalize(), "f")


def extract_answer(completion: str) -> str | None:
    """The normalized number after the first `####` marker, or None if there is none."""
    match = _ANSWER_RE.search(completion)
    if not match:
        return None
    return normalize_number(match.group(1))


def is_correct(completion: str, reference_solution: str) -> bool:
    """Whether a completion's `####` answer equals the reference solution's."""
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
