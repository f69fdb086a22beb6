"""Pretraining corpora on disk: parquet shards `shard_{i:05d}.parquet` with a text column.

The layout is the reference's (ClimbMix / FineWeb-EDU): shards sort by index, the *last* one is the
held-out validation shard, each shard has several row groups (the unit of DDP sharding). This
module lists and validates such a folder and builds one from local sources (parquet with any text
column, JSONL, plain text files, directories and globs).

A folder is complete only when its `.complete` marker exists (written last); re-running an import
with the same sources reuses it, and a half-written folder is recognised and rebuilt.
"""

from __future__ import annotations

import glob
import hashlib
import json
import os
import re
from collections.abc import Iterable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from shared.nanochat.jsonl import iter_jsonl

SHARD_RE = re.compile(r"^shard_(\d{5})\.parquet$")
COMPLETE_MARKER = ".complete"
INCOMPLETE_MARKER = ".incomplete"
TEXT_SUFFIXES = {".txt", ".md", ".text", ".rst"}
JSONL_SUFFIXES = {".jsonl", ".ndjson", ".json"}


def shard_name(index: int) -> str:
    return f"shard_{index:05d}.parquet"


@dataclass
class CorpusReport:
    """What is in a shard folder; JSON-able through to_dict()."""

    data_dir: str
    num_shards: int = 0
    train_shards: int = 0
    val_shards: int = 0
    row_groups: int = 0
    min_row_groups: int = 0  # fewest row groups in one shard: bounds the useful DDP world size
    docs: int = 0  # usable documents (non-empty valid UTF-8 text)
    bytes: int = 0  # UTF-8 bytes of the usable documents
    val_docs: int = 0
    empty_rows: int = 0
    invalid_rows: int = 0  # null or non-text values
    non_utf8_rows: int = 0
    shards_checked: int = 0
    extra: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> CorpusReport:
        return cls(**{k: v for k, v in d.items() if k in cls.__dataclass_fields__})


# ---- listing -----------------------------------------------------------------------------------
def list_shards(data_dir: Path) -> list[Path]:
    """Shard files sorted by index; temp/partial files never match. The last one is validation."""
    data_dir = Path(data_dir)
    if not data_dir.is_dir():
        raise FileNotFoundError(f"corpus directory {data_dir} does not exist")
    shards = [p for p in data_dir.iterdir() if SHARD_RE.match(p.name) and p.is_file()]
    return sorted(shards, key=lambda p: p.name)  # fixed-width indices: name order is index order


def split_shards(data_dir: Path) -> tuple[list[Path], list[Path]]:
    """(train, val): every shard but the last, and the last."""
    shards = list_shards(data_dir)
    if len(shards) < 2:
        raise ValueError(
            f"corpus {data_dir} has {len(shards)} shard(s); need at least 2 (train + the last as validation)"
        )
    return shards[:-1], shards[-1:]


def open_shard(path: Path, text_column: str = "text") -> pq.ParquetFile:
    """ParquetFile with the text column checked; errors name the file and the column."""
    try:
        pf = pq.ParquetFile(path)
    except (pa.ArrowException, OSError) as e:
        raise ValueError(f"{path}: not a readable parquet file ({e})") from e
    names = pf.schema_arrow.names
    if text_column not in names:
        raise ValueError(f"{path}: no column {text_column!r} (columns: {names}); set text_column")
    return pf


def iter_shard_texts(shards: Iterable[Path], text_column: str = "text") -> Iterator[str]:
    """Every non-null text of `shards`, row group by row group (tokenizer training input)."""
    for path in shards:
        pf = open_shard(path, text_column)
        for rg in range(pf.num_row_groups):
            for text in pf.read_row_group(rg, columns=[text_column]).column(0).to_pylist():
                if isinstance(text, str):
                    yield text


# ---- validation --------------------------------------------------------------------------------
def _count_rows(col: pa.ChunkedArray, report: CorpusReport, is_val: bool, path: Path) -> None:
    if not (
        pa.types.is_string(col.type)
        or pa.types.is_large_string(col.type)
        or pa.types.is_binary(col.type)
        or pa.types.is_large_binary(col.type)
    ):
        raise ValueError(f"{path}: text column has type {col.type}, expected string")
    raw = col.cast(pa.large_binary())  # zero-copy view of the bytes, valid UTF-8 or not
    for value in raw.to_pylist():
        if value is None:
            report.invalid_rows += 1
            continue
        try:
            text = value.decode("utf-8")
        except UnicodeDecodeError:
            report.non_utf8_rows += 1
            continue
        if not text.strip():
            report.empty_rows += 1
            continue
        report.docs += 1
        report.bytes += len(value)
        report.val_docs += int(is_val)


