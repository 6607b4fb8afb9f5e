"""Checksums and atomic downloads of dataset archives."""

from __future__ import annotations

import hashlib
import os
import urllib.error
import urllib.request
from pathlib import Path

from metafunc.data.cache import open_temporary

__all__ = ["ChecksumError", "check_md5", "download_file", "md5sum"]

_CHUNK = 1 << 20


class ChecksumError(ValueError):
    """A file's digest differs from the published one: corrupt, truncated or not the original."""


def md5sum(path: str | os.PathLike[str]) -> str:
    """The hexadecimal md5 digest of the file at ``path``."""
    digest = hashlib.md5(usedforsecurity=False)
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def check_md5(path: str | os.PathLike[str], expected: str, *, call: str) -> None:
    """Raise :class:`ChecksumError` (naming ``path`` and both digests) unless md5 matches."""
    actual = md5sum(path)
    if actual != expected:
        raise ChecksumError(
            f"{call}: {path} has md5 {actual}, expected {expected}; the file is corrupt, "
            "truncated or not the official release. Delete it and download it again "
            "(download=True), or copy a good file there."
        )


def download_file(url: str, path: Path, *, md5: str, call: str, timeout: float = 60.0) -> Path:
    """Download ``url`` to ``path``, verify its md5, and only then move it into place.

    The bytes stream into a temporary file beside ``path`` (hashed on the way), which is flushed to
    disk and renamed over ``path`` with ``os.replace`` once the digest matches, so an interrupted or
    corrupt download never leaves a file at ``path``.

    Raises:
        ConnectionError: the URL cannot be fetched (no internet, server error); the message says
            where to put the file by hand.
        ChecksumError: the downloaded bytes do not have the expected md5.
    """

    def failed(err: Exception) -> ConnectionError:
        return ConnectionError(
            f"{call}: could not download {url} ({err}). Without internet access, fetch the file "
            f"elsewhere and put it at {path} (md5 {md5})."
        )

    digest = hashlib.md5(usedforsecurity=False)
    with open_temporary(path) as (out, _):
        try:
            response = urllib.request.urlopen(url, timeout=timeout)
        except (urllib.error.URLError, OSError) as err:
            raise failed(err) from err
        with response:
            while True:
                try:
                    chunk = response.read(_CHUNK)
                except OSError as err:  # connection dropped or timed out mid-way
                    raise failed(err) from err
                if not chunk:
                    break
                digest.update(chunk)
                out.write(chunk)
        actual = digest.hexdigest()
        if actual != md5:
            raise ChecksumError(
                f"{call}: the download of {url} (for {path}) has md5 {actual}, expected {md5}; "
                "the server sent a corrupt or different file. Nothing was written; try again "
                "later, or put a good copy at that path."
            )
    return path
