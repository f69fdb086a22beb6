"""The native batcher's ragged decode step equals our GPT's own forward (GQA, sliding windows)."""

from __future__ import annotations

import threading

import torch

from services.inference.native.batcher import Batcher, GenerationRequest, SamplingParams
from shared.nanochat.config import GPTConfig
from shared.nanochat.gpt import GPT
from shared.nanochat.tokenizer import Tokenizer

torch.set_num_threads(1)


def _gqa_model(vocab_size: int) -> GPT:
    # 4 query heads sharing 2 kv heads; 256 context with 128-token windows on layers 0 and 2.
    cfg = GPTConfig(sequence_len=256, vocab_size=vocab_size, n_layer=4, n_head=4, n_kv_head=2, n_embd=256,
                    window_pattern="SL")  # fmt: skip
    torch.manual_seed(5)
    model = GPT(cfg, compute_dtype=torch.float32)
    model.init_weights()
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.add_(torch.randn_like(p) * (0.3 if "lambda" in name else 0.05))
    return model.eval()


def test_ragged_batch_greedy_matches_full_forward(tiny_run):
    tok = Tokenizer.load(tiny_run["tokenizer_dir"])
    model = _gqa_model(tok.vocab_size)
    g = torch.Generator().manual_seed(2)
    # Different lengths, two of them past the 128-token window, so rows sit at different positions.
    prompts = [torch.randint(0, 500, (n,), generator=g).tolist() for n in (5, 140, 190)]
    batcher = Batcher(model, tok, max_batch=4)
    outputs: dict[int, list[int]] = {i: [] for i in range(len(prompts))}
    done = threading.Event()
    finished = []

    def make_cb(i):
        def cb(index, token, reason):
            if token is not None:
                outputs[i].append(token)
            else:
                finished.append(i)
                if len(finished) == len(prompts):
                    done.set()

        return cb

    # Enqueue all before the thread starts, so they are admitted together and decode as one batch.
    for i, p in enumerate(prompts):
        batcher.submit(GenerationRequest(p, SamplingParams(max_tokens=12, temperature=0.0), make_cb(i)))
    batcher.start()
    assert done.wait(120)
    batcher.close()
    assert batcher.max_rows_seen == len(prompts)
    stops = batcher.stops
    for i, prompt in enumerate(prompts):
        ids = list(prompt)
        for token in outputs[i]:
            with torch.no_grad():
                want = int(model(torch.tensor([ids]))[0, -1].argmax())
            assert token == want, f"prompt {i} diverged at generated position {len(ids) - len(prompt)}"
            if token in stops:
                break
            ids.append(token)