def validate_corpus(
    data_dir: Path, text_column: str = "text", sample_shards: int | None = None
) -> CorpusReport:
    """Read the shards and count usable text; ValueError when there is none or a shard is broken.

    `sample_shards=N` reads the text of only the first N-1 train shards and the validation shard
    (metadata of every shard is still checked): for huge downloaded corpora.
    """
    data_dir = Path(data_dir)
    shards = list_shards(data_dir)
    if not shards:
        raise ValueError(f"corpus {data_dir} has no shard_XXXXX.parquet files: empty corpus")
    report = CorpusReport(data_dir=str(data_dir), num_shards=len(shards))
    report.train_shards, report.val_shards = max(len(shards) - 1, 0), min(len(shards), 1)
    read = set(range(len(shards)))
    if sample_shards is not None and sample_shards < len(shards):
        read = set(range(max(sample_shards - 1, 0))) | {len(shards) - 1}
    rg_counts = []
    for i, path in enumerate(shards):
        pf = open_shard(path, text_column)
        rg_counts.append(pf.num_row_groups)
        if i not in read:
            continue
        report.shards_checked += 1
        try:
            table = pf.read(columns=[text_column])
        except (pa.ArrowException, OSError) as e:
            raise ValueError(f"{path}: corrupt parquet data ({e})") from e
        _count_rows(table.column(0), report, is_val=(i == len(shards) - 1), path=path)
    report.row_groups = sum(rg_counts)
    report.min_row_groups = min(rg_counts)
    if report.docs == 0:
        raise ValueError(
            f"corpus {data_dir} has no usable text in column {text_column!r}: "
            f"{report.empty_rows} empty, {report.invalid_rows} null/invalid, {report.non_utf8_rows} non-UTF-8 rows"
        )
    if len(shards) < 2:
        raise ValueError(f"corpus {data_dir} has 1 shard; need at least 2 (train + validation)")
    if report.val_docs == 0:
        raise ValueError(f"corpus {data_dir}: validation shard {shards[-1].name} has no usable text")
    return report


