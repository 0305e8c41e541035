"""Cached, verified, atomic, retried downloads of weight files (standard library only).

PaddleClas caches by basename, never verifies, and reuses a truncated file forever. Here:

- a download goes to a temporary file in the cache dir and is ``os.replace``d onto the final name
  only after its size (``Content-Length`` / ``expected_size``) and sha256 (when known) check out,
  so the final name never holds a partial file;
- a sidecar ``<name>.json`` records url, size and the sha256 computed while downloading; a cached
  file is reused only when it matches the known checksum or its sidecar, otherwise re-fetched;
- connection errors, timeouts, 5xx answers and short reads are retried with exponential backoff;
  the final error names the URL and the cache path.

Cache dir: ``$PPCLS_FT_CACHE`` if set, else ``~/.cache/ppcls_ft/weights``.
"""
import hashlib
import http.client
import json
import os
import socket
import tempfile
import time
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path
from typing import Optional

from ..errors import WeightsError

CHUNK = 1 << 20  # 1 MiB reads: few syscalls, small memory


class _RetryableError(Exception):
    """A failure another attempt may fix (short read, connection reset, 5xx)."""


def default_cache_dir() -> Path:
    """``$PPCLS_FT_CACHE`` or ``~/.cache/ppcls_ft/weights``."""
    env = os.environ.get("PPCLS_FT_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "ppcls_ft" / "weights"


def url_basename(url) -> str:
    name = os.path.basename(urllib.parse.urlparse(url).path)
    if not name:
        raise WeightsError(f"cannot name a cache file after {url!r}: the URL path has no file name")
    return name


def sha256_of(path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(CHUNK), b""):
            digest.update(block)
    return digest.hexdigest()


def _sidecar(path) -> Path:
    return path.with_name(path.name + ".json")


def _cached_ok(path, sha256, expected_size, logger):
    """True when ``path`` exists and matches the known checksum / size or its sidecar record."""
    if not path.is_file():
        return False
    size = path.stat().st_size
    record = {}
    try:
        record = json.loads(_sidecar(path).read_text())
    except (OSError, ValueError):
        pass
    want_size = expected_size if expected_size is not None else record.get("size")
    want_sha = sha256 or record.get("sha256")
    if want_sha is None:
        logger(f"cached {path} has no checksum record (not written by ppcls_ft?); re-downloading")
        return False
    if want_size is not None and size != want_size:
        logger(f"cached {path} is {size} bytes, expected {want_size} (truncated?); re-downloading")
        return False
    if sha256_of(path) != want_sha.lower():
        logger(f"cached {path} fails its sha256 check (corrupt?); re-downloading")
        return False
    return True


def _fetch_once(url, dest, timeout):
    """Stream ``url`` into open file ``dest``; returns (bytes written, sha256 hex)."""
    digest = hashlib.sha256()
    written = 0
    request = urllib.request.Request(url, headers={"User-Agent": "ppcls_ft"})
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            length = response.headers.get("Content-Length")
            length = int(length) if length is not None else None
            while True:
                block = response.read(CHUNK)
                if not block:
                    break
                dest.write(block)
                digest.update(block)
                written += len(block)
    except urllib.error.HTTPError as exc:
        if exc.code >= 500 or exc.code == 429:
            raise _RetryableError(f"HTTP {exc.code} {exc.reason}") from exc
        raise WeightsError(f"HTTP {exc.code} {exc.reason} for {url}") from exc
    except (urllib.error.URLError, http.client.HTTPException, ConnectionError,
            socket.timeout, TimeoutError) as exc:
        raise _RetryableError(f"{type(exc).__name__}: {exc}") from exc
    if length is not None and written != length:
        raise _RetryableError(f"short read: got {written} of {length} bytes")
    return written, digest.hexdigest()


def _attempt(url, final, sha256, expected_size, timeout):
    """One download into a temp file beside ``final``; verified, then renamed. Returns size."""
    fd, tmp = tempfile.mkstemp(dir=final.parent, prefix=final.name + ".", suffix=".part")
    try:
        with os.fdopen(fd, "wb") as dest:
            size, digest = _fetch_once(url, dest, timeout)
            dest.flush()
            os.fsync(dest.fileno())
        if expected_size is not None and size != expected_size:
            raise _RetryableError(f"got {size} bytes, expected {expected_size}")
        if sha256 and digest != sha256.lower():
            raise WeightsError(f"sha256 mismatch for {url}: got {digest}, expected {sha256.lower()}; "
                               f"nothing was written to {final}")
        os.replace(tmp, final)
        tmp = None
        _write_sidecar(final, url, size, digest)
        return size
    finally:
        if tmp is not None and os.path.exists(tmp):
            os.remove(tmp)


def _write_sidecar(final, url, size, digest):
    side = _sidecar(final)
    tmp = side.with_name(side.name + ".tmp")
    tmp.write_text(json.dumps({"url": url, "size": size, "sha256": digest}))
    os.replace(tmp, side)


def download(url, *, cache_dir=None, sha256: Optional[str] = None, expected_size: Optional[int] = None,
             retries: int = 3, timeout: float = 30, backoff: float = 1.0, logger=print) -> Path:
    """Return the local path of ``url``, downloading it into the cache when needed.

    ``retries`` is the number of attempts; waits ``backoff * 2**i`` seconds between them.
    Raises ``WeightsError`` naming the URL and the cache path when every attempt failed.
    """
    cache = Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir()
    cache.mkdir(parents=True, exist_ok=True)
    final = cache / url_basename(url)
    if _cached_ok(final, sha256, expected_size, logger):
        return final
    last = None
    for attempt in range(max(1, retries)):
        if attempt:
            time.sleep(backoff * 2 ** (attempt - 1))
        logger(f"downloading {url} -> {final} (attempt {attempt + 1}/{max(1, retries)})")
        try:
            size = _attempt(url, final, sha256, expected_size, timeout)
        except _RetryableError as exc:
            last = exc
            logger(f"download of {url} failed: {exc}")
            continue
        logger(f"downloaded {size / 1e6:.1f} MB to {final}")
        return final
    raise WeightsError(f"could not download {url} to {final} after {max(1, retries)} attempts "
                       f"(last error: {last}); check the network or place the file there yourself "
                       f"and point Arch.pretrained at it")
