from __future__ import annotations

import itertools

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from shared.nanochat.corpus import split_shards
from shared.nanochat.dataloader import LoaderConfig, PretrainLoader, document_stream

torch.set_num_threads(1)
B, T = 3, 64


def _docs_of(tok, data_dir, split="train"):
    """Every tokenized document (BOS-prepended) of a split, as tuples."""
    train, val = split_shards(data_dir)
    cfg = LoaderConfig(batch_size=1, seq_len=1, split=split)
    texts = [t for _, t in document_stream(train if split == "train" else val, cfg, (1, 0, 0, 0), loop=False)]
    return [tuple(ids) for ids in tok.encode(texts, prepend=tok.bos_token_id)]


def _segments(row, bos):
    starts = [i for i, t in enumerate(row) if t == bos] + [len(row)]
    return [tuple(row[a:b]) for a, b in itertools.pairwise(starts)]


def test_packing_invariants(tok, demo_dir):
    docs = set(_docs_of(tok, demo_dir))
    loader = PretrainLoader(demo_dir, tok, B, T, buffer_size=50)
    n_batches = 12
    for _ in range(n_batches):
        x, y, state = next(loader)
        assert x.shape == y.shape == (B, T) and x.dtype == y.dtype == torch.int64
        assert x.is_contiguous() and y.is_contiguous()
        assert torch.equal(x[:, 1:], y[:, :-1])
        assert (x[:, 0] == tok.bos_token_id).all()  # every row starts with BOS
        for b in range(B):
            row = x[b].tolist() + [y[b, -1].item()]
            segs = _segments(row, tok.bos_token_id)
            # Whole documents, except possibly the last one of the row, which is a cropped prefix.
            assert all(s in docs for s in segs[:-1])
            assert segs[-1] in docs or any(d[: len(segs[-1])] == segs[-1] for d in docs)
    s = loader.stats
    assert s["tokens_placed"] == n_batches * B * (T + 1)  # no padding
    assert s["doc_tokens"] == s["tokens_placed"] + s["tokens_cropped"]  # crop accounting
    assert s["crops"] <= n_batches * B
    loader.close()


def test_resume_equivalence(tok, demo_dir):
    ref = PretrainLoader(demo_dir, tok, B, T, buffer_size=40, tokenizer_batch_size=7)
    out = [next(ref) for _ in range(25)]
    ref.close()
    for k in (0, 4, 13):
        state = out[k][2]
        assert state["buffer"]  # the buffer's documents are part of the state
        resumed = PretrainLoader(
            demo_dir, tok, B, T, buffer_size=40, tokenizer_batch_size=5, resume_state=state
        )
        for j in range(k + 1, 25):
            x, y, st = next(resumed)
            assert torch.equal(x, out[j][0]) and torch.equal(y, out[j][1]), (k, j)
            assert st == out[j][2]
        resumed.close()


def test_resume_across_epochs_and_foreground(tok, tmp_path):
    d = tmp_path / "tiny"
    d.mkdir()
    for i in range(3):
        texts = [f"document {i}-{j} " + "word " * (j % 17) for j in range(40)]
        pq.write_table(pa.table({"text": texts}), d / f"shard_{i:05d}.parquet", row_group_size=10)
    bg = PretrainLoader(d, tok, 2, 32, buffer_size=16)
    fg = PretrainLoader(d, tok, 2, 32, buffer_size=16, background=False)
    batches = []
    for _ in range(60):
        a, b = next(bg), next(fg)
        assert torch.equal(a[0], b[0]) and a[2] == b[2]
        batches.append(a)
    assert batches[-1][2]["epoch"] >= 3  # train loops over epochs
    mid = next(i for i, b in enumerate(batches) if b[2]["epoch"] == 2)
    resumed = PretrainLoader(d, tok, 2, 32, buffer_size=16, resume_state=batches[mid][2])
    for j in range(mid + 1, 60):
        assert torch.equal(next(resumed)[0], batches[j][0])
    for ld in (bg, fg, resumed):
        ld.close()


def test_ddp_sharding_is_disjoint_and_complete(demo_dir):
    train, _ = split_shards(demo_dir)
    world = 3
    seen = []
    for rank in range(world):
        cfg = LoaderConfig(batch_size=1, seq_len=1, rank=rank, world_size=world)
        pos = [p for p, _ in document_stream(train, cfg, (1, 0, rank, 0), loop=False)]
        assert all(g % world == rank for _, _, g, _ in pos)
        seen.append(set(pos))
    assert not (seen[0] & seen[1]) and not (seen[0] & seen[2]) and not (seen[1] & seen[2])
    everything = LoaderConfig(batch_size=1, seq_len=1)
    assert set().union(*seen) == {p for p, _ in document_stream(train, everything, (1, 0, 0, 0), loop=False)}


