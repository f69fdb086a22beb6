"""Chat tasks read from local copies of the public datasets, turned into conversations.

Files are read in the datasets' own formats (Hugging Face parquet exports, or JSONL with the
same field names) from the Hub repository layout under one folder:

    ai2_arc/ARC-Easy/test-00000-of-00001.parquet       allenai/ai2_arc: question, choices{text,label}, answerKey
    ai2_arc/ARC-Challenge/test-*.parquet
    mmlu/all/{test,auxiliary_train}-*.parquet          cais/mmlu: question, subject, choices, answer (int)
    gsm8k/main/{test,train}-*.parquet                  openai/gsm8k: question, answer ("... #### 72")
    openai_humaneval/openai_humaneval/test-*.parquet   prompt, canonical_solution, test, entry_point
    smol-smoltalk/{train,test}-*.parquet               HuggingFaceTB/smol-smoltalk: messages

(`<split>.jsonl` works wherever `<split>-*.parquet` does.) Rows are shuffled with the same seeded
permutation as the reference, so a `max_per_task` subset picks the same problems.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq

from shared.nanochat.eval.gsm8k import gsm8k_conversation
from shared.nanochat.jsonl import iter_jsonl

MC_LETTERS = ("A", "B", "C", "D")

# task -> (folder under tasks_dir, split, kind, random-guess accuracy)
CHAT_TASKS: dict[str, tuple[str, str, str, float]] = {
    "ARC-Easy": ("ai2_arc/ARC-Easy", "test", "categorical", 0.25),
    "ARC-Challenge": ("ai2_arc/ARC-Challenge", "test", "categorical", 0.25),
    "MMLU": ("mmlu/all", "test", "categorical", 0.25),
    "GSM8K": ("gsm8k/main", "test", "generative", 0.0),
    "HumanEval": ("openai_humaneval/openai_humaneval", "test", "generative", 0.0),
}


def split_files(directory: Path, split: str) -> list[Path]:
    """The parquet shards or JSONL files of one split in a dataset folder."""
    directory = Path(directory)
    files = sorted(directory.glob(f"{split}-*.parquet")) + sorted(directory.glob(f"{split}.parquet"))
    files += sorted(directory.glob(f"{split}.jsonl")) + sorted(directory.glob(f"{split}-*.jsonl"))
    if not files:
        raise FileNotFoundError(f"{directory}: no '{split}-*.parquet' or '{split}.jsonl' files")
    return files


def read_rows(files: list[Path]) -> list[tuple[str, dict]]:
    """All rows of the files, each with a location ('file:line' or 'file row N') for errors."""
    rows: list[tuple[str, dict]] = []
    for path in files:
        if path.suffix == ".parquet":
            try:
                table = pq.read_table(path)
            except Exception as e:  # pyarrow raises several unrelated types for a bad file
                raise ValueError(f"{path}: unreadable parquet: {e}") from None
            rows.extend((f"{path} row {i}", row) for i, row in enumerate(table.to_pylist()))
            continue
        for where, row in iter_jsonl(path):
            if not isinstance(row, dict):
                raise ValueError(f"{where}: expected a JSON object")
            rows.append((where, row))
    return rows


def render_mc(question: str, letters, choices) -> str:
    """Multiple-choice prompt; the letter follows its choice with no space ("- Paris=A"), so the
    answer token the model emits ("A") is the same token it saw in the prompt."""
    lines = "".join(f"- {choice}={letter}\n" for letter, choice in zip(letters, choices, strict=True))
    return (
        f"Multiple Choice question: {question}\n{lines}\nRespond only with the letter of the correct answer."
    )


def arc_conversation(row: dict) -> dict:
    letters, texts = list(row["choices"]["label"]), list(row["choices"]["text"])
    if row["answerKey"] not in letters:
        raise ValueError(f"answerKey {row['answerKey']!r} is not one of {letters}")
    return {
        "messages": [
            {"role": "user", "content": render_mc(row["question"], letters, texts)},
            {"role": "assistant", "content": row["answerKey"]},
        ],
        "letters": letters,
    }


def mmlu_conversation(row: dict) -> dict:
    choices, answer = list(row["choices"]), row["answer"]
    if len(choices) != 4 or not isinstance(answer, int) or not 0 <= answer < 4:
        raise ValueError(
            f"needs 4 choices and an answer index 0..3, got {len(choices)} choices, answer {answer!r}"
        )
    return {
        "messages": [
            {"role": "user", "content": render_mc(row["question"], MC_LETTERS, choices)},
            {"role": "assistant", "content": MC_LETTERS[answer]},
        ],
        "letters": list(MC_LETTERS),
        "subject": row.get("subject", ""),
    }


def gsm8k_row_conversation(row: dict) -> dict:
    conv = gsm8k_conversation(str(row["question"]), str(row["answer"]))
    conv["reference"] = row["answer"]
    if "####" not in conv["reference"]:
        raise ValueError("answer has no '####' final-answer marker")
    return conv


def humaneval_conversation(row: dict) -> dict:
    prompt = row["prompt"]
    return {
        "messages": [
            {"role": "user", "content": prompt},
            {"role": "assistant", "content": prompt + row["canonical_solution"]},
        ],
        "prompt": prompt,
        "test": row["test"],
        "entry_point": row["entry_point"],
    }


def smoltalk_conversation(row: dict) -> dict:
    messages = row["messages"]
    if not isinstance(messages, list) or not messages:
        raise ValueError("'messages' must be a non-empty list")
    return {"messages": [{"role": m["role"], "content": m["content"]} for m in messages]}


CONVERTERS: dict[str, Callable[[dict], dict]] = {
    "ARC-Easy": arc_conversation,
    "ARC-Challenge": arc_conversation,
    "MMLU": mmlu_conversation,
    "GSM8K": gsm8k_row_conversation,
    "HumanEval": humaneval_conversation,
}


def load_conversations(
    directory: Path, split: str, convert: Callable[[dict], dict], *, shuffle_seed: int | None = 42
) -> list[dict]:
    """Read a split and convert each row; a bad row raises naming its file and line/row."""
    rows = read_rows(split_files(directory, split))
    out = []
    for where, row in rows:
        try:
            out.append(convert(row))
        except KeyError as e:
            raise ValueError(f"{where}: missing field {e}") from None
        except (TypeError, ValueError) as e:
            raise ValueError(f"{where}: {e}") from None
    if shuffle_seed is not None and out:
        perm = np.random.default_rng(shuffle_seed).permutation(len(out))
        out = [out[int(i)] for i in perm]
    return out


def load_chat_task(tasks_dir: Path, name: str) -> list[dict]:
    """Conversations of one eval task (ARC-Easy, ARC-Challenge, MMLU, GSM8K, HumanEval)."""
    if name not in CHAT_TASKS:
        raise ValueError(f"task: unknown chat task {name!r}; known: {sorted(CHAT_TASKS)}")
    folder, split, _, _ = CHAT_TASKS[name]
    return load_conversations(Path(tasks_dir) / folder, split, CONVERTERS[name])
