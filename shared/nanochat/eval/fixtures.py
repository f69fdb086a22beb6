"""Small evaluation sets the project generates itself, in the public formats.

`write_fixture_bundle` writes a CORE bundle in the DCLM layout (core.yaml, eval_data/*.jsonl,
eval_meta_data.csv) with two tasks of each type, built from facts about Python's built-ins and
keywords plus generated arithmetic. `write_fixture_chat_tasks` writes ARC / MMLU / GSM8K /
HumanEval files (parquet, the Hub layout of chat tasks in tasks.py) and a SmolTalk-style SFT
split. Both are deterministic, need no network and serve tests, the demo and offline runs.
"""

from __future__ import annotations

import csv
import json
import random
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

# (name, what it does): the facts the Python-docs tasks ask about
BUILTINS = [
    ("len", "returns the number of items in a container"),
    ("abs", "returns the absolute value of a number"),
    ("sorted", "returns a new sorted list from the items of an iterable"),
    ("ord", "returns the Unicode code point of a one-character string"),
    ("chr", "returns the string of one character for a Unicode code point"),
    ("sum", "adds up the items of an iterable"),
    ("max", "returns the largest item of an iterable"),
    ("min", "returns the smallest item of an iterable"),
    ("reversed", "returns a reverse iterator over a sequence"),
    ("enumerate", "yields pairs of a count and an item"),
    ("zip", "iterates over several iterables in parallel"),
    ("isinstance", "checks whether an object is an instance of a class"),
    ("repr", "returns a printable representation of an object"),
    ("round", "rounds a number to a given precision"),
    ("hex", "converts an integer to a hexadecimal string"),
    ("input", "reads a line from standard input"),
]
KEYWORDS = [
    ("def", "defines a function"),
    ("class", "defines a class"),
    ("import", "loads a module"),
    ("return", "exits a function with a value"),
    ("lambda", "creates an anonymous function"),
    ("yield", "produces a value from a generator"),
    ("with", "enters a context manager"),
    ("raise", "signals an exception"),
    ("pass", "does nothing"),
    ("break", "exits the innermost loop"),
    ("continue", "skips to the next iteration of a loop"),
    ("del", "deletes a name"),
]


def _options(rng: random.Random, pool: list[str], answer: str, k: int = 4) -> tuple[list[str], int]:
    opts = rng.sample([p for p in pool if p != answer], k - 1) + [answer]
    rng.shuffle(opts)
    return opts, opts.index(answer)


def _bundle_items(rng: random.Random) -> dict[str, tuple[str, int, str, list[dict]]]:
    """label -> (task type, shots, delimiter, items)."""
    names = [n for n, _ in BUILTINS]
    kws = [k for k, _ in KEYWORDS]
    builtin_mc, builtin_schema, builtin_lm, keyword_lm, keyword_schema, arith_mc = [], [], [], [], [], []
    for name, what in BUILTINS:
        choices, gold = _options(rng, names, name)
        builtin_mc.append(
            {
                "query": f"Question: Which Python built-in function {what}?\nAnswer:",
                "choices": choices,
                "gold": gold,
            }
        )
        contexts, gold = _options(rng, names, name)
        builtin_schema.append(
            {
                "context_options": [f"The built-in function {c}()" for c in contexts],
                "continuation": f"{what}.",
                "gold": gold,
            }
        )
        builtin_lm.append(
            {"context": f"The Python built-in function that {what} is", "continuation": f"{name}()"}
        )
    for kw, what in KEYWORDS:
        keyword_lm.append({"context": f"In Python, the keyword that {what} is", "continuation": kw})
        contexts, gold = _options(rng, kws, kw)
        keyword_schema.append(
            {
                "context_options": [f"The Python keyword {c}" for c in contexts],
                "continuation": f"{what}.",
                "gold": gold,
            }
        )
    for _ in range(16):
        a, b = rng.randint(2, 49), rng.randint(2, 49)
        wrong = rng.sample([a + b + d for d in (-10, -2, -1, 1, 2, 10)], 3)
        choices, gold = _options(rng, [str(x) for x in wrong] + [str(a + b)], str(a + b))
        arith_mc.append({"query": f"What is {a} plus {b}?", "choices": choices, "gold": gold})
    return {
        "python_builtins_mc": ("multiple_choice", 3, " ", builtin_mc),
        "arithmetic_mc": ("multiple_choice", 2, " Answer: ", arith_mc),
        "python_builtins_schema": ("schema", 2, " ", builtin_schema),
        "python_keywords_schema": ("schema", 0, " ", keyword_schema),
        "python_builtins_lm": ("language_modeling", 2, " ", builtin_lm),
        "python_keywords_lm": ("language_modeling", 0, " ", keyword_lm),
    }