def test_ddp_loaders_use_only_their_row_groups(tok, demo_dir):
    docs_by_rank = []
    for rank in range(2):
        ld = PretrainLoader(demo_dir, tok, B, T, rank=rank, world_size=2, buffer_size=30)
        for _ in range(5):
            _, _, state = next(ld)
            assert all(g % 2 == rank for _, _, g, _, _ in state["buffer"])
            assert state["rg_idx"] % 2 == rank
        ld.close()
        docs_by_rank.append(ld.stats["docs"])
    assert all(n > 0 for n in docs_by_rank)


def test_val_is_one_pass(tok, demo_dir):
    val_tokens = sum(len(d) for d in _docs_of(tok, demo_dir, "val"))
    loader = PretrainLoader(demo_dir, tok, 2, 32, split="val", buffer_size=20)
    n = sum(1 for _ in loader)
    assert n >= 1
    assert n * 2 * 33 <= val_tokens  # cannot produce more tokens than the shard holds
    with pytest.raises(StopIteration):
        next(loader)


def test_approximate_resume_from_reference_state(tok, demo_dir):
    ld = PretrainLoader(
        demo_dir, tok, B, T, buffer_size=10, resume_state={"pq_idx": 0, "rg_idx": 0, "epoch": 1}
    )
    _, _, state = next(ld)
    # Continues after row group 0 of shard 0 (skipping the rest of it), like the reference.
    assert state["epoch"] == 1 and (state["pq_idx"], state["rg_idx"]) > (0, 0)
    assert all((p, g) != (0, 0) for _, p, g, _, _ in state["buffer"])
    ld.close()
    # A list of per-rank states (all-gathered by the trainer) picks this rank's entry.
    states = []
    for r in range(2):
        ld = PretrainLoader(demo_dir, tok, B, T, rank=r, world_size=2, buffer_size=10)
        x0 = [next(ld) for _ in range(3)]
        states.append(x0[1][2])
        ld.close()
    again = PretrainLoader(demo_dir, tok, B, T, rank=1, world_size=2, buffer_size=10, resume_state=states)
    assert torch.equal(next(again)[0], x0[2][0])
    again.close()


def test_bad_arguments(tok, demo_dir, tmp_path):
    with pytest.raises(ValueError, match="rank"):
        PretrainLoader(demo_dir, tok, B, T, rank=2, world_size=2)
    with pytest.raises(ValueError, match="seq_len"):
        PretrainLoader(demo_dir, tok, B, 0)
    with pytest.raises(ValueError, match="split"):
        PretrainLoader(demo_dir, tok, B, T, split="test")
    with pytest.raises(ValueError, match="rank 63 of 64 gets no documents"):
        next(PretrainLoader(demo_dir, tok, B, T, rank=63, world_size=64, background=False))
    with pytest.raises(FileNotFoundError):
        PretrainLoader(tmp_path / "missing", tok, B, T)
    (tmp_path / "one").mkdir()
    pq.write_table(pa.table({"text": ["x"]}), tmp_path / "one" / "shard_00000.parquet")
    with pytest.raises(ValueError, match="need at least 2"):
        PretrainLoader(tmp_path / "one", tok, B, T)


def test_producer_errors_surface(tok, tmp_path):
    d = tmp_path / "c"
    d.mkdir()
    pq.write_table(pa.table({"body": ["x"] * 4}), d / "shard_00000.parquet")
    pq.write_table(pa.table({"body": ["y"] * 4}), d / "shard_00001.parquet")
    with pytest.raises(ValueError, match="no column 'text'"):
        next(PretrainLoader(d, tok, 1, 8))


def test_abandoned_loader_stops_its_thread(tok, demo_dir):
    import gc

    loader = PretrainLoader(demo_dir, tok, B, T, buffer_size=20)
    next(loader)
    thread = loader._thread
    assert thread.is_alive()
    del loader
    gc.collect()
    thread.join(timeout=5)
    assert not thread.is_alive()
    closed = PretrainLoader(demo_dir, tok, B, T, buffer_size=20)
    next(closed)
    closed.close()
    closed._thread.join(timeout=5)
    assert not closed._thread.is_alive()
