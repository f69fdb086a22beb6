"""CORE harness: each task type scored on a model whose answers the test scripts."""

from __future__ import annotations

import json
import math

import pytest
import torch

from shared.nanochat.eval.core import (
    BundleError,
    CoreTask,
    centered_accuracy,
    evaluate_core,
    load_task_data,
    render_prompts,
    score_item,
    token_spans,
)
from shared.nanochat.eval.fixtures import write_fixture_bundle


def _bundle(tmp_path, tasks: dict[str, tuple[str, int, list[dict], float]]):
    (tmp_path / "eval_data").mkdir(parents=True)
    lines = ["icl_tasks:"]
    meta = ["Eval Task,Random baseline"]
    for label, (ttype, shots, items, rb) in tasks.items():
        (tmp_path / "eval_data" / f"{label}.jsonl").write_text("".join(json.dumps(i) + "\n" for i in items))
        lines += [
            f"- label: {label}",
            f"  dataset_uri: {label}.jsonl",
            f"  num_fewshot: [{shots}]",
            f"  icl_task_type: {ttype}",
            '  continuation_delimiter: " "',
        ]
        meta.append(f"{label},{rb}")
    (tmp_path / "core.yaml").write_text("\n".join(lines) + "\n")
    (tmp_path / "eval_meta_data.csv").write_text("\n".join(meta) + "\n")
    return tmp_path


MC = [
    {"query": "2+2=", "choices": ["3", "4", "5"], "gold": 1},
    {"query": "3+3=", "choices": ["6", "7", "9"], "gold": 0},
]
SCHEMA = [{"context_options": ["The cat", "The dog"], "continuation": "barks", "gold": 1}]
LM = [
    {"context": "The capital of France is  ", "continuation": "Paris"},
    {"context": "The dog", "continuation": "barks"},
]


def test_centering_arithmetic():
    assert centered_accuracy(0.25, 25.0) == pytest.approx(0.0)
    assert centered_accuracy(1.0, 25.0) == pytest.approx(1.0)
    assert centered_accuracy(0.5, 25.0) == pytest.approx(1 / 3)
    assert centered_accuracy(0.1, 0.0) == pytest.approx(0.1)
    assert centered_accuracy(0.0, 50.0) == pytest.approx(-1.0)  # below chance is negative


def test_multiple_choice_picks_lowest_loss(tmp_path, tokenizer, scripted_lm):
    # knows the right answer to the first item and a wrong one for the second
    model = scripted_lm(["2+2= 4", "3+3= 9"])
    bundle = _bundle(tmp_path, {"mc": ("multiple_choice", 0, MC, 33.3)})
    out = evaluate_core(model, tokenizer, bundle)
    assert out["results"]["mc"] == pytest.approx(0.5)
    assert out["centered"]["mc"] == pytest.approx((0.5 - 0.333) / (1 - 0.333))
    assert out["core"] == pytest.approx(out["centered"]["mc"])
    assert out["failed"] == {}


def test_schema_scores_shared_continuation(tmp_path, tokenizer, scripted_lm):
    task = CoreTask("s", "schema", "s.jsonl", 0)
    assert score_item(scripted_lm(["The dog barks"]), tokenizer, SCHEMA, 0, task) is True
    assert score_item(scripted_lm(["The cat barks"]), tokenizer, SCHEMA, 0, task) is False


def test_language_modeling_needs_exact_greedy_match(tokenizer, scripted_lm):
    task = CoreTask("lm", "language_modeling", "lm.jsonl", 0)
    # the trailing whitespace of the context is trimmed before the delimiter
    model = scripted_lm(["The capital of France is Paris"])
    assert score_item(model, tokenizer, LM, 0, task) is True
    assert score_item(model, tokenizer, LM, 1, task) is False
    # knowing only a prefix of the continuation is not enough
    partial = scripted_lm(["The capital of France is Par"])
    full = tokenizer.encode("The capital of France is Paris")
    if len(tokenizer.encode("The capital of France is Par")) < len(full):
        assert score_item(partial, tokenizer, LM, 0, task) is False


def test_prompt_rendering_and_fewshot(tokenizer, scripted_lm):
    task = CoreTask("mc", "multiple_choice", "mc.jsonl", 1)
    prompts = render_prompts(MC[0], task, [MC[1]])
    assert prompts == ["3+3= 6\n\n2+2= 3", "3+3= 6\n\n2+2= 4", "3+3= 6\n\n2+2= 5"]
    lm = render_prompts(LM[0], CoreTask("lm", "language_modeling", "x", 1), [LM[1]])
    assert lm == [
        "The dog barks\n\nThe capital of France is",
        "The dog barks\n\nThe capital of France is Paris",
    ]
    # 1-shot MC: the few-shot example is the other item (never the item itself), chosen by a fixed seed
    model = scripted_lm(["3+3= 6\n\n2+2= 4", "2+2= 4\n\n3+3= 6"])
    assert score_item(model, tokenizer, MC, 0, task) and score_item(model, tokenizer, MC, 1, task)


