"""`ncp import nanochat`: an upstream base dir built here the way upstream writes it (rustbpe +
tiktoken tokenizer.pkl, token_bytes.pt, base checkpoint with 2-rank optimizer shards, SFT
checkpoint) becomes a platform model folder that trains on, evaluates, exports and serves."""

from __future__ import annotations

import json
import pickle
import shutil

import pytest
import torch

from services.cli.main import main as ncp
from shared.nanochat.checkpoint import copy_checkpoint, latest_step, load_checkpoint
from shared.nanochat.corpus import iter_shard_texts, split_shards
from shared.nanochat.nanochat_import import (
    NanochatImportError,
    import_nanochat,
    read_manifest,
    scan_nanochat_dir,
)
from shared.nanochat.tokenizer import Tokenizer
from tests.upstream import (
    TINY,
    run_optimizer,
    tiny_state,
    upstream_encoding,
    write_upstream_checkpoint,
    write_upstream_tokenizer,
)


@pytest.fixture(scope="module")
def upstream_dir(demo_dir, tmp_path_factory):
    """A nanochat base dir: vocab 300 (the TINY model's), base d2 step 3 with 2 ranks' optimizer
    shards, SFT d2 step 5 without optimizer state."""
    root = tmp_path_factory.mktemp("nanochat_home")
    train, _ = split_shards(demo_dir)
    enc = upstream_encoding(list(iter_shard_texts(train)), vocab_size=TINY.vocab_size)
    write_upstream_tokenizer(root / "tokenizer", enc)
    model3, shards = run_optimizer(2, tiny_state(), [(0, True), (1, True), (2, True)], root / "opt")
    write_upstream_checkpoint(root / "base_checkpoints" / "d2", 3, model3, TINY, shards)
    write_upstream_checkpoint(root / "chatsft_checkpoints" / "d2", 5, tiny_state(seed=1), TINY)
    for f in root.glob("opt.*"):
        f.unlink()
    return {"root": root, "enc": enc}


def test_scan_finds_every_part(upstream_dir):
    found = scan_nanochat_dir(upstream_dir["root"])
    assert found.tokenizer_pkl is not None and found.token_bytes is not None
    assert [(c.phase, c.tag, c.steps) for c in found.checkpoints] == [("base", "d2", [3]), ("sft", "d2", [5])]


def test_import_lands_every_part(upstream_dir, tmp_path):
    enc = upstream_dir["enc"]
    manifest = import_nanochat(upstream_dir["root"], tmp_path / "models", "my-run")
    dest = tmp_path / "models" / "my-run"
    assert manifest["path"] == str(dest) and read_manifest(dest)["name"] == "my-run"
    assert manifest["tokenizer"]["vocab_size"] == 300 and manifest["tokenizer"]["verified_probes"] > 150
    assert manifest["warnings"] == []  # upstream's token_bytes.pt agrees with the tokenizer
    assert [(c["phase"], c["path"], c["steps"], c["optimizer_ranks"]) for c in manifest["checkpoints"]] == [
        ("base", "base_checkpoints/d2", [3], {"3": 2}),
        ("sft", "chatsft_checkpoints/d2", [5], {"5": 0}),
    ]
    tok = Tokenizer.load(dest / "tokenizer")
    text = "Hello world! 12345 你好 🌍  \n\n  <|bos|> done."
    assert tok.encode(text) == enc.encode_ordinary(text)
    assert tok.encode_special("<|assistant_end|>") == enc.encode_single_token("<|assistant_end|>")
    assert (dest / "tokenizer" / "token_bytes.pt").is_file() and not (
        dest / "tokenizer" / "tokenizer.pkl"
    ).exists()
    # checkpoints in our format, shards kept byte for byte
    base = dest / "base_checkpoints" / "d2"
    assert latest_step(base) == 3
    meta = load_checkpoint(base, 3)[2]
    assert meta["world_size"] == 2 and meta["loop_state"]["smooth_train_loss"] == 3.5
    src = upstream_dir["root"] / "base_checkpoints" / "d2"
    for r in range(2):
        assert (base / f"optim_000003_rank{r}.pt").read_bytes() == (
            src / f"optim_000003_rank{r}.pt"
        ).read_bytes()
    # continuing on one rank: resharded; weights-only SFT continuation
    assert copy_checkpoint(base, None, tmp_path / "cont", world_size=1) == 3
    assert len(load_checkpoint(tmp_path / "cont", 3, load_optimizer=True)[1]["state"]) > 0
    assert not [p for p in (tmp_path / "models").iterdir() if p.name.startswith(".")]  # no temp folders


