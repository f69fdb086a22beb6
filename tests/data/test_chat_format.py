from __future__ import annotations

import pytest
from tokenizers import Tokenizer as HFTokenizer

from shared.nanochat.chat_format import (
    CHAT_TEMPLATE,
    render_conversation,
    render_for_completion,
    render_template,
)

TOOL_CONV = {
    "messages": [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "What is 12*7?"},
        {
            "role": "assistant",
            "content": [
                {"type": "text", "text": "Let me "},
                {"type": "text", "text": "compute: "},
                {"type": "python", "text": "12*7"},
                {"type": "python_output", "text": "84"},
                {"type": "text", "text": " So 84."},
            ],
        },
        {"role": "user", "content": "Thanks!\n"},
        {"role": "assistant", "content": "You're welcome."},
    ]
}


def _segments(tok, ids, mask):
    """Decode runs of equal mask into (text, mask) pairs for readable assertions."""
    out = []
    for i, m in zip(ids, mask, strict=True):
        piece = tok.decode([i])
        if out and out[-1][1] == m:
            out[-1] = (out[-1][0] + piece, m)
        else:
            out.append((piece, m))
    return out


def test_mask_layout(tok):
    ids, mask = render_conversation(tok, TOOL_CONV)
    assert len(ids) == len(mask)
    assert _segments(tok, ids, mask) == [
        ("<|bos|><|user_start|>Be brief.\n\nWhat is 12*7?<|user_end|><|assistant_start|>", 0),
        ("Let me compute: <|python_start|>12*7<|python_end|>", 1),
        ("<|output_start|>84<|output_end|>", 0),
        (" So 84.<|assistant_end|>", 1),
        ("<|user_start|>Thanks!\n<|user_end|><|assistant_start|>", 0),
        ("You're welcome.<|assistant_end|>", 1),
    ]
    sp = tok.encode_special
    assert ids[0] == tok.bos_token_id
    assert ids.count(sp("<|assistant_end|>")) == 2
    # Every special token's mask follows the spec.
    for i, m in zip(ids, mask, strict=True):
        if i in (sp("<|assistant_end|>"), sp("<|python_start|>"), sp("<|python_end|>")):
            assert m == 1
        if i in (tok.bos_token_id, sp("<|assistant_start|>"), sp("<|user_start|>"), sp("<|output_start|>")):
            assert m == 0


def test_list_of_messages_and_truncation(tok):
    full, fmask = render_conversation(tok, TOOL_CONV["messages"])
    ids, mask = render_conversation(tok, TOOL_CONV, max_tokens=10)
    assert ids == full[:10] and mask == fmask[:10]


def test_sft_encodes_each_assistant_part_like_upstream(tok):
    # upstream's render_conversation: one encode() per part, so BPE never merges across parts
    ids, mask = render_conversation(tok, TOOL_CONV)
    sp = tok.encode_special
    start = ids.index(sp("<|assistant_start|>")) + 1
    want = tok.encode("Let me ") + tok.encode("compute: ") + [sp("<|python_start|>")]
    assert ids[start : start + len(want)] == want
    assert tok.encode("Let me compute: ") != tok.encode("Let me ") + tok.encode("compute: ")  # it matters


def test_render_for_completion(tok):
    ids = render_for_completion(tok, TOOL_CONV)
    assert ids[-1] == tok.encode_special("<|assistant_start|>")
    assert render_for_completion(tok, TOOL_CONV["messages"][:-1]) == ids
    # The final assistant answer is dropped, the rest is the conversation as rendered for SFT,
    # except that adjacent text parts are one segment, as the chat template renders them (kept
    # on purpose: a served prompt must tokenize the same in vLLM and the native server).
    prefix, _ = render_conversation(tok, TOOL_CONV["messages"][:-1])
    sp = tok.encode_special
    merged = tok.encode("Let me compute: ")
    split = tok.encode("Let me ") + tok.encode("compute: ")
    at = prefix.index(sp("<|assistant_start|>")) + 1
    assert prefix[at : at + len(split)] == split
    assert ids == prefix[:at] + merged + prefix[at + len(split) :] + [sp("<|assistant_start|>")]
    single = {"messages": TOOL_CONV["messages"][1:2]}  # no multi-part history: identical
    assert render_for_completion(tok, single) == render_conversation(tok, single)[0] + [
        sp("<|assistant_start|>")
    ]


@pytest.mark.parametrize(
    "messages",
    [
        TOOL_CONV["messages"][:-1],
        [{"role": "user", "content": "hi"}],
        [{"role": "system", "content": "S"}, {"role": "user", "content": " x  y\n\n"}],
        [
            {"role": "user", "content": "Numbers 1234 and 你好 🌍"},
            {"role": "assistant", "content": "ok"},
            {"role": "user", "content": "again?"},
        ],
    ],
)
def test_template_tokenizes_to_completion_ids(tok, tmp_path, messages):
    tok.save(tmp_path)
    hf = HFTokenizer.from_file(str(tmp_path / "tokenizer.json"))
    text = render_template(messages, add_generation_prompt=True)
    assert hf.encode(text, add_special_tokens=False).ids == render_for_completion(tok, messages)


def test_template_under_sandboxed_jinja(tok):
    # transformers and vLLM render chat templates in jinja2's immutable sandbox.
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
    msgs = TOOL_CONV["messages"][:-1]
    assert env.from_string(CHAT_TEMPLATE).render(
        messages=msgs, add_generation_prompt=True
    ) == render_template(msgs)


@pytest.mark.parametrize(
    "messages, match",
    [
        ([], "non-empty"),
        ([{"role": "assistant", "content": "x"}], "message 0 has role 'assistant'"),
        ([{"role": "user", "content": "a"}, {"role": "user", "content": "b"}], "message 1 has role 'user'"),
        ([{"role": "system", "content": "s"}, {"role": "assistant", "content": "b"}], "message 1"),
        ([{"role": "user", "content": ["x"]}], "message 0 \\(user\\) content must be a string"),
        (
            [
                {"role": "user", "content": "a"},
                {"role": "assistant", "content": [{"type": "image", "text": "x"}]},
            ],
            "message 1 part 0",
        ),
        ([{"role": "user"}], "message 0 must be a dict"),
    ],
)
def test_malformed_conversations(tok, messages, match):
    with pytest.raises(ValueError, match=match):
        render_conversation(tok, messages)


def test_missing_messages_field(tok):
    with pytest.raises(ValueError, match="messages"):
        render_conversation(tok, {"conversation": []})
