"""Turn `data.source` into a local folder: use a folder as is, or download, verify and unpack an archive.

Downloads are cached in `$TLPIPE_CACHE/downloads/` (default `~/.cache/tlpipe/downloads/`) and
unpacked into `$TLPIPE_CACHE/extracted/<archive sha256>/`, so a URL is fetched once per machine.
Every file is written under a temporary name and renamed when complete.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import socket
import sys
import tarfile
import tempfile
import threading
import urllib.error
import urllib.parse
import urllib.request
import zipfile
from pathlib import Path, PurePosixPath

from tqdm import tqdm

from tlpipe import atomic
from tlpipe.errors import DataError

CONNECT_TIMEOUT = 10.0  # seconds; offline machines should hear "no" quickly
CHUNK = 1 << 20
OFFLINE_HINT = (
    "Offline? Point data.source at a local folder of images instead, e.g. "
    "`dvc exp run -S data.source=/path/to/images`, or edit data.source in params.yaml."
)
# Names that never hold images: OS litter and archive metadata.
IGNORED_NAMES = {"thumbs.db", "desktop.ini", "__macosx"}


def is_hidden(name: str) -> bool:
    """Dotfiles (.DS_Store, ._x, .git) and OS litter (Thumbs.db, desktop.ini, __MACOSX)."""
    return name.startswith(".") or name.lower() in IGNORED_NAMES


def is_url(source: str) -> bool:
    return urllib.parse.urlsplit(str(source)).scheme.lower() in ("http", "https")


def cache_dir() -> Path:
    """Root of tlpipe's download cache: $TLPIPE_CACHE, else ~/.cache/tlpipe."""
    env = os.environ.get("TLPIPE_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "tlpipe"


def file_sha256(path: Path) -> str:
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def _cache_name(url: str) -> str:
    # The URL's own file name keeps the cache readable; a hash of the URL keeps two URLs apart.
    base = PurePosixPath(urllib.parse.urlsplit(url).path).name or "download"
    safe = "".join(c if c.isalnum() or c in "._-" else "_" for c in base)
    return f"{hashlib.sha256(url.encode()).hexdigest()[:12]}-{safe}"


def _resolve_host(url: str, timeout: float) -> None:
    """Fail within `timeout` when the host cannot be resolved (getaddrinfo itself has no timeout)."""
    parts = urllib.parse.urlsplit(url)
    result: list = []

    def lookup():
        try:
            socket.getaddrinfo(parts.hostname, parts.port or (443 if parts.scheme == "https" else 80))
            result.append(None)
        except OSError as exc:
            result.append(exc)

    t = threading.Thread(target=lookup, daemon=True)
    t.start()
    t.join(timeout)
    if not result:
        raise DataError(f"cannot download {url}: looking up {parts.hostname} timed out. {OFFLINE_HINT}")
    if result[0] is not None:
        raise DataError(f"cannot download {url}: cannot resolve {parts.hostname} ({result[0]}). {OFFLINE_HINT}")


def download(url: str, dest_dir: Path, timeout: float = CONNECT_TIMEOUT) -> Path:
    """Download `url` into dest_dir (once: an existing complete file is reused); return its path."""
    dest_dir = Path(dest_dir)
    dest = dest_dir / _cache_name(url)
    if dest.is_file():
        return dest
    dest_dir.mkdir(parents=True, exist_ok=True)
    _resolve_host(url, timeout)
    try:
        resp = urllib.request.urlopen(urllib.request.Request(url, headers={"User-Agent": "tlpipe"}), timeout=timeout)
    except urllib.error.HTTPError as exc:
        raise DataError(f"cannot download {url}: HTTP {exc.code} {exc.reason}. Check the URL in data.source. {OFFLINE_HINT}") from None
    except (urllib.error.URLError, OSError) as exc:
        reason = getattr(exc, "reason", exc)
        raise DataError(f"cannot download {url}: {reason}. {OFFLINE_HINT}") from None
    try:
        total = int(resp.headers.get("Content-Length") or 0) or None
        got = 0
        with atomic.target(dest, suffix=".part") as tmp:
            with resp, open(tmp, "wb") as out, tqdm(
                total=total, unit="B", unit_scale=True, unit_divisor=1024, desc=f"download {dest.name}",
                file=sys.stderr, leave=False,
            ) as bar:
                for chunk in iter(lambda: resp.read(CHUNK), b""):
                    out.write(chunk)
                    got += len(chunk)
                    bar.update(len(chunk))
            if total is not None and got != total:
                raise DataError(f"download of {url} stopped after {got} of {total} bytes; run the stage again.")
    except (OSError, socket.timeout) as exc:
        raise DataError(f"download of {url} failed: {exc}. {OFFLINE_HINT}") from None
    return dest


def verify_sha256(path: Path, expected: str | None, what: str = "data.sha256") -> str:
    """Check a file against its pinned SHA-256; when unpinned, print the hash and how to pin it."""
    actual = file_sha256(path)
    if expected is None:
        print(
            f"note: {path.name} has SHA-256 {actual}; pin it with "
            f"`dvc exp run -S {what}={actual}` or by setting {what} in params.yaml.",
            file=sys.stderr,
        )
    elif actual != expected.lower():
        raise DataError(
            f"{path}: SHA-256 mismatch: expected {expected.lower()} ({what}), got {actual}. The download is "
            f"damaged or the file changed upstream: delete {path} to download again, or update {what}."
        )
    return actual


def _check_member(name: str, archive: Path) -> None:
    parts = name.replace("\\", "/").split("/")
    if name.startswith(("/", "\\")) or (len(name) > 1 and name[1] == ":") or ".." in parts:
        raise DataError(
            f"{archive}: member {name!r} would be written outside the extraction folder; "
            f"refusing to unpack this archive (it may be malicious)."
        )


def extract(archive: Path, dest: Path) -> Path:
    """Safely unpack a .zip or .tar(.gz/.bz2/.xz) into dest (built in a temp folder, then renamed)."""
    archive, dest = Path(archive), Path(dest)
    if dest.is_dir():
        return dest
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=dest.name + ".", suffix=".part", dir=dest.parent))
    try:
        if zipfile.is_zipfile(archive):
            with zipfile.ZipFile(archive) as zf:
                for info in zf.infolist():
                    _check_member(info.filename, archive)
                zf.extractall(tmp)
        elif tarfile.is_tarfile(archive):
            with tarfile.open(archive) as tf:
                members = tf.getmembers()
                for m in members:
                    _check_member(m.name, archive)
                # The "data" filter refuses links leaving the folder, devices and odd permissions.
                try:
                    tf.extractall(tmp, members=members, filter="data")
                except tarfile.FilterError as exc:
                    raise DataError(f"{archive}: {exc}; refusing to unpack this archive (it may be malicious).") from None
        else:
            raise DataError(f"{archive}: not a .zip or .tar(.gz) archive; data.source must be a folder or such an archive.")
        os.chmod(tmp, 0o755)
        try:
            os.replace(tmp, dest)
        except OSError:
            if not dest.is_dir():  # else another run unpacked the same archive first: use it
                raise
    except (tarfile.TarError, zipfile.BadZipFile, EOFError, OSError) as exc:
        raise DataError(f"{archive}: cannot unpack ({exc}); delete it to download again.") from None
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return dest


