"""The decoded-image cache: safetensors files written atomically under one cache folder.

Decoding thousands of PNG/JPEG files takes seconds to minutes; the decoded uint8 tensor loads in
milliseconds. Loaders key each cache file by the data source and every option that changes the
pixels (resolution, resampling filter), so a changed option never reads a stale file.
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
from collections.abc import Iterator
from pathlib import Path
from typing import BinaryIO

import torch

from metafunc.data.dataset import ClassImages

__all__ = [
    "default_cache_dir",
    "load_class_images",
    "open_temporary",
    "save_class_images",
    "write_atomic",
]

_FORMAT = "metafunc.ClassImages/1"


def default_cache_dir(cache_dir: str | os.PathLike[str] | None = None) -> Path:
    """The cache folder: ``cache_dir``, else ``$METAFUNC_CACHE``, else ``~/.cache/metafunc``."""
    if cache_dir is not None:
        return Path(cache_dir).expanduser()
    env = os.environ.get("METAFUNC_CACHE")
    if env:
        return Path(env).expanduser()
    return Path.home() / ".cache" / "metafunc"


def write_atomic(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` so that readers see the old file or the whole new one, never part.

    The bytes go to a temporary file in the same folder, are flushed to disk (``fsync``), and the
    file is renamed over ``path`` with ``os.replace``, which is atomic on POSIX and Windows.
    """
    with open_temporary(path) as (f, _):
        f.write(data)


@contextlib.contextmanager
def open_temporary(path: Path) -> Iterator[tuple[BinaryIO, Path]]:
    """Open a fresh temporary file beside ``path``; on success, fsync it and move it to ``path``.

    If the block raises, the temporary file is removed and ``path`` is untouched. The file gets
    the usual permissions (``0o666`` minus the umask), unlike ``tempfile.mkstemp``'s ``0o600``.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_BINARY", 0), 0o666)
    try:
        with os.fdopen(fd, "wb") as f:
            yield f, tmp
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)


def fsync_dir(folder: Path) -> None:
    """Flush the folder entry of a rename to disk where the platform allows it (not on Windows)."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def save_class_images(path: Path, data: ClassImages, *, source: str) -> None:
    """Store ``data`` at ``path`` as safetensors, class names and ``source`` in the metadata."""
    from safetensors.torch import save

    tensors = {"images": data.images.contiguous()}
    if data.counts is not None:
        tensors["counts"] = data.counts.to(torch.int64).contiguous()
    if data.drawers is not None:
        tensors["drawers"] = data.drawers.to(torch.int64).contiguous()
    metadata = {"format": _FORMAT, "source": source, "classes": json.dumps(list(data.classes))}
    write_atomic(path, save(tensors, metadata=metadata))


def load_class_images(path: Path) -> ClassImages | None:
    """The :class:`ClassImages` cached at ``path``, or ``None`` if there is no usable file there.

    An unreadable or foreign file counts as a miss (the caller decodes again and overwrites it):
    the cache holds derived data only.
    """
    if not path.is_file():
        return None
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            metadata = f.metadata() or {}
            if metadata.get("format") != _FORMAT:
                return None
            images = f.get_tensor("images")
            names = set(f.keys())
            counts = f.get_tensor("counts") if "counts" in names else None
            drawers = f.get_tensor("drawers") if "drawers" in names else None
            classes = tuple(json.loads(metadata["classes"]))
    except Exception:  # safetensors raises its own SafetensorError on a damaged header
        return None
    if len(classes) != images.shape[0]:
        return None
    return ClassImages(images, classes, counts, drawers)