def test_imported_model_exports_and_evaluates_with_its_tokenizer(upstream_dir, tmp_path):
    from shared.nanochat.eval.runner import load_checked
    from shared.nanochat.export import check_export, export_model, load_exported

    import_nanochat(upstream_dir["root"], tmp_path / "models", "m")
    dest = tmp_path / "models" / "m"
    model, meta, tok = load_checked(dest / "chatsft_checkpoints" / "d2", None, dest / "tokenizer", "cpu")
    assert meta["step"] == 5 and tok.vocab_size == model.config.vocab_size
    out = export_model(dest / "chatsft_checkpoints" / "d2", None, dest / "tokenizer", tmp_path / "export")
    assert check_export(out)["vocab_size"] == 300
    served, served_tok = load_exported(out)
    ids = torch.tensor([served_tok.encode("def add(a, b):", prepend="<|bos|>")])
    with torch.no_grad():
        assert torch.equal(served(ids), model(ids))


def test_mismatched_tokenizer_is_refused_before_anything_is_written(upstream_dir, tmp_path):
    bad = tmp_path / "src"
    shutil.copytree(upstream_dir["root"], bad)
    meta_path = bad / "chatsft_checkpoints" / "d2" / "meta_000005.json"
    meta = json.loads(meta_path.read_text())
    meta["model_config"]["vocab_size"] = 640
    meta_path.write_text(json.dumps(meta))
    with pytest.raises(NanochatImportError, match=r"vocab_size 640 .* has 300 tokens"):
        import_nanochat(bad, tmp_path / "models", "bad")
    assert not (tmp_path / "models").exists() or not list((tmp_path / "models").iterdir())


def test_malicious_tokenizer_pickle_is_refused_and_not_run(upstream_dir, tmp_path):
    class Evil:
        def __reduce__(self):
            return (shutil.rmtree, (str(upstream_dir["root"]),))

    bad = tmp_path / "src"
    shutil.copytree(upstream_dir["root"] / "tokenizer", bad / "tokenizer")
    (bad / "tokenizer" / "tokenizer.pkl").write_bytes(pickle.dumps(Evil()))
    with pytest.raises(NanochatImportError, match=r"shutil\.rmtree.*nothing was executed"):
        import_nanochat(bad, tmp_path / "models", "evil")
    assert upstream_dir["root"].is_dir()


def test_refusals_name_the_problem(upstream_dir, tmp_path):
    with pytest.raises(NanochatImportError, match="not a nanochat base dir"):
        import_nanochat(tmp_path, tmp_path / "models", "x")
    with pytest.raises(ValueError, match="name"):
        import_nanochat(upstream_dir["root"], tmp_path / "models", "../up")
    import_nanochat(upstream_dir["root"], tmp_path / "models", "once")
    with pytest.raises(NanochatImportError, match="already exists"):
        import_nanochat(upstream_dir["root"], tmp_path / "models", "once")


def test_old_token_bytes_are_a_warning_not_an_error(upstream_dir, tmp_path):
    src = tmp_path / "src"
    shutil.copytree(upstream_dir["root"] / "tokenizer", src / "tokenizer")
    tb = torch.load(src / "tokenizer" / "token_bytes.pt", weights_only=True)
    tb[128:256] = 3  # older upstream measured raw bytes >= 0x80 through str: U+FFFD, 3 bytes
    torch.save(tb, src / "tokenizer" / "token_bytes.pt")
    manifest = import_nanochat(src, tmp_path / "models", "tok-only")
    assert manifest["checkpoints"] == [] and "at 128 id(s)" in manifest["warnings"][0]