def visible_entries(folder: Path) -> list[Path]:
    return sorted(p for p in Path(folder).iterdir() if not is_hidden(p.name))


def descend_single_top(root: Path) -> Path:
    """An archive holding one top folder (cats_and_dogs_filtered/) is used from inside it."""
    entries = visible_entries(root)
    if len(entries) == 1 and entries[0].is_dir():
        return entries[0]
    return root


def _check_folder(folder: Path) -> Path:
    if not folder.exists():
        raise DataError(f"data.source: folder {folder} does not exist; set data.source to a folder of class subfolders or an archive URL.")
    if not folder.is_dir():
        raise DataError(f"data.source: {folder} is not a folder (nor a .zip/.tar archive).")
    try:
        entries = visible_entries(folder)
    except PermissionError:
        raise DataError(f"data.source: cannot read folder {folder} (permission denied).") from None
    if not entries:
        raise DataError(f"data.source: folder {folder} is empty; it should hold one subfolder of images per class.")
    return folder


def resolve_source(source: str, sha256: str | None = None, cache: Path | None = None,
                   timeout: float = CONNECT_TIMEOUT) -> Path:
    """The local folder of images that `data.source` names (downloading and unpacking if needed)."""
    source = str(source)
    cache = Path(cache) if cache is not None else cache_dir()
    if is_url(source):
        archive = download(source, cache / "downloads", timeout)
        digest = verify_sha256(archive, sha256)
    elif "://" in source:
        raise DataError(f"data.source: {source!r}: only local folders and http(s) URLs are supported.")
    else:
        path = Path(source).expanduser()
        if not path.is_file():
            return _check_folder(path)
        archive = path  # a local archive file: unpack it like a download
        digest = verify_sha256(archive, sha256) if sha256 else file_sha256(archive)
    root = extract(archive, cache / "extracted" / digest)
    return _check_folder(descend_single_top(root))
