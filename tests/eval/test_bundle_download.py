"""Bundle download against a local HTTP server: verification and atomic, safe extraction."""

from __future__ import annotations

import hashlib
import http.server
import threading
import zipfile
from pathlib import Path

import pytest

from shared.nanochat.eval.bundle import BundleDownloadError, download_bundle
from shared.nanochat.eval.core import load_bundle
from shared.nanochat.eval.fixtures import write_fixture_bundle


@pytest.fixture
def server(tmp_path):
    root = tmp_path / "www"
    root.mkdir()

    class Quiet(http.server.SimpleHTTPRequestHandler):
        def __init__(self, *a, **kw):
            super().__init__(*a, directory=str(root), **kw)

        def log_message(self, *a):
            pass

    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Quiet)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    yield root, f"http://127.0.0.1:{httpd.server_address[1]}"
    httpd.shutdown()
    httpd.server_close()


def _zip_bundle(src: Path, zip_path: Path) -> bytes:
    with zipfile.ZipFile(zip_path, "w") as zf:
        for p in sorted(src.rglob("*")):
            if p.is_file():
                zf.write(p, Path("eval_bundle") / p.relative_to(src))
    return zip_path.read_bytes()


def test_download_verifies_and_extracts(tmp_path, server):
    root, url = server
    data = _zip_bundle(write_fixture_bundle(tmp_path / "src"), root / "eval_bundle.zip")
    dest = tmp_path / "cache" / "eval_bundle"
    with pytest.raises(BundleDownloadError, match="sha256 mismatch"):
        download_bundle(dest, url=f"{url}/eval_bundle.zip", sha256="0" * 64)
    with pytest.raises(BundleDownloadError, match="expected 1 bytes"):
        download_bundle(dest, url=f"{url}/eval_bundle.zip", size=1)
    assert not dest.exists()  # failed attempts leave nothing behind
    assert list((tmp_path / "cache").iterdir()) == []
    out = download_bundle(
        dest, url=f"{url}/eval_bundle.zip", sha256=hashlib.sha256(data).hexdigest(), size=len(data)
    )
    assert out == dest and len(load_bundle(dest)) == 6
    # second call is a no-op even if the server is gone
    assert download_bundle(dest, url=f"{url}/missing.zip") == dest


def test_download_rejects_bad_archives(tmp_path, server):
    root, url = server
    with zipfile.ZipFile(root / "evil.zip", "w") as zf:
        zf.writestr("../escape.txt", "x")
        zf.writestr("eval_bundle/core.yaml", "icl_tasks: []\n")
    with pytest.raises(BundleDownloadError, match="outside the bundle"):
        download_bundle(tmp_path / "b1", url=f"{url}/evil.zip")
    assert not (tmp_path / "escape.txt").exists()
    (root / "junk.zip").write_bytes(b"not a zip")
    with pytest.raises(BundleDownloadError, match="not a zip"):
        download_bundle(tmp_path / "b2", url=f"{url}/junk.zip")
    with pytest.raises(BundleDownloadError, match="404"):
        download_bundle(tmp_path / "b3", url=f"{url}/nothing.zip")