def test_malformed_task_fails_alone(tmp_path, tokenizer, scripted_lm):
    bundle = _bundle(
        tmp_path, {"mc": ("multiple_choice", 0, MC, 33.3), "lm": ("language_modeling", 0, LM, 0.0)}
    )
    with (bundle / "eval_data" / "lm.jsonl").open("a") as f:
        f.write('{"context": "x"}\n')
    out = evaluate_core(scripted_lm(["2+2= 4", "3+3= 6"]), tokenizer, bundle)
    assert out["results"] == {"mc": 1.0}
    assert "lm.jsonl:3" in out["failed"]["lm"] and "continuation" in out["failed"]["lm"]
    with pytest.raises(BundleError, match=r"mc.jsonl:1: invalid JSON"):
        (bundle / "eval_data" / "mc.jsonl").write_text("{not json\n")
        load_task_data(bundle / "eval_data" / "mc.jsonl", "multiple_choice")


def test_fixture_bundle_runs_every_type(tmp_path, tokenizer, scripted_lm):
    bundle = write_fixture_bundle(tmp_path / "bundle")
    out = evaluate_core(scripted_lm([]), tokenizer, bundle, max_per_task=3)
    assert out["failed"] == {}
    assert len(out["results"]) == 6 and all(n == 3 for n in out["num_items"].values())
    # a model that knows nothing gets every LM item wrong; CORE is a finite mean
    assert out["results"]["python_keywords_lm"] == 0.0
    assert math.isfinite(out["core"])


def test_choice_that_is_a_prefix_of_another_gets_a_nonempty_span(tokenizer):
    task = CoreTask("mc", "multiple_choice", "mc.jsonl", 0)
    prompts = render_prompts({"query": "3+3=", "choices": ["6", "66", "6 6"], "gold": 0}, task, [])
    toks, starts, ends = token_spans(tokenizer, prompts, "multiple_choice")
    assert all(0 < s < e == len(t) for t, s, e in zip(toks, starts, ends, strict=True))


class _Recording(torch.nn.Module):
    """Our GPT, recording the length of every batch it is given (the scorer's view of a prompt)."""

    def __init__(self, model):
        super().__init__()
        self.model, self.lengths = model, []
        self.cos, self.config = model.cos, model.config

    def forward(self, idx):
        self.lengths.append(idx.shape[1])
        return self.model(idx)


def _gpt(sequence_len: int, vocab_size: int):
    from shared.nanochat.config import GPTConfig
    from shared.nanochat.gpt import GPT

    torch.manual_seed(0)
    cfg = GPTConfig(sequence_len=sequence_len, vocab_size=vocab_size, n_layer=2, n_head=2, n_kv_head=2,
                    n_embd=64, window_pattern="L")  # fmt: skip
    model = GPT(cfg)
    model.init_weights()
    return model.eval()


def test_core_scores_the_whole_prompt_beyond_sequence_len_like_upstream(tokenizer):
    # upstream scores prompts longer than the training context in full (its rotary table is 10x
    # sequence_len); only past that table would there be nothing left to do but crop
    item = {"query": "The capital of France is Paris. " * 6 + "2+2=", "choices": ["4", "5"], "gold": 0}
    task = CoreTask("mc", "multiple_choice", "mc.jsonl", 0)
    toks, starts, ends = token_spans(tokenizer, render_prompts(item, task, []), "multiple_choice")
    n = max(len(t) for t in toks)
    gpt = _gpt(16, tokenizer.vocab_size)
    assert 16 < n <= gpt.cos.shape[1]  # longer than the context, inside the rotary table
    model = _Recording(gpt)
    got = score_item(model, tokenizer, [item], 0, task)
    assert model.lengths == [n]
    with torch.no_grad():  # upstream's computation on the whole prompts
        losses = []
        for t, s, e in zip(toks, starts, ends, strict=True):
            logits = gpt(torch.tensor([t]))[0]
            losses.append(
                torch.nn.functional.cross_entropy(logits[s - 1 : e - 1], torch.tensor(t[s:e])).item()
            )
    assert got == (losses.index(min(losses)) == item["gold"])
    short = _Recording(_gpt(2, tokenizer.vocab_size))  # rotary table of 20 positions < n
    score_item(short, tokenizer, [item], 0, task)
    assert short.lengths == [20]
