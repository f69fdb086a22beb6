"""SFT data: mask-correct targets from C's chat format, best-fit packing, mixtures, bad files."""

from __future__ import annotations

import json

import pytest
import torch

from shared.nanochat.chat_format import render_conversation
from shared.nanochat.eval.fixtures import write_fixture_chat_tasks
from shared.nanochat.sft_data import (
    build_mixture,
    demo_conversations,
    packed_batches,
    read_conversations_jsonl,
)

CONV = {
    "messages": [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "What is 2+3?"},
        {
            "role": "assistant",
            "content": [
                {"type": "text", "text": "Let me compute: "},
                {"type": "python", "text": "2+3"},
                {"type": "python_output", "text": "5"},
                {"type": "text", "text": "It is 5."},
            ],
        },
        {"role": "user", "content": "Thanks"},
        {"role": "assistant", "content": "You are welcome."},
    ]
}


def test_targets_are_exactly_the_assistant_tokens(tokenizer):
    ids, mask = render_conversation(tokenizer, CONV)
    seq_len = len(ids) + 5  # room left over: the row ends in padding
    x, y, state = next(packed_batches(tokenizer, [CONV], 1, seq_len, buffer_size=1))
    assert x.shape == y.shape == (1, seq_len)
    assert x[0, : len(ids)].tolist() == ids
    trained = [t for t in y[0].tolist() if t != -1]
    expected = [ids[i] for i in range(1, len(ids)) if mask[i] == 1]
    assert trained == expected
    sp = tokenizer.encode_special
    text = tokenizer.decode(trained)
    assert text == (
        "Let me compute: <|python_start|>2+3<|python_end|>It is 5.<|assistant_end|>"
        "You are welcome.<|assistant_end|>"
    )
    # nothing of the user turn, the tool output or the padding is a target
    for tok in (
        sp("<|user_start|>"),
        sp("<|output_start|>"),
        sp("<|assistant_start|>"),
        tokenizer.bos_token_id,
    ):
        assert tok not in trained
    assert (y[0, len(ids) - 1 :] == -1).all()
    assert state.consumed == 1


def test_best_fit_packing_rows_start_with_bos(tokenizer):
    convs = demo_conversations()[:40]
    lengths = sorted(len(render_conversation(tokenizer, c)[0]) for c in convs)
    seq_len = lengths[-1] * 2
    it = packed_batches(tokenizer, convs, 4, seq_len, buffer_size=16)
    for _ in range(3):
        x, y, _ = next(it)
        assert (x[:, 0] == tokenizer.bos_token_id).all()
        assert x.dtype == y.dtype == torch.int64
        # best fit fills rows: at least half of each row is real content
        for row in x.tolist():
            pad = 0
            while pad < len(row) and row[-1 - pad] == tokenizer.bos_token_id:
                pad += 1
            assert pad < seq_len / 2


def test_ranks_read_disjoint_conversations(tokenizer):
    convs = demo_conversations()[:8]
    s0 = next(packed_batches(tokenizer, convs, 1, 64, rank=0, world_size=2, buffer_size=1))[2]
    s1 = next(packed_batches(tokenizer, convs, 1, 64, rank=1, world_size=2, buffer_size=1))[2]
    assert s0.cursor % 2 == 0 and s1.cursor % 2 == 1


def test_user_jsonl_errors_name_file_and_line(tmp_path):
    good = {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]}
    p = tmp_path / "convs.jsonl"
    p.write_text(json.dumps(good) + "\n" + json.dumps(good["messages"]) + "\n")
    assert len(read_conversations_jsonl(p)) == 2
    p.write_text(json.dumps(good) + "\n\n{oops\n")
    with pytest.raises(ValueError, match=r"convs.jsonl:3: invalid JSON"):
        read_conversations_jsonl(p)
    p.write_text(json.dumps({"messages": [{"role": "assistant", "content": "x"}]}) + "\n")
    with pytest.raises(ValueError, match=r"convs.jsonl:1: message 0 has role 'assistant'"):
        read_conversations_jsonl(p)
    p.write_text(json.dumps({"messages": [{"role": "user", "content": "only a question"}]}) + "\n")
    with pytest.raises(ValueError, match=r"convs.jsonl:1: the last message must be from the assistant"):
        read_conversations_jsonl(p)


def test_default_mixture_from_hub_layout(tmp_path):
    tasks = write_fixture_chat_tasks(tmp_path / "tasks")
    mix = build_mixture("default", tasks_dir=tasks)
    # smoltalk 16 + mmlu aux 16 x3 + gsm8k train 16 x4
    assert len(mix) == 16 + 48 + 64
    assert any(isinstance(c["messages"][-1]["content"], list) for c in mix)  # gsm8k tool calls
    assert build_mixture("default", tasks_dir=tasks) == mix  # deterministic shuffle
    only_gsm = build_mixture("default", tasks_dir=tasks, smoltalk_epochs=0, mmlu_epochs=0, gsm8k_epochs=1)
    assert len(only_gsm) == 16
    with pytest.raises(ValueError, match="tasks_dir"):
        build_mixture("default")
    with pytest.raises(FileNotFoundError, match="smol-smoltalk"):
        build_mixture("default", tasks_dir=tmp_path)