# ---- writing -----------------------------------------------------------------------------------
def write_shard(path: Path, docs: list[str], row_groups: int = 8) -> int:
    """One shard with `row_groups` row groups (fewer if there are fewer docs); atomic. -> #row groups."""
    if not docs:
        raise ValueError(f"shard {path.name} would be empty")
    per_group = -(-len(docs) // max(1, row_groups))
    tmp = path.with_name(path.name + ".tmp")
    schema = pa.schema([("text", pa.string())])
    with pq.ParquetWriter(tmp, schema, compression="zstd") as writer:
        for start in range(0, len(docs), per_group):
            writer.write_table(pa.table({"text": docs[start : start + per_group]}, schema=schema))
    os.replace(tmp, path)
    return -(-len(docs) // per_group)


def read_marker(out_dir: Path) -> dict | None:
    path = Path(out_dir) / COMPLETE_MARKER
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return None


def prepare_output(out_dir: Path) -> None:
    """Make `out_dir` ready for a fresh write: own leftovers of an interrupted write are removed;
    shards we did not write are never touched."""
    out_dir.mkdir(parents=True, exist_ok=True)
    ours = (out_dir / INCOMPLETE_MARKER).exists() or (out_dir / COMPLETE_MARKER).exists()
    existing = list_shards(out_dir)
    if existing and not ours:
        raise ValueError(
            f"output directory {out_dir} already holds shards not written by ncp; choose an empty directory"
        )
    (out_dir / COMPLETE_MARKER).unlink(missing_ok=True)
    (out_dir / INCOMPLETE_MARKER).write_text("written by ncp; incomplete until .complete exists\n")
    for p in existing:
        p.unlink()
    for p in out_dir.glob("shard_*.parquet.tmp"):
        p.unlink()


def write_sharded_corpus(
    out_dir: Path,
    train_docs: list[str],
    val_docs: list[str],
    num_train_shards: int,
    *,
    row_groups: int = 8,
    fingerprint: dict | None = None,
) -> CorpusReport:
    """Train docs split evenly over `num_train_shards`, then one validation shard; marker last."""
    out_dir = Path(out_dir)
    if not train_docs or not val_docs:
        raise ValueError(
            f"corpus for {out_dir} needs train and validation docs (got {len(train_docs)} / {len(val_docs)})"
        )
    num_train_shards = max(1, min(num_train_shards, len(train_docs)))
    prepare_output(out_dir)
    per = -(-len(train_docs) // num_train_shards)
    chunks = [train_docs[i : i + per] for i in range(0, len(train_docs), per)] + [val_docs]
    rg_counts = [write_shard(out_dir / shard_name(i), chunk, row_groups) for i, chunk in enumerate(chunks)]
    report = CorpusReport(
        data_dir=str(out_dir),
        num_shards=len(chunks),
        train_shards=len(chunks) - 1,
        val_shards=1,
        row_groups=sum(rg_counts),
        min_row_groups=min(rg_counts),
        docs=len(train_docs) + len(val_docs),
        val_docs=len(val_docs),
        bytes=sum(len(d.encode("utf-8")) for d in train_docs) + sum(len(d.encode("utf-8")) for d in val_docs),
        shards_checked=len(chunks),
    )
    marker = {"report": report.to_dict(), "fingerprint": fingerprint or {}}
    (out_dir / COMPLETE_MARKER).write_text(json.dumps(marker, indent=2))
    (out_dir / INCOMPLETE_MARKER).unlink(missing_ok=True)
    return report


# ---- local sources -----------------------------------------------------------------------------
def expand_sources(sources: Iterable[str | Path]) -> list[Path]:
    """Files named by paths, directories (recursive) and globs, sorted; unknown kinds are errors."""
    files: list[Path] = []
    for src in sources:
        src_s = str(src)
        if any(ch in src_s for ch in "*?["):
            matches = sorted(Path(p) for p in glob.glob(src_s, recursive=True))
            if not matches:
                raise FileNotFoundError(f"source glob {src_s!r} matches no files")
            files.extend(p for p in matches if p.is_file())
        elif Path(src_s).is_dir():
            files.extend(sorted(p for p in Path(src_s).rglob("*") if p.is_file() and _kind(p) is not None))
        elif Path(src_s).is_file():
            files.append(Path(src_s))
        else:
            raise FileNotFoundError(f"source {src_s} does not exist")
    for f in files:
        if _kind(f) is None:
            raise ValueError(f"{f}: unsupported source file type (use .parquet, .jsonl/.json or .txt/.md)")
    if not files:
        raise ValueError(f"sources {list(map(str, sources))} contain no files: empty corpus")
    return files


def _kind(path: Path) -> str | None:
    suffix = path.suffix.lower()
    if suffix == ".parquet":
        return "parquet"
    if suffix in JSONL_SUFFIXES:
        return "jsonl"
    if suffix in TEXT_SUFFIXES:
        return "text"
    return None


def _decode(data: bytes, where: str) -> str:
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise ValueError(
            f"{where}: non-UTF-8 bytes at offset {e.start} ({data[e.start : e.start + 4]!r})"
        ) from e


def iter_source_docs(path: Path, text_column: str = "text") -> Iterator[str]:
    """Documents of one local file. Parquet/JSONL: one per row (field `text_column`); text: the file."""
    kind = _kind(path)
    if kind == "parquet":
        pf = open_shard(path, text_column)
        for rg in range(pf.num_row_groups):
            try:
                col = pf.read_row_group(rg, columns=[text_column]).column(0)
            except (pa.ArrowException, OSError) as e:
                raise ValueError(f"{path}: corrupt parquet data in row group {rg} ({e})") from e
            if not (pa.types.is_string(col.type) or pa.types.is_large_string(col.type)):
                raise ValueError(f"{path}: column {text_column!r} has type {col.type}, expected string")
            yield from (t for t in col.to_pylist() if t is not None)
    elif kind == "jsonl":
        for where, obj in iter_jsonl(path):
            if not isinstance(obj, dict) or text_column not in obj:
                raise ValueError(f"{where}: no field {text_column!r}; set text_column")
            if not isinstance(obj[text_column], str):
                raise ValueError(f"{where}: field {text_column!r} is not a string")
            yield obj[text_column]
    else:
        yield _decode(Path(path).read_bytes(), str(path))


def _fingerprint(files: list[Path], **params) -> dict:
    h = hashlib.sha256()
    for f in files:
        st = f.stat()
        h.update(f"{f.resolve()}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
    return {"sources": h.hexdigest(), **params}


def import_local_corpus(
    sources: Iterable[str | Path],
    out_dir: Path,
    *,
    text_column: str = "text",
    num_train_shards: int = 4,
    val_fraction: float = 0.05,
    row_groups: int = 8,
) -> CorpusReport:
    """Convert local files into a shard folder (last shard = the final `val_fraction` of docs).

    Empty documents are dropped. Re-running with unchanged sources and parameters reuses the result.
    """
    if not 0 < val_fraction < 1:
        raise ValueError(f"val_fraction must be in (0, 1), got {val_fraction}")
    if num_train_shards < 1:
        raise ValueError(f"num_train_shards must be >= 1, got {num_train_shards}")
    out_dir = Path(out_dir)
    files = expand_sources(sources)
    fp = _fingerprint(
        files,
        text_column=text_column,
        num_train_shards=num_train_shards,
        val_fraction=val_fraction,
        row_groups=row_groups,
    )
    marker = read_marker(out_dir)
    if marker and marker.get("fingerprint") == fp:
        return CorpusReport.from_dict(marker["report"])
    docs = [d for f in files for d in iter_source_docs(f, text_column) if d.strip()]
    if len(docs) < 2:
        raise ValueError(
            f"sources {[str(f) for f in files]} hold {len(docs)} non-empty document(s); need at least 2"
        )
    n_val = min(max(1, round(len(docs) * val_fraction)), len(docs) - 1)
    return write_sharded_corpus(
        out_dir, docs[:-n_val], docs[-n_val:], num_train_shards, row_groups=row_groups, fingerprint=fp
    )
