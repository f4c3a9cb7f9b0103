"""data.source: local folders, downloads (from a local HTTP server), pins, safe unpacking, offline errors."""

from __future__ import annotations

import functools
import hashlib
import http.server
import io
import socket
import tarfile
import threading
import time
import zipfile
from pathlib import Path

import pytest

from imagegen import make_class_folders, tar_folder, zip_folder
from tlpipe.runtime.errors import DataError
from tlpipe.data.sources import cache_dir, resolve_source, unpack


@pytest.fixture
def cache(tmp_path, monkeypatch):
    path = tmp_path / "cache"
    monkeypatch.setenv("TLPIPE_CACHE", str(path))
    return path


@pytest.fixture
def server(tmp_path):
    """Serve tmp_path/www over HTTP on 127.0.0.1; .requests counts GETs."""
    www = tmp_path / "www"
    www.mkdir()
    requests = []

    class Handler(http.server.SimpleHTTPRequestHandler):
        def do_GET(self):
            requests.append(self.path)
            super().do_GET()

        def log_message(self, *args):
            pass

    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(Handler, directory=str(www)))
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    httpd.www, httpd.requests = www, requests
    httpd.url = f"http://127.0.0.1:{httpd.server_address[1]}"
    yield httpd
    httpd.shutdown()
    httpd.server_close()


def closed_port() -> int:
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()  # nothing listens here now: connections are refused at once
    return port


def test_cache_dir_follows_env(cache):
    assert cache_dir() == cache


def test_local_folder_is_used_as_is(tmp_path, cache):
    make_class_folders(tmp_path / "imgs", {"a": 1, "b": 1}, size=32)
    assert resolve_source(str(tmp_path / "imgs")) == tmp_path / "imgs"
    assert not cache.exists()  # nothing copied


def test_missing_folder_names_the_path(tmp_path, cache):
    with pytest.raises(DataError, match=r"folder .*nowhere does not exist"):
        resolve_source(str(tmp_path / "nowhere"))


def test_empty_folder_names_the_path(tmp_path, cache):
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / ".DS_Store").write_bytes(b"junk")  # hidden files do not count
    with pytest.raises(DataError, match=r"folder .*empty is empty"):
        resolve_source(str(empty))


def test_unsupported_scheme(cache):
    with pytest.raises(DataError, match="only local folders and http"):
        resolve_source("ftp://example.invalid/data.zip")


def test_offline_url_fails_fast_with_what_to_do(cache):
    url = f"http://127.0.0.1:{closed_port()}/cats_and_dogs_filtered.zip"
    start = time.monotonic()
    with pytest.raises(DataError) as info:
        resolve_source(url, timeout=2.0)
    assert time.monotonic() - start < 5
    msg = str(info.value)
    assert url in msg
    assert "Point data.source at a local folder" in msg
    assert "dvc exp run -S data.source=/path/to/images" in msg
    assert not list((cache / "downloads").glob("*"))  # no partial file left behind


def test_silent_server_times_out_quickly(cache):
    # A server that accepts the connection and never answers (what a dead proxy or a black-holed
    # route looks like): the timeout must bound the wait. Addresses that are "unroutable" on the
    # internet are not reliably so inside sandboxes, so the silence is made locally.
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(1)
    try:
        start = time.monotonic()
        with pytest.raises(DataError, match="Point data.source at a local folder"):
            resolve_source(f"http://127.0.0.1:{listener.getsockname()[1]}/x.zip", timeout=1.0)
        assert time.monotonic() - start < 5
    finally:
        listener.close()


def test_unknown_host(cache):
    with pytest.raises(DataError, match="cannot resolve"):
        resolve_source("http://no-such-host.invalid/x.zip", timeout=3.0)


def _zip_of_classes(tmp_path, name="set.zip", prefix="cats_and_dogs_filtered"):
    make_class_folders(tmp_path / "src", {"cats": 2, "dogs": 2}, size=32)
    return zip_folder(tmp_path / "src", tmp_path / name, prefix=prefix)


