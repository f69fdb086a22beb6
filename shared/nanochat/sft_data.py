"""SFT data: the conversation mixture and the best-fit packed batches built from it.

Sources (all local files, no downloads):
- "default": SmolTalk train + MMLU auxiliary_train x3 + GSM8K train x4 (the reference mixture),
  read from a folder in the Hub layout described in eval/tasks.py;
- "demo": conversations generated here (Python built-ins/keywords Q&A and calculator tool calls);
- "jsonl": the user's own files, one conversation per line: {"messages": [...]} or [...].
Extra JSONL files can be added to any mixture.

Packing follows the reference: every row starts at a conversation's BOS; the largest buffered
conversation that still fits is placed next; when none fits, the rest of the row is padding whose
targets are ignored. Targets are -1 wherever the loss mask is 0, so only assistant tokens train.
"""

from __future__ import annotations

import random
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch

from shared.nanochat.chat_format import normalize_messages, render_conversation
from shared.nanochat.eval.fixtures import BUILTINS, KEYWORDS
from shared.nanochat.eval.gsm8k import gsm8k_conversation
from shared.nanochat.eval.tasks import load_conversations, mmlu_conversation, smoltalk_conversation
from shared.nanochat.jsonl import iter_jsonl
from shared.nanochat.sft_config import MIXTURES


