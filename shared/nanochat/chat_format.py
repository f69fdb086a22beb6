"""Conversations -> token ids + loss mask (SFT), prompts for completion, and the Jinja chat template.

Layout (MODEL_SPEC "SFT"): `<|bos|>`, then per turn `<|user_start|>text<|user_end|>` and
`<|assistant_start|>...<|assistant_end|>`. A system message is merged into the first user turn
(`system + "\\n\\n" + user`). The loss mask is 1 on what the assistant must learn to write
(its text, python calls with their delimiters, `<|assistant_end|>`), 0 on everything given to it.

Assistant content given as a list of parts is BPE-encoded part by part for SFT, as upstream does
(`render_conversation`). `CHAT_TEMPLATE` renders a conversation as text with the specials spelled
out, so a server tokenizes adjacent text parts as one string; `render_for_completion` (serving
and chat-eval prompts) therefore merges adjacent text parts first, on purpose, so that its ids
equal what vLLM / transformers make of the template. The two differ only for an assistant turn
with two text parts in a row inside a prompt's history, which upstream's tasks never produce.
"""

from __future__ import annotations

from typing import Any

PART_TYPES = ("text", "python", "python_output")

# Whitespace control (`-`) everywhere: the rendered string must contain nothing but the contents and
# the special tokens, or it would tokenize differently from render_for_completion.
CHAT_TEMPLATE = (
    "{%- set ns = namespace(prefix='') -%}"
    "<|bos|>"
    "{%- for message in messages -%}"
    "{%- if message['role'] == 'system' -%}"
    "{%- set ns.prefix = message['content'] ~ '\n\n' -%}"
    "{%- elif message['role'] == 'user' -%}"
    "<|user_start|>{{ ns.prefix ~ message['content'] }}<|user_end|>"
    "{%- set ns.prefix = '' -%}"
    "{%- elif message['role'] == 'assistant' -%}"
    "<|assistant_start|>"
    "{%- if message['content'] is string -%}"
    "{{ message['content'] }}"
    "{%- else -%}"
    "{%- for part in message['content'] -%}"
    "{%- if part['type'] == 'python' -%}"
    "<|python_start|>{{ part['text'] }}<|python_end|>"
    "{%- elif part['type'] == 'python_output' -%}"
    "<|output_start|>{{ part['text'] }}<|output_end|>"
    "{%- else -%}"
    "{{ part['text'] }}"
    "{%- endif -%}"
    "{%- endfor -%}"
    "{%- endif -%}"
    "<|assistant_end|>"
    "{%- endif -%}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}<|assistant_start|>{%- endif -%}"
)


def _messages(conversation: dict | list[dict]) -> list[dict]:
    if isinstance(conversation, dict):
        if "messages" not in conversation:
            raise ValueError("conversation has no 'messages' field")
        messages = conversation["messages"]
    else:
        messages = conversation
    if not isinstance(messages, list) or not messages:
        raise ValueError("conversation 'messages' must be a non-empty list")
    return messages


def normalize_messages(conversation: dict | list[dict], *, merge_text: bool = False) -> list[dict]:
    """Validate roles and contents; merge a leading system message into the first user turn;
    with `merge_text`, join adjacent assistant text parts (as the chat template renders them).

    Returns a new list alternating user/assistant starting with user; errors name the message index.
    """
    messages = _messages(conversation)
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or "role" not in m or "content" not in m:
            raise ValueError(f"message {i} must be a dict with 'role' and 'content'")
    out: list[dict] = []
    start = 0
    prefix = ""
    if messages[0]["role"] == "system":
        if not isinstance(messages[0]["content"], str):
            raise ValueError("message 0 (system) content must be a string")
        if len(messages) < 2 or messages[1]["role"] != "user":
            raise ValueError("message 1 must be from 'user' after a system message")
        prefix = messages[0]["content"] + "\n\n"
        start = 1
    for i in range(start, len(messages)):
        m = messages[i]
        expected = "user" if (i - start) % 2 == 0 else "assistant"
        if m["role"] != expected:
            raise ValueError(
                f"message {i} has role {m['role']!r} but should be {expected!r} (roles alternate user/assistant)"
            )
        content = m["content"]
        if expected == "user":
            if not isinstance(content, str):
                raise ValueError(f"message {i} (user) content must be a string")
            out.append({"role": "user", "content": prefix + content if not out else content})
        else:
            out.append({"role": "assistant", "content": _assistant_parts(i, content, merge_text)})
    return out