def test_download_verify_unpack_and_cache(tmp_path, cache, server, capsys):
    archive = _zip_of_classes(tmp_path)
    (server.www / "set.zip").write_bytes(archive.read_bytes())
    digest = hashlib.sha256(archive.read_bytes()).hexdigest()
    url = f"{server.url}/set.zip"

    root = resolve_source(url, None)
    assert root.name == "cats_and_dogs_filtered"  # single top folder descended into
    assert sorted(p.name for p in root.iterdir()) == ["cats", "dogs"]
    assert root.is_relative_to(cache / "extracted")
    err = capsys.readouterr().err
    assert digest in err and f"data.sha256={digest}" in err  # how to pin it

    # Pinned and cached: same folder, no second request.
    assert resolve_source(url, digest) == root
    assert server.requests == ["/set.zip"]
    assert not [p for p in (cache / "downloads").iterdir() if p.name.endswith(".part")]


def test_sha256_mismatch_names_both_hashes(tmp_path, cache, server):
    archive = _zip_of_classes(tmp_path)
    (server.www / "set.zip").write_bytes(archive.read_bytes())
    actual = hashlib.sha256(archive.read_bytes()).hexdigest()
    wrong = "0" * 64
    with pytest.raises(DataError) as info:
        resolve_source(f"{server.url}/set.zip", wrong)
    assert wrong in str(info.value) and actual in str(info.value)
    assert not (cache / "extracted").exists()  # nothing unpacked from an unverified file


def test_a_cut_download_is_never_kept(cache):
    """The server promises 100000 bytes and hangs up after 10: an error, and no file in the cache
    that a later run could take for the archive."""
    class Cut(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            self.send_response(200)
            self.send_header("Content-Length", "100000")
            self.end_headers()
            self.wfile.write(b"PK\x03\x04 cut")

        def log_message(self, *args):
            pass

    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Cut)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    try:
        with pytest.raises(DataError, match="Point data.source at a local folder"):
            resolve_source(f"http://127.0.0.1:{httpd.server_address[1]}/set.zip", timeout=5.0)
    finally:
        httpd.shutdown()
        httpd.server_close()
    assert not list((cache / "downloads").iterdir())


def test_http_error_is_reported(cache, server):
    with pytest.raises(DataError, match="HTTP 404"):
        resolve_source(f"{server.url}/missing.zip")


def test_local_tar_gz_archive(tmp_path, cache):
    make_class_folders(tmp_path / "src", {"a": 2, "b": 2}, size=32)
    archive = tar_folder(tmp_path / "src", tmp_path / "set.tar.gz")
    root = resolve_source(str(archive))
    assert sorted(p.name for p in root.iterdir()) == ["a", "b"]  # two top folders: not descended


def test_not_an_archive(tmp_path, cache):
    bogus = tmp_path / "data.zip"
    bogus.write_text("hello")
    with pytest.raises(DataError, match="not a .zip or .tar"):
        resolve_source(str(bogus))


@pytest.mark.parametrize("member", ["../evil.txt", "a/../../evil.txt", "/abs/evil.txt"])
def test_zip_path_traversal_is_refused(tmp_path, member):
    archive = tmp_path / "bad.zip"
    with zipfile.ZipFile(archive, "w") as zf:
        zf.writestr("ok/fine.txt", "x")
        zf.writestr(member, "owned")
    with pytest.raises(DataError, match="outside the extraction folder"):
        unpack(archive, tmp_path / "out" / "x")
    assert not (tmp_path / "evil.txt").exists() and not (tmp_path / "out" / "x").exists()
    assert not list((tmp_path / "out").iterdir())  # temp folder cleaned up


def _tar_with(path: Path, members: list[tarfile.TarInfo]) -> Path:
    with tarfile.open(path, "w") as tf:
        for info in members:
            data = b"owned" if info.isfile() else None
            if data is not None:
                info.size = len(data)
            tf.addfile(info, io.BytesIO(data) if data is not None else None)
    return path


def test_tar_path_traversal_and_outside_links_are_refused(tmp_path):
    bad = _tar_with(tmp_path / "up.tar", [tarfile.TarInfo("../evil.txt")])
    with pytest.raises(DataError, match="outside the extraction folder"):
        unpack(bad, tmp_path / "out1")
    link = tarfile.TarInfo("a/link")
    link.type, link.linkname = tarfile.SYMTYPE, "/etc/passwd"
    bad = _tar_with(tmp_path / "link.tar", [link])
    with pytest.raises(DataError, match="refusing to unpack"):
        unpack(bad, tmp_path / "out2")
    assert not (tmp_path / "out1").exists() and not (tmp_path / "out2").exists()
