from __future__ import annotations

import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from shared.nanochat.corpus import (
    import_local_corpus,
    iter_shard_texts,
    list_shards,
    split_shards,
    validate_corpus,
)
from shared.nanochat.demo_corpus import write_demo_corpus


def _texts(d):
    return [list(iter_shard_texts([p])) for p in list_shards(d)]


def test_demo_corpus_layout(demo_dir):
    shards = list_shards(demo_dir)
    assert [p.name for p in shards] == ["shard_00000.parquet", "shard_00001.parquet", "shard_00002.parquet"]
    for p in shards:
        pf = pq.ParquetFile(p)
        assert pf.schema_arrow.names == ["text"]
        assert pf.num_row_groups >= 4  # DDP shards by row group
    rep = validate_corpus(demo_dir)
    assert rep.num_shards == 3 and rep.val_shards == 1 and rep.docs > 50
    assert 300_000 < rep.bytes <= 400_000
    assert rep.empty_rows == rep.invalid_rows == rep.non_utf8_rows == 0
    train, val = split_shards(demo_dir)
    assert val == shards[-1:] and train == shards[:-1]


def test_demo_corpus_deterministic_and_idempotent(tmp_path):
    a = write_demo_corpus(tmp_path / "a", max_bytes=50_000, seed=1)
    b = write_demo_corpus(tmp_path / "b", max_bytes=50_000, seed=1)
    write_demo_corpus(tmp_path / "c", max_bytes=50_000, seed=2)
    assert _texts(tmp_path / "a") == _texts(tmp_path / "b")
    assert _texts(tmp_path / "a") != _texts(tmp_path / "c")
    assert a.docs == b.docs
    mtimes = [p.stat().st_mtime_ns for p in list_shards(tmp_path / "a")]
    again = write_demo_corpus(tmp_path / "a", max_bytes=50_000, seed=1)
    assert again == a and mtimes == [p.stat().st_mtime_ns for p in list_shards(tmp_path / "a")]
    # Different arguments rebuild the folder in place.
    write_demo_corpus(tmp_path / "a", max_bytes=60_000, seed=1, num_shards=5)
    assert len(list_shards(tmp_path / "a")) == 5


def test_demo_corpus_has_stdlib_text(tmp_path):
    write_demo_corpus(tmp_path, max_bytes=700_000)
    joined = "\n".join(t for shard in _texts(tmp_path) for t in shard)
    assert "Module " in joined and "Python help:" in joined


def test_demo_corpus_bad_args(tmp_path):
    with pytest.raises(ValueError, match="num_shards"):
        write_demo_corpus(tmp_path, num_shards=1)
    with pytest.raises(ValueError, match="max_bytes"):
        write_demo_corpus(tmp_path, max_bytes=10)


def test_list_shards_ignores_partial_files(tmp_path):
    write_demo_corpus(tmp_path, max_bytes=20_000)
    (tmp_path / "shard_00009.parquet.part").write_bytes(b"partial")
    (tmp_path / "shard_00010.parquet.tmp").write_bytes(b"partial")
    assert [p.name for p in list_shards(tmp_path)][-1] == "shard_00003.parquet"
    with pytest.raises(FileNotFoundError, match="does not exist"):
        list_shards(tmp_path / "nope")


def _write_sources(src):
    src.mkdir()
    pq.write_table(pa.table({"content": [f"parquet doc {i}" for i in range(30)]}), src / "a.parquet")
    with open(src / "b.jsonl", "w") as f:
        for i in range(30):
            f.write(json.dumps({"body": f"json doc {i} é"}) + "\n")
        f.write("\n")  # blank lines are skipped
    (src / "c.txt").write_text("a whole text file\nas one document\n")
    (src / "empty.txt").write_text("   \n")


def test_import_local_sources(tmp_path):
    src = tmp_path / "src"
    _write_sources(src)
    out = tmp_path / "out"
    rep = import_local_corpus([src / "a.parquet"], out, text_column="content", num_train_shards=2)
    assert rep.docs == 30 and rep.num_shards == 3
    assert validate_corpus(out).docs == 30

    out2 = tmp_path / "out2"
    rep = import_local_corpus(
        [str(src / "*.jsonl"), src / "c.txt", src / "empty.txt"], out2, text_column="body"
    )
    texts = [t for shard in _texts(out2) for t in shard]
    assert len(texts) == 31 and "json doc 0 é" in texts and "a whole text file\nas one document\n" in texts
    mtime = (out2 / ".complete").stat().st_mtime_ns
    assert (
        import_local_corpus(
            [str(src / "*.jsonl"), src / "c.txt", src / "empty.txt"], out2, text_column="body"
        )
        == rep
    )
    assert (out2 / ".complete").stat().st_mtime_ns == mtime


