"""Chat tasks: loaders in the public formats, letter-argmax scoring, grading, ChatCORE."""

from __future__ import annotations

import json

import pytest

from shared.nanochat.chat_format import render_for_completion
from shared.nanochat.eval.chat import categorical_accuracy, chatcore, grade
from shared.nanochat.eval.fixtures import write_fixture_chat_tasks
from shared.nanochat.eval.tasks import load_chat_task, render_mc


def test_categorical_scores_the_letter_at_the_answer_position(tokenizer, scripted_ids, tmp_path):
    convs = load_chat_task(write_fixture_chat_tasks(tmp_path), "MMLU")[:6]
    letter = {x: tokenizer.encode(x)[0] for x in "ABCD"}
    # the model "knows" the right letter for the first four problems and a wrong one for the rest
    known = []
    for i, conv in enumerate(convs):
        right = conv["messages"][-1]["content"]
        said = right if i < 4 else next(x for x in "ABCD" if x != right)
        known.append(render_for_completion(tokenizer, conv) + [letter[said]])
    model = scripted_ids(known)
    assert categorical_accuracy(model, tokenizer, convs, batch_size=4) == pytest.approx(4 / 6)
    assert categorical_accuracy(model, tokenizer, convs, batch_size=1) == pytest.approx(4 / 6)


def test_render_mc_letter_follows_choice():
    text = render_mc("Capital of France?", ["A", "B"], ["Paris", "Rome"])
    assert text == (
        "Multiple Choice question: Capital of France?\n- Paris=A\n- Rome=B\n\n"
        "Respond only with the letter of the correct answer."
    )


def test_generative_grading(tmp_path):
    root = write_fixture_chat_tasks(tmp_path)
    gsm = load_chat_task(root, "GSM8K")[0]
    answer = gsm["reference"].split("####")[-1].strip()
    assert grade("GSM8K", gsm, f"blah\n#### {answer}")
    assert not grade("GSM8K", gsm, "#### 0")
    he = load_chat_task(root, "HumanEval")
    solved = [c for c in he if grade("HumanEval", c, c["messages"][-1]["content"])]
    assert len(solved) == len(he) == 5  # the canonical solutions pass their tests in the sandbox
    assert not grade("HumanEval", he[0], "def nothing():\n    pass\n")


def test_chatcore_centering():
    assert chatcore({"ARC-Easy": 0.25, "GSM8K": 0.0}) == 0.0
    assert chatcore({"MMLU": 1.0, "HumanEval": 0.5}) == pytest.approx((1.0 + 0.5) / 2)
    assert chatcore({}) is None


def test_loaders_read_jsonl_and_name_bad_rows(tmp_path):
    d = tmp_path / "ai2_arc" / "ARC-Easy"
    d.mkdir(parents=True)
    row = {
        "id": "1",
        "question": "Q?",
        "choices": {"text": ["x", "y"], "label": ["A", "B"]},
        "answerKey": "B",
    }
    (d / "test.jsonl").write_text(json.dumps(row) + "\n")
    conv = load_chat_task(tmp_path, "ARC-Easy")[0]
    assert conv["letters"] == ["A", "B"] and conv["messages"][-1]["content"] == "B"
    (d / "test.jsonl").write_text(json.dumps(row) + "\n" + json.dumps({**row, "answerKey": "E"}) + "\n")
    with pytest.raises(ValueError, match=r"test.jsonl:2: answerKey 'E' is not one of"):
        load_chat_task(tmp_path, "ARC-Easy")
    (d / "test.jsonl").write_text(json.dumps({"question": "Q?"}) + "\n")
    with pytest.raises(ValueError, match=r"test.jsonl:1: missing field 'choices'"):
        load_chat_task(tmp_path, "ARC-Easy")
    with pytest.raises(FileNotFoundError, match="gsm8k"):
        load_chat_task(tmp_path, "GSM8K")
    with pytest.raises(ValueError, match="unknown chat task"):
        load_chat_task(tmp_path, "TriviaQA")
