"""BOS-aligned, best-fit packed pretraining batches; DDP-sharded by row group; exactly resumable.

Each row of a (B, T+1) batch is a sequence of whole documents, each starting with `<|bos|>`,
chosen from a buffer of ~1000 tokenized documents: repeatedly the largest document that still
fits; when none fits, the shortest one is cropped to fill the row exactly. No padding. Inputs are
row[:-1], targets row[1:].

Rank r reads row groups r, r+W, r+2W, ... of every shard (train: all shards but the last, looping
over epochs; val: the last shard, one pass). Parquet reading and tokenization (the Rust batch
encoder, which drops the GIL) run in a background thread, ahead of the packer.

Exact resume: the state names the next unread document (epoch, shard, row group, row) and the
positions of the documents still in the buffer. Restoring re-reads and re-tokenizes exactly those,
so a resumed loader yields the same batches an uninterrupted one would have. The buffer is refilled
one document at a time to exactly `buffer_size` before every pick, which keeps the packing a pure
function of the document stream (independent of how the producer chunks its work).
"""

from __future__ import annotations

import bisect
import logging
import queue
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import torch

from shared.nanochat.corpus import open_shard, split_shards

log = logging.getLogger(__name__)
STATE_VERSION = 1
_END = object()  # producer sentinel: the stream is exhausted


@dataclass(frozen=True)
class LoaderConfig:
    batch_size: int
    seq_len: int
    split: str = "train"
    rank: int = 0
    world_size: int = 1
    buffer_size: int = 1000
    tokenizer_batch_size: int = 128
    prefetch_chunks: int = 8
    text_column: str = "text"

    def __post_init__(self):
        for name in (
            "batch_size",
            "seq_len",
            "world_size",
            "buffer_size",
            "tokenizer_batch_size",
            "prefetch_chunks",
        ):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.split not in ("train", "val"):
            raise ValueError(f"split must be 'train' or 'val', got {self.split!r}")
        if not 0 <= self.rank < self.world_size:
            raise ValueError(f"rank must be in [0, world_size={self.world_size}), got {self.rank}")


# A document position: (epoch, shard index, row group index, row index within the row group).
Pos = tuple[int, int, int, int]


def document_stream(
    shards: list[Path], cfg: LoaderConfig, start: Pos, *, loop: bool
) -> Iterator[tuple[Pos, str]]:
    """(position, text) of this rank's documents from `start` on; null rows are skipped."""
    epoch, pq_idx, rg_idx, row = start
    while True:
        found = False
        for p in range(pq_idx, len(shards)):
            pf = open_shard(shards[p], cfg.text_column)
            first = rg_idx if p == pq_idx else cfg.rank
            for rg in range(first, pf.num_row_groups, cfg.world_size):
                texts = pf.read_row_group(rg, columns=[cfg.text_column]).column(0).to_pylist()
                r0 = row if (p == pq_idx and rg == rg_idx) else 0
                for r in range(r0, len(texts)):
                    if texts[r] is not None:
                        found = True
                        yield (epoch, p, rg, r), texts[r]
        from_start = (pq_idx, rg_idx, row) == (0, cfg.rank, 0)
        if not found and from_start:
            raise ValueError(
                f"rank {cfg.rank} of {cfg.world_size} gets no documents from split {cfg.split!r} "
                f"({len(shards)} shard(s)); use fewer ranks or shards with more row groups"
            )
        if not loop:
            return
        epoch, pq_idx, rg_idx, row = epoch + 1, 0, cfg.rank, 0


def _tokenize(tok, bos: int, texts: list[str]) -> list[np.ndarray]:
    return [np.asarray(ids, dtype=np.int64) for ids in tok.encode(texts, prepend=bos)]