def test_import_refuses_foreign_shards(tmp_path, demo_dir):
    import shutil

    foreign = tmp_path / "foreign"
    foreign.mkdir()
    shutil.copy(list_shards(demo_dir)[0], foreign / "shard_00000.parquet")
    (tmp_path / "x.txt").write_text("one")
    (tmp_path / "y.txt").write_text("two")
    with pytest.raises(ValueError, match="not written by ncp"):
        import_local_corpus([tmp_path / "x.txt", tmp_path / "y.txt"], foreign)


def test_import_errors_name_the_problem(tmp_path):
    src = tmp_path / "src"
    _write_sources(src)
    out = tmp_path / "out"
    with pytest.raises(ValueError, match=r"a\.parquet.*no column 'text'.*content"):
        import_local_corpus([src / "a.parquet"], out)
    with pytest.raises(ValueError, match=r"b\.jsonl:1: no field 'text'"):
        import_local_corpus([src / "b.jsonl"], out)
    (src / "bad.parquet").write_bytes(b"PAR1 this is not parquet")
    with pytest.raises(ValueError, match=r"bad\.parquet: not a readable parquet file"):
        import_local_corpus([src / "bad.parquet"], out)
    (src / "latin1.txt").write_bytes("caf\xe9".encode("latin-1"))
    with pytest.raises(ValueError, match=r"latin1\.txt: non-UTF-8 bytes at offset 3"):
        import_local_corpus([src / "latin1.txt"], out)
    (src / "broken.jsonl").write_text('{"text": "ok"}\n{"text": \n')
    with pytest.raises(ValueError, match=r"broken\.jsonl:2: invalid JSON"):
        import_local_corpus([src / "broken.jsonl"], out)
    with pytest.raises(ValueError, match="need at least 2"):
        import_local_corpus([src / "empty.txt"], out)
    with pytest.raises(FileNotFoundError, match="matches no files"):
        import_local_corpus([str(src / "*.csv")], out)
    (src / "d.csv").write_text("x")
    with pytest.raises(ValueError, match=r"d\.csv: unsupported"):
        import_local_corpus([src / "d.csv"], out)
    assert not out.exists()  # every source is read (and refused) before anything is written


def _shard(d, i, table):
    d.mkdir(exist_ok=True)
    pq.write_table(table, d / f"shard_{i:05d}.parquet", row_group_size=2)


def test_validate_counts_bad_rows(tmp_path):
    d = tmp_path / "c"
    bad = [b"good text", b"", b"   ", None, b"caf\xe9", "ok \u00e9".encode()]
    _shard(d, 0, pa.table({"text": pa.array(bad, type=pa.binary())}))
    _shard(d, 1, pa.table({"text": ["val doc"]}))
    rep = validate_corpus(d)
    assert (rep.docs, rep.empty_rows, rep.invalid_rows, rep.non_utf8_rows, rep.val_docs) == (3, 2, 1, 1, 1)
    assert rep.bytes == len(b"good text") + len("ok \u00e9".encode()) + len(b"val doc")
    assert rep.row_groups == 4 and rep.min_row_groups == 1


def test_validate_refuses_unusable(tmp_path):
    d = tmp_path / "empty"
    _shard(d, 0, pa.table({"text": ["", "  "]}))
    _shard(d, 1, pa.table({"text": [None]}, schema=pa.schema([("text", pa.string())])))
    with pytest.raises(ValueError, match="no usable text"):
        validate_corpus(d)
    d2 = tmp_path / "col"
    _shard(d2, 0, pa.table({"body": ["x"]}))
    with pytest.raises(ValueError, match=r"shard_00000\.parquet: no column 'text'"):
        validate_corpus(d2)
    d3 = tmp_path / "corrupt"
    _shard(d3, 0, pa.table({"text": ["x"]}))
    (d3 / "shard_00001.parquet").write_bytes(b"garbage")
    with pytest.raises(ValueError, match=r"shard_00001\.parquet: not a readable parquet"):
        validate_corpus(d3)
    d4 = tmp_path / "nothing"
    d4.mkdir()
    with pytest.raises(ValueError, match="empty corpus"):
        validate_corpus(d4)
    d5 = tmp_path / "ints"
    _shard(d5, 0, pa.table({"text": [1, 2]}))
    with pytest.raises(ValueError, match="type int64"):
        validate_corpus(d5)
    d6 = tmp_path / "noval"
    _shard(d6, 0, pa.table({"text": ["x"]}))
    _shard(d6, 1, pa.table({"text": [""]}))
    with pytest.raises(ValueError, match="validation shard shard_00001.parquet has no usable text"):
        validate_corpus(d6)


def test_validate_sampled(demo_dir):
    rep = validate_corpus(demo_dir, sample_shards=1)
    assert rep.shards_checked == 1 and rep.docs == rep.val_docs > 0