def _assistant_parts(i: int, content: Any, merge_text: bool) -> list[dict]:
    """Assistant content as a list of parts; with `merge_text`, adjacent text parts become one
    (one BPE segment, as the chat template renders them)."""
    if isinstance(content, str):
        return [{"type": "text", "text": content}]
    if not isinstance(content, list):
        raise ValueError(f"message {i} (assistant) content must be a string or a list of parts")
    parts: list[dict] = []
    for j, part in enumerate(content):
        if (
            not isinstance(part, dict)
            or part.get("type") not in PART_TYPES
            or not isinstance(part.get("text"), str)
        ):
            raise ValueError(
                f"message {i} part {j} must be {{'type': one of {PART_TYPES}, 'text': str}}, got {part!r:.80}"
            )
        if merge_text and part["type"] == "text" and parts and parts[-1]["type"] == "text":
            parts[-1] = {"type": "text", "text": parts[-1]["text"] + part["text"]}
        else:
            parts.append({"type": part["type"], "text": part["text"]})
    return parts


def render_conversation(
    tok, conversation: dict | list[dict], max_tokens: int = 2048
) -> tuple[list[int], list[int]]:
    """(ids, mask) for SFT; mask 1 marks tokens the assistant is trained to produce. Each
    assistant part is encoded on its own, as upstream's render_conversation does."""
    return _render(tok, conversation, max_tokens, merge_text=False)


def _render(
    tok, conversation: dict | list[dict], max_tokens: int, merge_text: bool
) -> tuple[list[int], list[int]]:
    if max_tokens <= 0:
        raise ValueError(f"max_tokens must be positive, got {max_tokens}")
    ids: list[int] = []
    mask: list[int] = []

    def add(tokens: int | list[int], m: int) -> None:
        tokens = [tokens] if isinstance(tokens, int) else tokens
        ids.extend(tokens)
        mask.extend([m] * len(tokens))

    sp = tok.encode_special
    add(tok.bos_token_id, 0)
    for message in normalize_messages(conversation, merge_text=merge_text):
        if message["role"] == "user":
            add(sp("<|user_start|>"), 0)
            add(tok.encode(message["content"]), 0)
            add(sp("<|user_end|>"), 0)
            continue
        add(sp("<|assistant_start|>"), 0)
        for part in message["content"]:
            body = tok.encode(part["text"])
            if part["type"] == "text":
                add(body, 1)
            elif part["type"] == "python":
                add(sp("<|python_start|>"), 1)
                add(body, 1)
                add(sp("<|python_end|>"), 1)
            else:  # tool output comes from the interpreter at inference time: never a target
                add(sp("<|output_start|>"), 0)
                add(body, 0)
                add(sp("<|output_end|>"), 0)
        add(sp("<|assistant_end|>"), 1)
    return ids[:max_tokens], mask[:max_tokens]


def render_for_completion(tok, conversation: dict | list[dict]) -> list[int]:
    """Prompt ids ending in `<|assistant_start|>`, equal to the chat template's tokenization
    (adjacent assistant text parts merged, see the module doc). A trailing assistant message (the
    answer of an eval example) is dropped first, as in the reference."""
    messages = list(_messages(conversation))
    if messages[-1].get("role") == "assistant":
        messages = messages[:-1]
    if not messages:
        raise ValueError("conversation has no prompt left after dropping the final assistant message")
    ids, _ = _render(tok, messages, max_tokens=10**9, merge_text=True)
    return ids + [tok.encode_special("<|assistant_start|>")]


def render_template(messages: list[dict], add_generation_prompt: bool = True) -> str:
    """CHAT_TEMPLATE rendered with jinja2, the way transformers/vLLM render it (for tests and CLIs)."""
    import jinja2

    env = jinja2.Environment(trim_blocks=True, lstrip_blocks=True)
    return env.from_string(CHAT_TEMPLATE).render(
        messages=messages, add_generation_prompt=add_generation_prompt
    )