def tokenized_chunks(
    shards: list[Path], cfg: LoaderConfig, tok, start: Pos
) -> Iterator[list[tuple[Pos, np.ndarray]]]:
    """Lists of (position, BOS + token ids) of up to `tokenizer_batch_size` documents, in stream order."""
    stream = document_stream(shards, cfg, start, loop=cfg.split == "train")
    batch: list[tuple[Pos, str]] = []
    for item in stream:
        batch.append(item)
        if len(batch) == cfg.tokenizer_batch_size:
            yield list(
                zip(
                    [p for p, _ in batch],
                    _tokenize(tok, tok.bos_token_id, [t for _, t in batch]),
                    strict=True,
                )
            )
            batch = []
    if batch:
        yield list(
            zip([p for p, _ in batch], _tokenize(tok, tok.bos_token_id, [t for _, t in batch]), strict=True)
        )


def _producer(chunks: Iterator, out: queue.Queue, stop: threading.Event) -> None:
    """Background thread body. It holds no reference to the loader, so an abandoned loader is
    collected, its __del__ sets `stop`, and this thread ends."""
    try:
        for chunk in chunks:
            while not stop.is_set():
                try:
                    out.put(chunk, timeout=0.1)
                    break
                except queue.Full:
                    continue
            if stop.is_set():
                return
        out.put(_END)
    except BaseException as e:  # surfaced in the consumer, with its traceback
        out.put(e)


def _runs(positions: list[Pos]) -> list[list[int]]:
    """Run-length encode positions in order: [epoch, shard, row_group, first_row, end_row)."""
    out: list[list[int]] = []
    for e, p, g, r in positions:
        if out and out[-1][:3] == [e, p, g] and out[-1][4] == r:
            out[-1][4] = r + 1
        else:
            out.append([e, p, g, r, r + 1])
    return out


