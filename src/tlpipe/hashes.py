"""The hash of a file, one way everywhere: shards, archives, weights files."""

from __future__ import annotations

import hashlib
from pathlib import Path


def file_digest(path, alg: str = "sha256") -> str:
    """Hex digest of the file at `path` (`alg`: a hashlib name, sha256 or md5), read in blocks."""
    with open(path, "rb") as f:
        return hashlib.file_digest(f, alg).hexdigest()


def file_sha256(path) -> str:
    return file_digest(path, "sha256")


def has_hash(path, known_hash: str | None) -> bool:
    """Whether `path` is a file with `known_hash` ("sha256:..." or "md5:..."; None: any file)."""
    if not Path(path).is_file():
        return False
    alg, _, digest = (known_hash or ":").partition(":")
    return known_hash is None or file_digest(path, alg) == digest.lower()
