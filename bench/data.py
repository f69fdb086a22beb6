"""Data-path benchmark: tokenizer training time and pretraining-loader throughput.

Run: .venv/bin/python bench/data.py [--vocab-size 32768] [--batches 40] [--seq-len 2048]
     .venv/bin/python bench/data.py --quick      (a smoke run: small corpus, vocab, rounds)

Everything is measured in this run on the offline demo corpus (text shipped with Python):
  * tokenizer training time, side by side on the same corpus and vocab, rounds interleaved:
    upstream nanochat's trainer (rustbpe, then its tiktoken Encoding), ours (rustbpe, then the
    conversion to a `tokenizers` tokenizer with the same ids), and the `tokenizers` BpeTrainer the
    platform used before, for reference; plus a check that ours gives tiktoken's ids;
  * PretrainLoader tokens/s (background thread + Rust batch encoder + bisect best-fit) against a
    single-threaded baseline measured side by side: per-document encode on the calling thread and
    the reference's linear best-fit scan over the buffer;
  * the ratio of the loader's rate to what training consumes: ~68,000 tokens/s for d24 on one
    MI300X (seed document), 8x that on 8 GPUs.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402
import torch  # noqa: E402

from shared.nanochat.corpus import iter_shard_texts, split_shards  # noqa: E402
from shared.nanochat.dataloader import LoaderConfig, PretrainLoader, document_stream  # noqa: E402
from shared.nanochat.demo_corpus import write_demo_corpus  # noqa: E402
from shared.nanochat.tokenizer import SPECIAL_TOKENS, SPLIT_PATTERN, capped_texts, train_tokenizer  # noqa: E402

NEED_1_GPU = 68_000  # tokens/s, d24 on one MI300X (seed document)


def baseline_batches(data_dir, tok, B, T, buffer_size=1000):
    """Single-threaded reference-style loader: encode one document at a time on this thread,
    linear scan for the largest fitting document, crop the shortest when none fits."""
    train, _ = split_shards(data_dir)
    cfg = LoaderConfig(batch_size=B, seq_len=T)

    def docs():
        while True:
            for _, text in document_stream(train, cfg, (1, 0, 0, 0), loop=False):
                yield tok.encode(text, prepend=tok.bos_token_id)

    stream = docs()
    buf: list[list[int]] = []
    while True:
        rows = np.empty((B, T + 1), dtype=np.int64)
        for b in range(B):
            pos = 0
            while pos < T + 1:
                while len(buf) < buffer_size:
                    buf.append(next(stream))
                remaining = T + 1 - pos
                best, best_len = -1, 0
                for i, d in enumerate(buf):
                    if best_len < len(d) <= remaining:
                        best, best_len = i, len(d)
                if best >= 0:
                    d = buf.pop(best)
                    rows[b, pos : pos + len(d)] = d
                    pos += len(d)
                else:
                    i = min(range(len(buf)), key=lambda k: len(buf[k]))
                    rows[b, pos:] = buf.pop(i)[:remaining]
                    pos = T + 1
        t = torch.from_numpy(rows)
        yield t[:, :-1].contiguous(), t[:, 1:].contiguous()


def upstream_train(texts, vocab_size):
    """nanochat's tok_train.py: documents capped at 10,000 chars, RustBPETokenizer.train_from_iterator
    (rustbpe, then a tiktoken Encoding)."""
    import rustbpe
    import tiktoken

    trainer = rustbpe.Tokenizer()
    trainer.train_from_iterator(capped_texts(texts), vocab_size - len(SPECIAL_TOKENS), pattern=SPLIT_PATTERN)
    ranks = {bytes(k): v for k, v in trainer.get_mergeable_ranks()}
    specials = {name: len(ranks) + i for i, name in enumerate(SPECIAL_TOKENS)}
    return tiktoken.Encoding(name="rustbpe", pat_str=trainer.get_pattern(), mergeable_ranks=ranks,
                             special_tokens=specials)  # fmt: skip


def tokenizers_train(texts, vocab_size):
    """The trainer the platform used before: `tokenizers`' BpeTrainer on the same pipeline."""
    from tokenizers import Regex, decoders, models, pre_tokenizers, trainers
    from tokenizers import Tokenizer as HFTokenizer

    tok = HFTokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Split(Regex(SPLIT_PATTERN), behavior="isolated", invert=False),
         pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)]
    )  # fmt: skip
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size - len(SPECIAL_TOKENS), min_frequency=0, show_progress=False,
                                  special_tokens=[], initial_alphabet=pre_tokenizers.ByteLevel.alphabet())  # fmt: skip
    tok.train_from_iterator(capped_texts(texts), trainer=trainer)
    return tok


