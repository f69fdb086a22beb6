"""The downloader against a real HTTP server started in the test (http.server in a thread)."""

from __future__ import annotations

import hashlib
import os
import socket
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from shared.nanochat.corpus import list_shards
from shared.nanochat.download import (
    DownloadConfig,
    DownloadError,
    download_shards,
    hf_base_url,
    shard_indices,
    shard_specs,
)

FAST = DownloadConfig(workers=3, retries=2, backoff_seconds=0.01, timeout_seconds=5)


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def log_message(self, *args):  # keep test output clean
        pass

    def do_GET(self):
        srv = self.server
        rng = self.headers.get("Range")
        srv.requests.append((self.path, rng))
        path = self.path.lstrip("/")
        if path.startswith("hf/"):  # Hugging Face style: redirect carrying LFS size + sha256
            name = path[3:]
            data = srv.files.get(name)
            if data is None:
                return self._empty(404)
            self.send_response(302)
            self.send_header("Location", f"/files/{name}")
            self.send_header("X-Linked-Size", str(len(data)))
            self.send_header("X-Linked-Etag", f'"{srv.etags.get(name, hashlib.sha256(data).hexdigest())}"')
            self.send_header("Content-Length", "0")
            self.end_headers()
            return
        name = path.removeprefix("files/")
        data = srv.files.get(name)
        if data is None:
            return self._empty(404)
        start = int(rng.split("=")[1].split("-")[0]) if rng else 0
        body = data[start:]
        self.send_response(206 if rng else 200)
        if rng:
            self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if name in srv.drop or name in srv.drop_once:
            srv.drop_once.discard(name)
            self.wfile.write(body[: len(body) // 3])  # then the connection dies mid-file
            self.wfile.flush()
            self.close_connection = True
            self.connection.shutdown(socket.SHUT_RDWR)
            return
        self.wfile.write(body)

    def _empty(self, code):
        self.send_response(code)
        self.send_header("Content-Length", "0")
        self.end_headers()


@pytest.fixture
def server():
    srv = ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
    srv.daemon_threads = True
    srv.files, srv.requests, srv.drop, srv.drop_once, srv.etags = {}, [], set(), set(), {}
    thread = threading.Thread(target=srv.serve_forever, kwargs={"poll_interval": 0.02}, daemon=True)
    thread.start()
    srv.url = f"http://127.0.0.1:{srv.server_address[1]}"
    yield srv
    srv.shutdown()
    srv.server_close()


def _files(n, size=300_000):
    return {f"shard_{i:05d}.parquet": os.urandom(size + i) for i in range(n)}


def _sums(files):
    return {k: (len(v), hashlib.sha256(v).hexdigest()) for k, v in files.items()}


def test_parallel_download_with_resume_after_drop(server, tmp_path):
    server.files = _files(4)
    server.drop_once = {"shard_00001.parquet"}
    specs = shard_specs(server.url + "/files", [0, 1, 2, 3], checksums=_sums(server.files))
    paths = download_shards(specs, tmp_path, FAST)
    assert [p.name for p in paths] == sorted(server.files)
    for p in paths:
        assert p.read_bytes() == server.files[p.name]
    # The dropped shard was resumed with a Range request from where it broke, not restarted.
    ranges = [r for path, r in server.requests if path.endswith("shard_00001.parquet") and r]
    assert len(ranges) == 1 and ranges[0] == f"bytes={len(server.files['shard_00001.parquet']) // 3}-"
    assert not list(tmp_path.glob("*.part"))
    # Idempotent: a second run verifies what is there and asks the server nothing.
    n = len(server.requests)
    download_shards(specs, tmp_path, FAST)
    assert len(server.requests) == n


def test_checksum_mismatch(server, tmp_path):
    server.files = _files(2)
    sums = _sums(server.files)
    sums["shard_00001.parquet"] = (sums["shard_00001.parquet"][0], "0" * 64)
    specs = shard_specs(server.url + "/files", [0, 1], checksums=sums)
    with pytest.raises(DownloadError, match=r"shard shard_00001\.parquet: checksum mismatch"):
        download_shards(specs, tmp_path, FAST)
    assert [p.name for p in list_shards(tmp_path)] == ["shard_00000.parquet"]
    assert not (tmp_path / "shard_00001.parquet.part").exists()


def test_hf_style_linked_sha(server, tmp_path):
    server.files = _files(2, size=50_000)
    download_shards(shard_specs(server.url + "/hf", [0]), tmp_path, FAST)
    assert (tmp_path / "shard_00000.parquet").read_bytes() == server.files["shard_00000.parquet"]
    server.etags["shard_00001.parquet"] = "f" * 64  # the server's own metadata disagrees with the bytes
    with pytest.raises(DownloadError, match=r"shard_00001\.parquet: checksum mismatch"):
        download_shards(shard_specs(server.url + "/hf", [1]), tmp_path, FAST)
    assert not (tmp_path / "shard_00001.parquet").exists()


def test_404_is_not_retried(server, tmp_path):
    server.files = _files(1, size=1000)
    with pytest.raises(DownloadError, match=r"shard shard_00007\.parquet: HTTP 404"):
        download_shards(shard_specs(server.url + "/files", [0, 7]), tmp_path, FAST)
    assert sum(p.endswith("shard_00007.parquet") for p, _ in server.requests) == 1
    assert [p.name for p in list_shards(tmp_path)] == ["shard_00000.parquet"]


def test_truncated_every_time(server, tmp_path):
    server.files = _files(1, size=30_000)
    server.drop = {"shard_00000.parquet"}
    cfg = DownloadConfig(workers=1, retries=1, backoff_seconds=0.01, timeout_seconds=5)
    with pytest.raises(DownloadError, match=r"shard shard_00000\.parquet: giving up"):
        download_shards(shard_specs(server.url + "/files", [0]), tmp_path, cfg)
    assert list_shards(tmp_path) == []  # only a .part file, which no stage takes for a shard


def test_unreachable(tmp_path):
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()  # nothing listens there now
    cfg = DownloadConfig(workers=1, retries=1, backoff_seconds=0.01, timeout_seconds=2)
    with pytest.raises(DownloadError, match=r"shard shard_00000\.parquet: giving up.*ConnectError"):
        download_shards(shard_specs(f"http://127.0.0.1:{port}", [0]), tmp_path, cfg)


def test_urls_and_indices():
    assert hf_base_url("karpathy/climbmix-400b-shuffle") == (
        "https://huggingface.co/datasets/karpathy/climbmix-400b-shuffle/resolve/main"
    )
    spec = shard_specs(hf_base_url("karpathy/climbmix-400b-shuffle"), [6542])[0]
    assert spec.url.endswith("/resolve/main/shard_06542.parquet") and spec.name == "shard_06542.parquet"
    assert shard_indices(3, 6542) == [0, 1, 2, 6542]
    assert shard_indices(2, None) == [0, 1]
    custom = shard_specs("https://example.org/data/", [3], pattern="part-{index}.parquet")[0]
    assert custom.url == "https://example.org/data/part-3.parquet" and custom.name == "shard_00003.parquet"
    with pytest.raises(ValueError, match="repo"):
        hf_base_url("not a repo")
    with pytest.raises(ValueError, match="base_url"):
        shard_specs("ftp://x", [0])
    with pytest.raises(ValueError, match="workers"):
        DownloadConfig(workers=0)