def test_cli_import_json(upstream_dir, tmp_path, monkeypatch, capsys):
    from shared.settings import get_settings

    monkeypatch.setenv("NCP_HOME", str(tmp_path / "home"))
    get_settings.cache_clear()
    try:
        assert ncp(["import", "nanochat", str(upstream_dir["root"]), "--name", "cli-run", "--json"]) == 0
        manifest = json.loads(capsys.readouterr().out)
        assert manifest["path"] == str(tmp_path / "home" / "models" / "cli-run")
        assert ncp(["import", "nanochat", str(upstream_dir["root"]), "--name", "cli-run"]) == 2
        assert "already exists" in capsys.readouterr().err
        assert ncp(["import", "nanochat", str(upstream_dir["root"]), "--name", "plain"]) == 0
        out = capsys.readouterr().out
        assert "base base_checkpoints/d2/: steps [3] (optimizer shards of 2 rank(s))" in out
    finally:
        get_settings.cache_clear()


@pytest.fixture
def migrated_pg():
    """A fresh PostgreSQL registry, migrated the way `ncp db upgrade` does."""
    import secrets

    import psycopg

    from services.api.migrate import upgrade
    from tests.servers import PG_ADMIN, pg_url

    name = f"ncp_test_{secrets.token_hex(6)}"
    with psycopg.connect(PG_ADMIN, autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    try:
        upgrade(pg_url(name))
        yield pg_url(name)
    finally:
        with psycopg.connect(PG_ADMIN, autocommit=True) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


def test_cli_import_registers_the_model(upstream_dir, tmp_path, monkeypatch, capsys, migrated_pg):
    from shared.db import model_registry
    from shared.db.session import make_engine, make_session_factory
    from shared.settings import get_settings

    home = tmp_path / "home"
    monkeypatch.setenv("NCP_HOME", str(home))
    monkeypatch.setenv("NCP_DATABASE_URL", migrated_pg)
    get_settings.cache_clear()
    try:
        assert ncp(["import", "nanochat", str(upstream_dir["root"]), "--name", "reg-run"]) == 0
        engine = make_engine(migrated_pg)
        with make_session_factory(engine)() as s:
            ref = model_registry.resolve_checkpoint(s, "reg-run", "base", None)
            assert ref.root == home / "models" / "reg-run" and ref.tokenizer_dir == ref.root / "tokenizer"
            assert (ref.step, ref.has_optimizer, ref.world_size) == (3, True, 2)
            m = model_registry.require_model(s, "reg-run")
            assert m.source_path == str(upstream_dir["root"].resolve()) and m.manifest["name"] == "reg-run"
        engine.dispose()
        # The registry's name is refused before any file is written, even when the folder is gone.
        shutil.rmtree(home / "models" / "reg-run")
        capsys.readouterr()
        assert ncp(["import", "nanochat", str(upstream_dir["root"]), "--name", "reg-run"]) == 2
        assert "model 'reg-run' already exists (import model at" in capsys.readouterr().err
        assert not (home / "models" / "reg-run").exists()
        assert [p.name for p in (home / "models").iterdir()] == []  # no temp folder either
    finally:
        get_settings.cache_clear()


def test_cli_import_without_registry_notes_it(upstream_dir, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("NCP_HOME", str(tmp_path / "home"))
    from shared.settings import get_settings

    get_settings.cache_clear()
    try:
        assert ncp(["import", "nanochat", str(upstream_dir["root"]), "--name", "unreg"]) == 0
        assert "model was not registered" in capsys.readouterr().err
        assert not (tmp_path / "home" / "registry.db").exists()  # no empty database left behind
    finally:
        get_settings.cache_clear()
