"""Turn `data.source` into a local folder: use a folder as is, or download, verify and unpack an archive.

Downloads are cached in `$TLPIPE_CACHE/downloads/` (default `~/.cache/tlpipe/downloads/`) and
unpacked into `$TLPIPE_CACHE/extracted/<archive sha256>/`, so a URL is fetched once per machine.
tlpipe.downloads fetches (to a temporary name, renamed when complete and, when pinned, verified); the
unpacking is ours (see `unpack`).
"""

from __future__ import annotations

import hashlib
import os
import tarfile
import urllib.parse
import zipfile
from pathlib import Path, PurePosixPath

from tlpipe import atomic
from tlpipe.downloads import fetch
from tlpipe.runtime.errors import DataError
from tlpipe.hashes import file_sha256
from tlpipe.runtime.log import log

CONNECT_TIMEOUT = 10.0  # seconds; offline machines should hear "no" quickly
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


def _cache_name(url: str) -> str:
    # The URL's own file name keeps the cache readable; a hash of the URL keeps two URLs apart.
    base = PurePosixPath(urllib.parse.urlsplit(url).path).name or "download"
    safe = "".join(c if c.isalnum() or c in "._-" else "_" for c in base)
    return f"{hashlib.sha256(url.encode()).hexdigest()[:12]}-{safe}"


def download(url: str, dest_dir: Path, sha256: str | None = None, timeout: float = CONNECT_TIMEOUT) -> Path:
    """`url` in dest_dir (its cache name), downloaded once; with `sha256`, verified (a cached file that
    does not match is fetched again)."""
    return fetch(url, Path(dest_dir) / _cache_name(url), f"sha256:{sha256.lower()}" if sha256 else None, timeout,
                 what="data.source", hint=OFFLINE_HINT)


def verify_sha256(path: Path, expected: str | None, what: str = "data.sha256") -> str:
    """Check a file against its pinned SHA-256; when unpinned, print the hash and how to pin it."""
    actual = file_sha256(path)
    if expected is None:
        log.info(f"{path.name} has SHA-256 {actual}; pin it with "
                 f"`dvc exp run -S {what}={actual}` or by setting {what} in params.yaml.")
    elif actual != expected.lower():
        raise DataError(
            f"{path}: SHA-256 mismatch: expected {expected.lower()} ({what}), got {actual}. The file is "
            f"damaged or changed: replace it, or update {what}."
        )
    return actual


def _check_member(name: str, archive: Path) -> None:
    parts = name.replace("\\", "/").split("/")
    if name.startswith(("/", "\\")) or (len(name) > 1 and name[1] == ":") or ".." in parts:
        raise DataError(
            f"{archive}: member {name!r} would be written outside the extraction folder; "
            f"refusing to unpack this archive (it may be malicious)."
        )


def unpack(archive: Path, dest: Path) -> Path:
    """Safely unpack a .zip or .tar(.gz/.bz2/.xz) into dest (built in a temp folder, then renamed).

    Ours, not pooch's Unzip/Untar: those unpack in place (a killed run leaves a half folder that is
    trusted later) and drop unsafe members silently where we refuse the archive."""
    archive, dest = Path(archive), Path(dest)
    if dest.is_dir():
        return dest
    try:
        # shared: another run may unpack the same archive into the cache at once; the first one wins.
        with atomic.folder(dest, shared=True) as tmp:
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
                        raise DataError(f"{archive}: {exc}; refusing to unpack this archive (it may be "
                                        f"malicious).") from None
            else:
                raise DataError(f"{archive}: not a .zip or .tar(.gz) archive; data.source must be a folder or "
                                f"such an archive.")
    except (tarfile.TarError, zipfile.BadZipFile, EOFError, OSError) as exc:
        raise DataError(f"{archive}: cannot unpack ({exc}); delete it to download again.") from None
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
        archive = download(source, cache / "downloads", sha256, timeout)  # a pinned hash is checked there
        digest = sha256.lower() if sha256 else verify_sha256(archive, None)
    elif "://" in source:
        raise DataError(f"data.source: {source!r}: only local folders and http(s) URLs are supported.")
    else:
        path = Path(source).expanduser()
        if not path.is_file():
            return _check_folder(path)
        archive = path  # a local archive file: unpack it like a download
        digest = verify_sha256(archive, sha256) if sha256 else file_sha256(archive)
    root = unpack(archive, cache / "extracted" / digest)
    return _check_folder(descend_single_top(root))