class PretrainLoader:
    """Iterator of (inputs (B,T) int64, targets (B,T) int64, state dict) on `device`."""

    def __init__(
        self,
        data_dir,
        tokenizer,
        batch_size: int,
        seq_len: int,
        *,
        split: str = "train",
        rank: int = 0,
        world_size: int = 1,
        device="cpu",
        resume_state: dict | list[dict] | None = None,
        buffer_size: int = 1000,
        tokenizer_batch_size: int = 128,
        text_column: str = "text",
        background: bool = True,
    ):
        self.cfg = LoaderConfig(
            batch_size=batch_size,
            seq_len=seq_len,
            split=split,
            rank=rank,
            world_size=world_size,
            buffer_size=buffer_size,
            tokenizer_batch_size=tokenizer_batch_size,
            text_column=text_column,
        )
        train, val = split_shards(Path(data_dir))
        self.shards = train if split == "train" else val
        self.tok = tokenizer
        self.bos = tokenizer.bos_token_id
        self.device = torch.device(device)
        self.background = background
        # Buffer: sorted keys (length, seq) for best-fit lookups; seq -> (position, tokens).
        self._keys: list[tuple[int, int]] = []
        self._docs: dict[int, tuple[Pos, np.ndarray]] = {}
        self._seq = 0
        self._cursor: Pos = (1, 0, rank, 0)
        self._batches = 0
        self._exhausted = False
        self.stats = {"docs": 0, "doc_tokens": 0, "tokens_placed": 0, "tokens_cropped": 0, "crops": 0}
        self._pending: list[tuple[Pos, np.ndarray]] = []
        self._pending_i = 0
        if resume_state is not None:
            self._restore(resume_state)
        self._stop = threading.Event()
        self._queue: queue.Queue = queue.Queue(maxsize=self.cfg.prefetch_chunks)
        self._chunks = tokenized_chunks(self.shards, self.cfg, tokenizer, self._cursor)
        self._thread = None
        if background:
            self._thread = threading.Thread(
                target=_producer,
                args=(self._chunks, self._queue, self._stop),
                name="pretrain-loader",
                daemon=True,
            )
            self._thread.start()
        self._pinned: list[torch.Tensor] = []
        self._events: list = []

    # ---- producing tokenized documents -------------------------------------------------------
    def _tokenize(self, texts: list[str]) -> list[np.ndarray]:
        return _tokenize(self.tok, self.bos, texts)

    def _next_chunk(self):
        if not self.background:
            return next(self._chunks, _END)
        item = self._queue.get()
        if isinstance(item, BaseException):
            raise item
        return item

    def _next_doc(self) -> tuple[Pos, np.ndarray] | None:
        while self._pending_i >= len(self._pending):
            if self._exhausted:
                return None
            chunk = self._next_chunk()
            if chunk is _END:
                self._exhausted = True
                return None
            self._pending, self._pending_i = chunk, 0
        doc = self._pending[self._pending_i]
        self._pending_i += 1
        return doc

    # ---- the buffer --------------------------------------------------------------------------
    def _add(self, pos: Pos, tokens: np.ndarray) -> None:
        bisect.insort(self._keys, (len(tokens), self._seq))
        self._docs[self._seq] = (pos, tokens)
        self._seq += 1

    def _fill(self) -> None:
        while len(self._keys) < self.cfg.buffer_size:
            doc = self._next_doc()
            if doc is None:
                return
            self._add(*doc)
            e, p, g, r = doc[0]
            self._cursor = (e, p, g, r + 1)

    def _take(self, key_index: int) -> np.ndarray:
        _, seq = self._keys.pop(key_index)
        doc = self._docs.pop(seq)[1]
        self.stats["docs"] += 1
        self.stats["doc_tokens"] += len(doc)
        return doc

    def _pack_row(self, row: np.ndarray) -> bool:
        """Fill one row of T+1 tokens; False if the (val) stream ran dry first."""
        cap = row.shape[0]
        pos = 0
        while pos < cap:
            self._fill()
            if not self._keys:
                return False
            remaining = cap - pos
            i = bisect.bisect_right(self._keys, (remaining, float("inf"))) - 1
            if i >= 0:
                # Largest fitting length; among equals, the oldest document (smallest seq).
                i = bisect.bisect_left(self._keys, (self._keys[i][0], -1))
                doc = self._take(i)
                row[pos : pos + len(doc)] = doc
                pos += len(doc)
                self.stats["tokens_placed"] += len(doc)
            else:
                doc = self._take(0)  # nothing fits: crop the shortest (oldest among equals)
                row[pos:] = doc[:remaining]
                self.stats["tokens_placed"] += remaining
                self.stats["tokens_cropped"] += len(doc) - remaining
                self.stats["crops"] += 1
                pos = cap
        return True

    # ---- iteration ---------------------------------------------------------------------------
    def __iter__(self):
        return self

    def __next__(self) -> tuple[torch.Tensor, torch.Tensor, dict]:
        B, T = self.cfg.batch_size, self.cfg.seq_len
        rows = np.empty((B, T + 1), dtype=np.int64)
        for b in range(B):
            if not self._pack_row(rows[b]):
                self.close()
                raise StopIteration  # val: one pass, the last partial batch is dropped
        self._batches += 1
        inputs, targets = self._to_device(rows)
        return inputs, targets, self.state_dict()

    def _to_device(self, rows: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
        """(inputs, targets), each contiguous, from one (2, B, T) block: a single host->device copy."""
        host = torch.from_numpy(rows)
        B, T = self.cfg.batch_size, self.cfg.seq_len
        if self.device.type != "cuda":
            block = torch.empty((2, B, T), dtype=torch.int64)
            block[0].copy_(host[:, :-1])
            block[1].copy_(host[:, 1:])
            block = block if self.device.type == "cpu" else block.to(self.device)
            return block[0], block[1]
        # Two pinned staging buffers used in turn; an event guards reuse until the async copy is done.
        slot = self._batches % 2
        if not self._pinned:
            self._pinned = [torch.empty((2, B, T), dtype=torch.int64, pin_memory=True) for _ in range(2)]
            self._events = [None, None]
        if self._events[slot] is not None:
            self._events[slot].synchronize()
        self._pinned[slot][0].copy_(host[:, :-1])
        self._pinned[slot][1].copy_(host[:, 1:])
        block = self._pinned[slot].to(self.device, non_blocking=True)
        event = torch.cuda.Event()
        event.record()
        self._events[slot] = event
        return block[0], block[1]

    # ---- state -------------------------------------------------------------------------------
    def state_dict(self) -> dict:
        epoch, pq_idx, rg_idx, row = self._cursor
        buffered = [self._docs[seq][0] for seq in sorted(self._docs)]
        return {
            "version": STATE_VERSION,
            "split": self.cfg.split,
            "rank": self.cfg.rank,
            "world_size": self.cfg.world_size,
            "buffer_size": self.cfg.buffer_size,
            # Reference-compatible keys (approximate resume uses these alone).
            "pq_idx": pq_idx,
            "rg_idx": rg_idx,
            "epoch": epoch,
            "row": row,
            "buffer": _runs(buffered),
            "batches": self._batches,
        }

    def _restore(self, state: dict | list[dict]) -> None:
        if isinstance(state, list):  # one state per rank, e.g. all-gathered by the trainer
            if len(state) != self.cfg.world_size:
                raise ValueError(
                    f"resume_state has {len(state)} rank states, world_size is {self.cfg.world_size}"
                )
            state = state[self.cfg.rank]
        exact = (
            state.get("version") == STATE_VERSION
            and state.get("world_size") == self.cfg.world_size
            and state.get("rank") == self.cfg.rank
            and state.get("buffer_size") == self.cfg.buffer_size
            and state.get("split", self.cfg.split) == self.cfg.split
        )
        if not exact:
            self._restore_approx(state)
            return
        self._cursor = (int(state["epoch"]), int(state["pq_idx"]), int(state["rg_idx"]), int(state["row"]))
        self._batches = int(state.get("batches", 0))
        groups: dict[tuple[int, int], list] = {}  # a row group is read once, however many runs it has
        for e, p, g, r0, r1 in state["buffer"]:
            if not 0 <= p < len(self.shards):
                raise ValueError(f"resume_state buffer names shard {p}; split has {len(self.shards)} shards")
            if (p, g) not in groups:
                pf = open_shard(self.shards[p], self.cfg.text_column)
                groups[(p, g)] = pf.read_row_group(g, columns=[self.cfg.text_column]).column(0).to_pylist()
            for k, tokens in enumerate(self._tokenize(groups[(p, g)][r0:r1])):
                self._add((e, p, g, r0 + k), tokens)

    def _restore_approx(self, state: dict) -> None:
        """State from another world size / the reference: continue at this rank's first row group
        after the saved one, with an empty buffer (a few documents may repeat or be skipped)."""
        if not {"pq_idx", "rg_idx"} <= state.keys():
            raise ValueError("resume_state needs at least 'pq_idx' and 'rg_idx'")
        log.warning(
            "resume_state is not exact for rank %d/%d; resuming at the next row group",
            self.cfg.rank,
            self.cfg.world_size,
        )
        epoch, p, g = int(state.get("epoch", 1)), int(state["pq_idx"]), int(state["rg_idx"])
        W, r = self.cfg.world_size, self.cfg.rank
        g = (g // W + 1) * W + r
        if p >= len(self.shards):
            p, g = len(self.shards) - 1, 1 << 30
        n_rg = pq.ParquetFile(self.shards[p]).num_row_groups
        if g >= n_rg:  # past this shard: the stream moves on to the next shard by itself
            g = n_rg + r
        self._cursor = (epoch, p, g, 0)

    def close(self, timeout: float = 60.0) -> None:
        """Stop the producer thread and wait for it. A daemon thread still inside pyarrow or the
        tokenizer when the interpreter exits can abort the whole process (std::terminate in their
        native thread pools; seen as SIGABRT of a rank that stopped early), so close() joins it.
        The producer finishes the chunk it is on; draining the queue unblocks a pending put."""
        self._stop.set()
        t = self._thread
        if t is None or t is threading.current_thread():
            return
        deadline = time.monotonic() + timeout
        while t.is_alive() and time.monotonic() < deadline:
            try:
                self._queue.get_nowait()
            except queue.Empty:
                pass
            t.join(timeout=0.05)

    def __del__(self):
        stop = getattr(self, "_stop", None)
        if stop is not None:
            stop.set()
