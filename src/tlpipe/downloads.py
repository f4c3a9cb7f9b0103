"""Downloading a file once: to a temp name, renamed when complete, verified when pinned, failing fast
offline. Used for data.source archives (data/sources.py) and Keras' ImageNet weights
(features/pretrained.py); apart from both, so only what downloads depends on it.
"""

from __future__ import annotations

import re
import socket
import threading
import urllib.parse
from pathlib import Path

from tlpipe.runtime.errors import DataError
from tlpipe.hashes import has_hash


def _resolve_host(url: str, timeout: float) -> str | None:
    """Why `url`'s host cannot be resolved within `timeout`, or None when it can.

    Ours, not pooch's: requests' timeout does not cover the name lookup (getaddrinfo blocks
    without one), so an offline machine with a silent resolver would hang."""
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
        return f"looking up {parts.hostname} timed out"
    return None if result[0] is None else f"cannot resolve {parts.hostname} ({result[0]})"


def fetch(url: str, dest: Path, known_hash: str | None, timeout: float, *, what: str, hint: str,
          error: type[Exception] = DataError) -> Path:
    """`url` as the file `dest`, downloaded once by pooch: it appears only complete (a temp name,
    renamed) and, with `known_hash` ("sha256:..." or "md5:..."), verified; a matching `dest` is reused
    without touching the network. Failures raise `error` naming `what` and the `hint`."""
    import pooch
    import requests

    dest = Path(dest)
    if has_hash(dest, known_hash):
        return dest
    why = _resolve_host(url, timeout)
    if why is None:
        pooch.get_logger().setLevel("WARNING")  # we say what matters ourselves
        downloader = pooch.HTTPDownloader(progressbar=True, timeout=timeout, headers={"User-Agent": "tlpipe"})
        try:
            return Path(pooch.retrieve(url, known_hash, fname=dest.name, path=dest.parent, downloader=downloader))
        except requests.HTTPError as exc:
            why = f"HTTP {exc.response.status_code} {exc.response.reason}; check the URL"
        except requests.Timeout:
            why = f"no answer within {timeout:g} s"
        except (requests.RequestException, OSError) as exc:
            errno_text = re.search(r"\[Errno -?\d+\] [^'\")]+", str(exc))  # requests nests the cause deep
            why = f"cannot connect ({errno_text.group(0)})" if errno_text else str(exc)
        except ValueError as exc:  # pooch: the file does not match known_hash (it deleted it)
            raise error(f"{what}: {exc}") from None
    raise error(f"cannot download {what} from {url}: {why}. {hint}")