def write_fixture_bundle(out_dir) -> Path:
    """Write the fixture CORE bundle to `out_dir` and return it."""
    out = Path(out_dir)
    (out / "eval_data" / "fixture").mkdir(parents=True, exist_ok=True)
    tasks = _bundle_items(random.Random(0))
    yaml_lines = ["icl_tasks:"]
    meta_rows = []
    for label, (ttype, shots, delim, items) in tasks.items():
        uri = f"fixture/{label}.jsonl"
        with (out / "eval_data" / uri).open("w", encoding="utf-8") as f:
            for item in items:
                f.write(json.dumps(item) + "\n")
        yaml_lines += [
            f"- label: {label}",
            f"  dataset_uri: {uri}",
            f"  num_fewshot: [{shots}]",
            f"  icl_task_type: {ttype}",
            f"  continuation_delimiter: {json.dumps(delim)}",
        ]
        options = len(items[0].get("choices") or items[0].get("context_options") or [])
        meta_rows.append((label, 100.0 / options if options else 0.0))
    (out / "core.yaml").write_text("\n".join(yaml_lines) + "\n", encoding="utf-8")
    with (out / "eval_meta_data.csv").open("w", encoding="utf-8", newline="") as f:
        w = csv.writer(f)
        w.writerow(["Eval Task", "Task Category", "Task Type", "#shots", "Random baseline"])
        for label, rb in meta_rows:
            w.writerow([label, "fixture", tasks[label][0], tasks[label][1], f"{rb:g}"])
    return out


# ----------------------------------------------------------------------------- chat tasks

_HUMANEVAL = [
    (
        "add",
        "a: int, b: int",
        "Return the sum of a and b.",
        "    return a + b\n",
        [("2, 3", "5"), ("-1, 1", "0")],
    ),
    (
        "is_even",
        "n: int",
        "Return True if n is even.",
        "    return n % 2 == 0\n",
        [("4", "True"), ("7", "False")],
    ),
    ("reverse", "s: str", "Return s reversed.", "    return s[::-1]\n", [("'abc'", "'cba'"), ("''", "''")]),
    (
        "count_vowels",
        "s: str",
        "Count the vowels (aeiou) in s.",
        "    return sum(c in 'aeiou' for c in s)\n",
        [("'banana'", "3"), ("'xyz'", "0")],
    ),
    (
        "square_all",
        "xs: List[int]",
        "Return the squares of xs.",
        "    return [x * x for x in xs]\n",
        [("[1, 2, 3]", "[1, 4, 9]"), ("[]", "[]")],
    ),
]


def _write_parquet(path: Path, rows: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.Table.from_pylist(rows), path)


def _mc_rows(rng: random.Random) -> list[tuple[str, list[str], int]]:
    names = [n for n, _ in BUILTINS]
    rows = []
    for name, what in BUILTINS:
        choices, gold = _options(rng, names, name)
        rows.append((f"Which Python built-in function {what}?", choices, gold))
    return rows


def _gsm8k_rows(rng: random.Random, n: int) -> list[dict]:
    rows = []
    for _ in range(n):
        a, b, c = rng.randint(2, 20), rng.randint(2, 20), rng.randint(2, 9)
        total = (a + b) * c
        rows.append(
            {
                "question": f"Ann has {a} apples and Bob has {b} apples. Each apple is cut into {c} slices. How many slices are there?",
                "answer": f"Together they have {a}+{b}=<<{a}+{b}={a + b}>>{a + b} apples.\n"
                f"That makes {a + b}*{c}=<<{a + b}*{c}={total}>>{total} slices.\n#### {total}",
            }
        )
    return rows


def write_fixture_chat_tasks(out_dir) -> Path:
    """Write ARC-Easy/Challenge, MMLU, GSM8K, HumanEval and SmolTalk-style fixture splits."""
    out = Path(out_dir)
    rng = random.Random(1)
    shard = "{split}-00000-of-00001.parquet"
    for subset in ("ARC-Easy", "ARC-Challenge"):
        rows = [
            {
                "id": f"fx-{subset}-{i}",
                "question": q,
                "choices": {"text": ch, "label": ["A", "B", "C", "D"]},
                "answerKey": "ABCD"[g],
            }
            for i, (q, ch, g) in enumerate(_mc_rows(rng))
        ]
        _write_parquet(out / "ai2_arc" / subset / shard.format(split="test"), rows)
    mmlu = [
        {"question": q, "subject": "computer_science", "choices": ch, "answer": g}
        for q, ch, g in _mc_rows(rng)
    ]
    _write_parquet(out / "mmlu" / "all" / shard.format(split="test"), mmlu)
    _write_parquet(out / "mmlu" / "all" / shard.format(split="auxiliary_train"), mmlu)
    _write_parquet(out / "gsm8k" / "main" / shard.format(split="test"), _gsm8k_rows(rng, 8))
    _write_parquet(out / "gsm8k" / "main" / shard.format(split="train"), _gsm8k_rows(rng, 16))
    he = []
    for i, (fn, sig, doc, body, cases) in enumerate(_HUMANEVAL):
        prompt = f'from typing import List\n\n\ndef {fn}({sig}):\n    """{doc}"""\n'
        test = "def check(candidate):\n" + "".join(f"    assert candidate({a}) == {r}\n" for a, r in cases)
        he.append(
            {
                "task_id": f"Fixture/{i}",
                "prompt": prompt,
                "canonical_solution": body,
                "test": test,
                "entry_point": fn,
            }
        )
    _write_parquet(out / "openai_humaneval" / "openai_humaneval" / shard.format(split="test"), he)
    talk = [
        {
            "messages": [
                {"role": "user", "content": f"What does {name}() do in Python?"},
                {"role": "assistant", "content": f"The built-in {name}() {what}."},
            ]
        }
        for name, what in BUILTINS
    ]
    _write_parquet(out / "smol-smoltalk" / shard.format(split="train"), talk)
    _write_parquet(out / "smol-smoltalk" / shard.format(split="test"), talk[:4])
    return out