def read_conversations_jsonl(path: Path) -> list[dict]:
    """User conversations; a malformed line raises naming the file, line and problem."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"conversations file {path} does not exist")
    out = []
    for where, obj in iter_jsonl(path):
        conv = {"messages": obj} if isinstance(obj, list) else obj
        try:
            if not isinstance(conv, dict):
                raise ValueError("expected an object with 'messages' or a list of messages")
            messages = normalize_messages(conv)
            if messages[-1]["role"] != "assistant":
                raise ValueError("the last message must be from the assistant (nothing to learn otherwise)")
        except ValueError as e:
            raise ValueError(f"{where}: {e}") from None
        out.append({"messages": conv["messages"]})
    if not out:
        raise ValueError(f"{path}: no conversations")
    return out


def demo_conversations(seed: int = 0) -> list[dict]:
    """Offline SFT data: Q&A about Python built-ins/keywords and calculator tool-call arithmetic."""
    rng = random.Random(seed)
    convs: list[dict] = []
    for name, what in BUILTINS:
        convs.append(_qa(f"What does the Python built-in {name}() do?", f"{name}() {what}."))
        convs.append(_qa(f"Which Python built-in function {what}?", f"That is {name}()."))
    for kw, what in KEYWORDS:
        convs.append(_qa(f"What does the Python keyword '{kw}' do?", f"The keyword '{kw}' {what}."))
    convs.append(_qa("Hi! Who are you?", "Hello! I am nanochat, a small language model. How can I help?"))
    for _ in range(48):
        a, b = rng.randint(2, 99), rng.randint(2, 99)
        op = rng.choice(["+", "*", "-"])
        result = {"+": a + b, "*": a * b, "-": a - b}[op]
        word = {"+": "plus", "*": "times", "-": "minus"}[op]
        answer = f"Let me compute it: {a}{op}{b}=<<{a}{op}{b}={result}>>{result}.\n#### {result}"
        convs.append(gsm8k_conversation(f"What is {a} {word} {b}?", answer))
    return convs


def _qa(question: str, answer: str) -> dict:
    return {"messages": [{"role": "user", "content": question}, {"role": "assistant", "content": answer}]}


def _gsm8k_train_row(row: dict) -> dict:
    return gsm8k_conversation(str(row["question"]), str(row["answer"]))


def build_mixture(
    mixture: str,
    *,
    tasks_dir: Path | None = None,
    conversations: tuple[str, ...] = (),
    smoltalk_epochs: int = 1,
    mmlu_epochs: int = 3,
    gsm8k_epochs: int = 4,
    seed: int = 42,
) -> list[dict]:
    """All training conversations of a mixture, deterministically shuffled together."""
    if mixture not in MIXTURES:
        raise ValueError(f"mixture: {mixture!r} is not one of {MIXTURES}")
    convs: list[dict] = []
    if mixture == "default":
        if tasks_dir is None:
            raise ValueError(
                "tasks_dir: the default mixture needs the folder holding smol-smoltalk/, mmlu/, gsm8k/"
            )
        root = Path(tasks_dir)
        # (folder, split, converter, repeats); a component repeated 0 times is not read at all
        parts = [
            (root / "smol-smoltalk", "train", smoltalk_conversation, smoltalk_epochs),
            (root / "mmlu" / "all", "auxiliary_train", mmlu_conversation, mmlu_epochs),
            (root / "gsm8k" / "main", "train", _gsm8k_train_row, gsm8k_epochs),
        ]
        for folder, split, convert, repeats in parts:
            if repeats > 0:
                convs += load_conversations(folder, split, convert, shuffle_seed=None) * repeats
        if not convs:
            raise ValueError("mixture: the default mixture has every component at 0 epochs")
    elif mixture == "demo":
        convs += demo_conversations()
    elif not conversations:
        raise ValueError("conversations: the jsonl mixture needs at least one conversations file")
    for path in conversations:
        convs += read_conversations_jsonl(Path(path))
    random.Random(seed).shuffle(convs)
    return convs


@dataclass
class PackerState:
    """Where a packer stands in its conversation list (saved in SFT checkpoints)."""

    cursor: int = 0  # next conversation to tokenize into the buffer
    consumed: int = 0  # conversations placed into rows
    epoch: int = 0


def packed_batches(
    tokenizer,
    conversations: list[dict],
    batch_size: int,
    seq_len: int,
    *,
    rank: int = 0,
    world_size: int = 1,
    buffer_size: int = 64,
    state: PackerState | None = None,
) -> Iterator[tuple[torch.Tensor, torch.Tensor, PackerState]]:
    """Endless (inputs, targets, state) batches of shape (batch_size, seq_len), int64.

    This rank reads conversations rank, rank + world_size, ...; `state.consumed / len(...)`
    is the fraction of an epoch done.
    """
    if not conversations:
        raise ValueError("conversations: empty SFT mixture")
    if batch_size < 1 or seq_len < 2:
        raise ValueError(f"batch_size/seq_len: need >= 1 and >= 2, got {batch_size}, {seq_len}")
    st = state or PackerState(cursor=rank)
    capacity = seq_len + 1  # one extra token so the last input position has a target
    bos = tokenizer.bos_token_id
    buffer: list[tuple[list[int], list[int]]] = []
    n = len(conversations)

    def refill() -> None:
        while len(buffer) < buffer_size:
            # over-long conversations are cropped to one row rather than dropped
            buffer.append(render_conversation(tokenizer, conversations[st.cursor], max_tokens=capacity))
            st.cursor += world_size
            if st.cursor >= n:
                st.cursor %= n
                st.epoch += 1

    while True:
        rows, masks = [], []
        for _ in range(batch_size):
            row: list[int] = []
            mask: list[int] = []
            while len(row) < capacity:
                refill()
                room = capacity - len(row)
                best = max(
                    (i for i, (ids, _) in enumerate(buffer) if len(ids) <= room),
                    key=lambda i: len(buffer[i][0]),
                    default=None,
                )
                if best is None:  # nothing fits: pad, never crop a conversation across rows
                    row += [bos] * room
                    mask += [0] * room
                    break
                ids, m = buffer.pop(best)
                row += ids
                mask += m
                st.consumed += world_size
            rows.append(row)
            masks.append(mask)
        batch = torch.tensor(rows, dtype=torch.long)
        inputs = batch[:, :-1].contiguous()
        targets = batch[:, 1:].clone()
        # the mask of token t+1 decides whether predicting it is trained; padding has mask 0
        targets[torch.tensor(masks, dtype=torch.bool)[:, 1:].logical_not()] = -1
        yield inputs, targets, PackerState(st.cursor, st.consumed, st.epoch)
