from __future__ import annotations

import json
import threading
from functools import partial
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer

from services.cli.main import main
from shared.nanochat.corpus import list_shards


class _Quiet(SimpleHTTPRequestHandler):
    def log_message(self, *args):
        pass


def test_demo_validate_train_eval(tmp_path, capsys):
    data, tok_dir = tmp_path / "demo", tmp_path / "tok"
    assert main(["data", "demo-corpus", "--out", str(data), "--max-bytes", "120000", "--shards", "3"]) == 0
    assert json.loads(capsys.readouterr().out)["num_shards"] == 3
    assert main(["data", "validate", str(data)]) == 0
    assert json.loads(capsys.readouterr().out)["docs"] > 0
    args = ["tokenizer", "train", "--data", str(data), "--vocab-size", "400", "--out", str(tok_dir)]
    assert main(args) == 0
    rep = json.loads(capsys.readouterr().out)
    assert rep["vocab_size"] == 400 and rep["bytes_per_token"] > 1
    assert (tok_dir / "tokenizer.json").is_file() and (tok_dir / "tokenizer_config.json").is_file()
    assert main(["tokenizer", "eval", "--tokenizer", str(tok_dir), "--data", str(data)]) == 0
    assert json.loads(capsys.readouterr().out)["bytes_per_token"] == rep["bytes_per_token"]


def test_default_dirs_under_ncp_home(capsys):
    from shared.settings import get_settings

    assert main(["data", "demo-corpus", "--max-bytes", "20000"]) == 0
    assert list_shards(get_settings().datasets_dir / "demo")


def test_errors_are_one_line(tmp_path, capsys):
    assert main(["data", "validate", str(tmp_path / "nope")]) == 2
    assert "does not exist" in capsys.readouterr().err
    assert main(["tokenizer", "train", "--data", str(tmp_path), "--vocab-size", "100"]) == 2
    assert main(["data", "fetch", "--shards", "1"]) == 2
    assert "exactly one of --repo or --base-url" in capsys.readouterr().err


def test_fetch_from_local_server(tmp_path, capsys):
    src = tmp_path / "remote"
    main(["data", "demo-corpus", "--out", str(src), "--max-bytes", "20000", "--shards", "3"])
    srv = ThreadingHTTPServer(("127.0.0.1", 0), partial(_Quiet, directory=str(src)))
    threading.Thread(target=srv.serve_forever, kwargs={"poll_interval": 0.02}, daemon=True).start()
    try:
        url = f"http://127.0.0.1:{srv.server_address[1]}"
        out = tmp_path / "fetched"
        args = ["data", "fetch", "--base-url", url, "--shards", "2", "--val-index", "2", "--out", str(out)]
        assert main([*args, "--workers", "2"]) == 0
        assert [p.read_bytes() for p in list_shards(out)] == [p.read_bytes() for p in list_shards(src)]
        bad = [
            "data",
            "fetch",
            "--base-url",
            url,
            "--shards",
            "5",
            "--out",
            str(tmp_path / "x"),
            "--retries",
            "0",
        ]
        assert main(bad) == 2
        assert "shard_00003.parquet: HTTP 404" in capsys.readouterr().err
    finally:
        srv.shutdown()
        srv.server_close()
