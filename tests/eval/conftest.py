"""Eval/SFT test fixtures: a real BPE tokenizer trained in-process and a model with scripted logits."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from shared.nanochat.eval.fixtures import BUILTINS, KEYWORDS
from shared.nanochat.tokenizer import train_tokenizer

torch.set_num_threads(1)

_TEXTS = (
    [
        "The capital of France is Paris. The cat sleeps and the dog barks. 2+2= 4 and 3+3= 6.",
        "Multiple Choice question: which one? - yes=A - no=B Respond only with the letter of the correct answer.",
        "def add(a, b):\n    return a + b\n",
    ]
    + [f"The built-in function {n}() {w}." for n, w in BUILTINS]
    + [f"The keyword {k} {w}." for k, w in KEYWORDS]
)


@pytest.fixture(scope="session")
def tokenizer(tmp_path_factory):
    return train_tokenizer(_TEXTS * 3, vocab_size=400, out_dir=tmp_path_factory.mktemp("tok"))


class ScriptedLM(nn.Module):
    """Logits chosen by the test: a row that so far equals the prefix of one of `known`
    sequences puts `confidence` on that sequence's next token; every other position is uniform.
    So the model "knows" exactly the texts the test gives it and nothing else."""

    def __init__(self, known: list[list[int]], vocab_size: int, confidence: float = 10.0):
        super().__init__()
        self.known = known
        self.vocab_size = vocab_size
        self.confidence = confidence
        self.anchor = nn.Parameter(torch.zeros(1))  # gives the model a device

    def forward(self, idx: torch.Tensor, targets=None):
        B, T = idx.shape
        logits = torch.zeros(B, T, self.vocab_size)
        for b in range(B):
            row = idx[b].tolist()
            for seq in self.known:
                for t in range(min(T, len(seq) - 1)):
                    if row[t] != seq[t]:
                        break
                    logits[b, t, seq[t + 1]] = self.confidence
        return logits + self.anchor


@pytest.fixture
def scripted_lm(tokenizer):
    def make(texts: list[str], confidence: float = 10.0) -> ScriptedLM:
        known = [tokenizer.encode(t, prepend=tokenizer.bos_token_id) for t in texts]
        return ScriptedLM(known, tokenizer.vocab_size, confidence)

    return make


@pytest.fixture(scope="session")
def trained_base(tmp_path_factory):
    """(data_dir, tokenizer_dir, checkpoint_dir) of a tiny base model really pretrained for a few
    steps on the offline demo corpus (depth 2, width 64, T=128)."""
    from shared.nanochat.train import train
    from tests.tiny import tiny_corpus, tiny_train_config

    root = tmp_path_factory.mktemp("eval_base")
    data, tok = tiny_corpus(root)
    cfg = tiny_train_config(data, tok, root / "base", max_seq_len=128, num_iterations=30, seed=7)
    result = train(cfg)
    assert result.checkpoint_step == 30
    return data, tok, root / "base"


@pytest.fixture
def scripted_ids(tokenizer):
    """ScriptedLM over token-id sequences (for prompts that contain special tokens)."""
    return lambda known: ScriptedLM(known, tokenizer.vocab_size)
