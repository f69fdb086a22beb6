"""Evaluation / SFT-data efficiency, each against a simple baseline measured in the same run.

    python bench/eval.py                     # CPU, depth-2 model (seconds)
    python bench/eval.py --depth 12 --device cuda

Rows (ratio = ours / baseline, higher is better unless noted):
- categorical chat eval (ARC fixture): prompts batched 8 per forward vs one prompt per forward;
- CORE multiple choice (fixture bundle): all choices of an item in one forward vs one forward per choice;
- SFT packing: share of trained-on (non-padding) tokens with best-fit packing vs one conversation per row;
- sandbox: wall time of one sandboxed HumanEval-size program vs a bare `python -c` (overhead, lower is better).
The model is randomly initialised: only speed is measured here, not accuracy.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from shared.nanochat.chat_format import render_conversation  # noqa: E402
from shared.nanochat.config import GPTConfig  # noqa: E402
from shared.nanochat.eval.chat import categorical_accuracy  # noqa: E402
from shared.nanochat.eval.core import (  # noqa: E402
    CoreTask,
    load_bundle,
    load_task_data,
    render_prompts,
    score_item,
    token_spans,
)
from shared.nanochat.eval.fixtures import BUILTINS, KEYWORDS, write_fixture_bundle, write_fixture_chat_tasks  # noqa: E402
from shared.nanochat.eval.sandbox import SandboxLimits, run_program  # noqa: E402
from shared.nanochat.eval.tasks import load_chat_task  # noqa: E402
from shared.nanochat.gpt import GPT  # noqa: E402
from shared.nanochat.sft_data import demo_conversations, packed_batches  # noqa: E402
from shared.nanochat.tokenizer import train_tokenizer  # noqa: E402


def _time(fn, repeats: int) -> float:
    fn()  # warm-up
    t0 = time.perf_counter()
    for _ in range(repeats):
        fn()
    return (time.perf_counter() - t0) / repeats


@torch.no_grad()
def _mc_one_forward_per_choice(model, tok, data, task: CoreTask) -> None:
    for idx in range(len(data)):
        prompts = render_prompts(data[idx], task, [])
        toks, starts, ends = token_spans(tok, prompts, task.task_type)
        for t, s, e in zip(toks, starts, ends, strict=True):
            ids = torch.tensor([t], device=model.get_device())
            logits = model(ids)
            torch.nn.functional.cross_entropy(logits[0, s - 1 : e - 1], ids[0, s:e])


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--depth", type=int, default=2)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    torch.manual_seed(0)
    torch.set_num_threads(1) if args.device == "cpu" else None
    work = Path(tempfile.mkdtemp(prefix="bench-eval-"))
    texts = [f"The built-in function {n}() {w}." for n, w in BUILTINS] + [
        f"The keyword {k} {w}." for k, w in KEYWORDS
    ]
    tok = train_tokenizer(
        texts * 4 + ["Multiple Choice question: Respond only with the letter A B C D"], vocab_size=512
    )
    cfg = GPTConfig.from_depth(
        args.depth,
        vocab_size=tok.vocab_size,
        sequence_len=512,
        aspect_ratio=32,
        head_dim=64,
        window_pattern="L",
    )
    with torch.device("meta"):
        model = GPT(cfg)
    model.to_empty(device=torch.device(args.device))
    model.init_weights()
    model.eval()
    rows = []

    arc = load_chat_task(write_fixture_chat_tasks(work / "chat"), "ARC-Easy")
    batched = _time(lambda: categorical_accuracy(model, tok, arc, batch_size=8), args.repeats)
    single = _time(lambda: categorical_accuracy(model, tok, arc, batch_size=1), args.repeats)
    rows.append(("categorical eval, problems/s", len(arc) / batched, len(arc) / single, single / batched))

    bundle = write_fixture_bundle(work / "bundle")
    task = next(t for t in load_bundle(bundle) if t.label == "python_builtins_mc")
    task = CoreTask(task.label, task.task_type, task.dataset_uri, 0)  # 0-shot: same prompts as the baseline
    data = load_task_data(bundle / "eval_data" / task.dataset_uri, task.task_type)
    ours = _time(lambda: [score_item(model, tok, data, i, task) for i in range(len(data))], args.repeats)
    base = _time(lambda: _mc_one_forward_per_choice(model, tok, data, task), args.repeats)
    rows.append(("CORE multiple choice, items/s", len(data) / ours, len(data) / base, base / ours))

    convs = demo_conversations() * 4
    seq_len, batch, n_batches = 256, 8, 10
    it = packed_batches(tok, convs, batch, seq_len)
    packed = sum(int((next(it)[1] >= 0).sum()) for _ in range(n_batches)) / (n_batches * batch * seq_len)
    # baseline: one conversation per row, the rest padding
    naive = sum(sum(render_conversation(tok, c, max_tokens=seq_len + 1)[1][1:]) for c in convs) / (
        len(convs) * seq_len
    )
    rows.append(("SFT rows: share of trained tokens", packed, naive, packed / naive))

    program = "def add(a, b):\n    return a + b\n\ndef check(c):\n    assert c(2, 3) == 5\n\ncheck(add)\n"
    sandboxed = _time(lambda: run_program(program, SandboxLimits()), args.repeats)
    bare = _time(lambda: subprocess.run([sys.executable, "-c", program], check=True), args.repeats)
    rows.append(("sandbox run, seconds (lower is better)", sandboxed, bare, sandboxed / bare))

    print(f"device={args.device} depth={args.depth} params={sum(p.numel() for p in model.parameters()):,}")
    print(f"| {'measure':<40} | {'ours':>10} | {'baseline':>10} | {'ratio':>7} |")
    print(f"| {'-' * 40} | {'-' * 10} | {'-' * 10} | {'-' * 7} |")
    for name, a, b, r in rows:
        print(f"| {name:<40} | {a:>10.3f} | {b:>10.3f} | {r:>7.2f} |")


if __name__ == "__main__":
    main()
