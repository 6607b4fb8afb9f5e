"""Decode image files (on disk or inside zip archives) into uint8 arrays, in parallel processes.

Each image is opened with Pillow, converted to ``"L"`` (grey) or ``"RGB"``, resized with the chosen
Pillow filter when its size differs from the target, and optionally inverted (``255 - x``) after
resizing. Work is split into chunks decoded by forked worker processes on Linux (Pillow's per-image
Python overhead dominates small images, so threads do not help); elsewhere it runs in-process.
"""

from __future__ import annotations

import io
import multiprocessing
import os
import sys
import warnings
import zipfile
import zlib
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import numpy as np

__all__ = ["RESAMPLING", "ImageSource", "decode_images", "describe_source"]

ImageSource = str | Path | tuple[str, str]
"""A file path, or ``(zip path, member name)`` for an image inside a zip archive."""

RESAMPLING = ("lanczos", "bilinear", "bicubic", "box", "hamming", "nearest")
"""Names of the Pillow resampling filters a loader accepts."""

_MIN_PARALLEL = 512  # below this many images, starting worker processes costs more than it saves


def describe_source(source: ImageSource) -> str:
    """A readable name for an image source, used in error messages."""
    if isinstance(source, tuple):
        return f"{source[0]}!{source[1]}"
    return str(source)


def check_resample(resample: str, *, call: str) -> None:
    if resample not in RESAMPLING:
        raise ValueError(
            f"{call}: resample={resample!r} is not a Pillow filter name; use one of {RESAMPLING}."
        )


def check_size(image_size: int | Sequence[int], *, call: str) -> tuple[int, int]:
    """``(height, width)`` from an int or a pair; anything else raises ``ValueError``."""
    size = (image_size, image_size) if isinstance(image_size, int) else tuple(image_size)
    if len(size) != 2 or any(isinstance(s, bool) or not isinstance(s, int) or s < 1 for s in size):
        raise ValueError(f"{call}: image_size={image_size!r}; pass an int or (height, width).")
    return (int(size[0]), int(size[1]))


def decode_images(
    sources: Sequence[ImageSource],
    *,
    size: tuple[int, int],
    mode: str,
    resample: str,
    invert: bool = False,
    workers: int | None = None,
    call: str,
) -> np.ndarray:
    """Decode ``sources`` into one uint8 array ``[N, H, W]`` (mode ``"L"``) or ``[N, H, W, 3]``.

    Args:
        sources: image files or ``(zip, member)`` pairs.
        size: target ``(height, width)``.
        mode: ``"L"`` for grey or ``"RGB"`` for colour.
        resample: a name from :data:`RESAMPLING`; used only for images not already at ``size``.
        invert: return ``255 - x`` (after resizing), e.g. to make black-on-white drawings white on
            black.
        workers: worker processes; ``None`` uses the available cores (at most 8), ``0`` or ``1``
            decodes in this process.
        call: the public call, named in error messages.

    Raises:
        FileNotFoundError: a file is missing. ValueError: a file is not a readable image (the
            message names it).
    """
    import numpy as np

    check_resample(resample, call=call)
    if mode not in ("L", "RGB"):
        raise ValueError(f"{call}: mode={mode!r}; use 'L' (grey) or 'RGB' (colour).")
    height, width = size
    shape = (height, width) if mode == "L" else (height, width, 3)
    if not sources:
        return np.zeros((0, *shape), dtype=np.uint8)
    if workers is None:
        workers = min(_available_cores(), 8)
    options = (height, width, mode, resample, invert)
    parallel = (
        workers > 1
        and len(sources) >= _MIN_PARALLEL
        and sys.platform.startswith("linux")
        and not multiprocessing.current_process().daemon  # e.g. a DataLoader worker
    )
    if not parallel:
        results = [_decode_chunk((list(sources), options))]
    else:
        step = -(-len(sources) // (workers * 4))
        chunks = [(list(sources[i : i + step]), options) for i in range(0, len(sources), step)]
        with warnings.catch_warnings():
            # Python >= 3.12 warns about fork() in a process with threads; the workers only run
            # Pillow and NumPy, never torch, so the usual fork hazards do not apply.
            warnings.simplefilter("ignore", DeprecationWarning)
            with multiprocessing.get_context("fork").Pool(workers) as pool:
                results = pool.map(_decode_chunk, chunks)
    out = np.empty((len(sources), *shape), dtype=np.uint8)
    start = 0
    for result in results:
        if isinstance(result, tuple):
            kind, where, message = result
            if kind == "missing":
                raise FileNotFoundError(
                    f"{call}: image file {where} does not exist ({message}). Restore it, or "
                    "remove it from the dataset's index."
                )
            raise ValueError(
                f"{call}: cannot decode image {where}: {message}. The file is corrupt or not an "
                "image; replace it with a good copy (re-download or re-extract the dataset), "
                "or delete it."
            )
        out[start : start + len(result)] = result
        start += len(result)
    return out


def _available_cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def _decode_chunk(job: tuple[list[ImageSource], tuple[int, int, str, str, bool]]) -> Any:
    """Decode one chunk; returns the array, or ``(kind, source, message)`` on the first failure.

    Failures are returned, not raised, so the parent builds one clear error with the file name.
    """
    import numpy as np
    from PIL import Image, UnidentifiedImageError

    sources, (height, width, mode, resample, invert) = job
    filt = getattr(Image.Resampling, resample.upper())
    shape = (height, width) if mode == "L" else (height, width, 3)
    out = np.empty((len(sources), *shape), dtype=np.uint8)
    archives: dict[str, zipfile.ZipFile] = {}
    try:
        for i, source in enumerate(sources):
            try:
                if isinstance(source, tuple):
                    archive = archives.get(source[0])
                    if archive is None:
                        archive = archives[source[0]] = zipfile.ZipFile(source[0])
                    handle: Any = io.BytesIO(archive.read(source[1]))
                else:
                    handle = source
                with Image.open(handle) as image:
                    image.load()
                    picture = image.convert(mode)
            except FileNotFoundError as err:
                return ("missing", describe_source(source), str(err))
            except (
                UnidentifiedImageError,
                OSError,
                SyntaxError,
                ValueError,
                KeyError,
                zipfile.BadZipFile,
                zlib.error,
            ) as err:
                return ("corrupt", describe_source(source), f"{type(err).__name__}: {err}")
            if picture.size != (width, height):
                picture = picture.resize((width, height), filt)
            array = np.asarray(picture, dtype=np.uint8)
            out[i] = 255 - array if invert else array
    finally:
        for archive in archives.values():
            archive.close()
    return out