def tokenizer_table(texts, vocab_sizes, rounds: int) -> None:
    chars = sum(map(len, texts))
    trainers = {
        "upstream: rustbpe + tiktoken Encoding": upstream_train,
        "ours: rustbpe + conversion (train_tokenizer)": train_tokenizer,
        "before: tokenizers BpeTrainer": tokenizers_train,
    }
    print(f"| tokenizer training, {len(texts)} docs, {chars / 1e6:.2f}M chars, median of {rounds} | vocab "
          "| seconds | chars/s | vs upstream |")  # fmt: skip
    print("| --- | --- | --- | --- | --- |")
    for vocab in vocab_sizes:
        times: dict[str, list[float]] = {name: [] for name in trainers}
        for _ in range(rounds):  # interleaved: the machine's load spreads over all of them
            for name, fn in trainers.items():
                t0 = time.perf_counter()
                fn(texts, vocab)
                times[name].append(time.perf_counter() - t0)
        base = statistics.median(times[next(iter(trainers))])
        for name, ts in times.items():
            s = statistics.median(ts)
            print(f"| {name} | {vocab} | {s:.2f} | {chars / s:,.0f} | {base / s:.2f}x |")
        enc, ours = upstream_train(texts, vocab), train_tokenizer(texts, vocab)
        sample = texts[:: max(1, len(texts) // 200)]
        same = ours.encode(sample) == enc.encode_ordinary_batch(sample)
        print(
            f"| ids of ours == tiktoken's on {len(sample)} docs | {vocab} | {'yes' if same else 'NO'} | | |"
        )


def timed(batches, n, step_s=0.0) -> float:
    """Seconds for n batches; `step_s` of GIL-free waiting per batch stands in for the GPU step
    (a CUDA training step mostly waits on the device), which a background loader overlaps."""
    t0 = time.perf_counter()
    for _ in range(n):
        next(batches)
        if step_s:
            time.sleep(step_s)
    return time.perf_counter() - t0


def compare(make_a, make_b, n, rounds, step_s) -> tuple[list[float], list[float]]:
    """Alternate A and B for `rounds` rounds (the machine is shared: interleaving spreads its load
    over both). Each round uses a fresh loader, measured alone, from its second batch on (the first
    fills the 1000-document buffer)."""
    ta, tb = [], []
    for _ in range(rounds):
        for make, out in ((make_a, ta), (make_b, tb)):
            batches, close = make()
            next(batches)
            out.append(timed(batches, n, step_s))
            close()
    return ta, tb


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--vocab-size", type=int, default=32768)
    ap.add_argument("--batches", type=int, default=60)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--seq-len", type=int, default=2048)
    ap.add_argument("--corpus-bytes", type=int, default=4_000_000)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--step-ms", type=float, default=50.0, help="simulated training step per batch")
    ap.add_argument("--tokenizer-rounds", type=int, default=5)
    ap.add_argument("--quick", action="store_true", help="smoke run: small corpus, vocab and rounds")
    args = ap.parse_args()
    if args.quick:
        args.vocab_size, args.batches, args.rounds, args.tokenizer_rounds = 2048, 4, 1, 1
        args.corpus_bytes, args.seq_len, args.step_ms = 300_000, 256, 5.0
    torch.set_num_threads(1)
    B, T = args.batch_size, args.seq_len
    with tempfile.TemporaryDirectory() as tmp:
        data = Path(tmp) / "demo"
        t0 = time.perf_counter()
        rep = write_demo_corpus(data, max_bytes=args.corpus_bytes)
        corpus_s = time.perf_counter() - t0
        train, _ = split_shards(data)
        texts = list(iter_shard_texts(train))
        print(
            f"corpus: {rep.docs} docs, {rep.bytes / 1e6:.2f} MB, written in {corpus_s:.2f}s; cores: {os.cpu_count()}"
        )
        print()
        tokenizer_table(texts, sorted({512, args.vocab_size}), args.tokenizer_rounds)
        tok = train_tokenizer(texts, vocab_size=args.vocab_size)
        print()
        need = {"1x MI300X": NEED_1_GPU, "8x MI300X (one process)": 8 * NEED_1_GPU}
        print(
            f"| loader, B={B} T={T}, {args.rounds}x{args.batches} batches | simulated step ms "
            "| tokens/s (median) | vs baseline | "
            + " | ".join(f"vs {k} need ({v:,})" for k, v in need.items())
            + " |"
        )
        print("| --- | --- | --- | --- | --- | --- |")

        def make_base():
            return baseline_batches(data, tok, B, T), lambda: None

        def make_fast():
            loader = PretrainLoader(data, tok, B, T)
            return ((x, y) for x, y, _ in loader), loader.close

        for step_ms in (0, args.step_ms):
            ta, tb = compare(
                make_base,
                make_fast,
                args.batches,
                args.rounds,
                step_ms / 1000,
            )
            rates = {
                "baseline: 1 thread, per-doc encode, linear best-fit": args.batches
                * B
                * T
                / statistics.median(ta),
                "PretrainLoader: background thread + batch encode": args.batches
                * B
                * T
                / statistics.median(tb),
            }
            base = next(iter(rates.values()))
            for name, r in rates.items():
                cells = " | ".join(f"{r / v:.2f}x" for v in need.values())
                print(f"| {name} | {step_ms} | {r:,.0f} | {r / base:.2f}x | {cells} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
