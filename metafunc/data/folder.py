"""Your own images, one folder per class: ``<root>/<class>/*.png|jpg|jpeg``.

Every image is converted to grey (``channels=1``) or RGB (``channels=3``) and resized to
``image_size``. Classes may hold different numbers of images; the shorter ones are zero-padded and
:class:`~metafunc.data.ClassImages` ``.counts`` keeps samplers off the padding.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from metafunc.data.cache import default_cache_dir, load_class_images, save_class_images
from metafunc.data.dataset import ClassImages, ClassSplits, check_disjoint, stack_classes
from metafunc.data.images import check_resample, check_size, decode_images

__all__ = ["FOLDER_SPLITS", "folder_splits", "load_folder"]

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg")
FOLDER_SPLITS = ("train", "validation", "test")


def load_folder(
    root: str | os.PathLike[str],
    classes: Sequence[str] | None = None,
    *,
    image_size: int | tuple[int, int] = 84,
    channels: int = 3,
    resample: str = "lanczos",
    extensions: Sequence[str] = IMAGE_EXTENSIONS,
    cache_dir: str | os.PathLike[str] | None = None,
    cache: bool = True,
    workers: int | None = None,
) -> ClassImages:
    """Images from ``<root>/<class>/`` folders as uint8 ``[classes, examples, C, H, W]``.

    Args:
        root: the folder whose subfolders are the classes.
        classes: the subfolders to load, in this order (default: all, sorted by name).
        image_size: output size (int or ``(height, width)``).
        channels: 1 (grey, ``[classes, examples, H, W]``) or 3 (RGB).
        resample: Pillow filter used for resizing (default LANCZOS).
        extensions: file suffixes that count as images (case-insensitive).
        cache_dir, cache: decoded-tensor cache, keyed by the folder, its file names, sizes and
            modification times, and the options above.
        workers: decoding processes (``None``: available cores, at most 8).
    """
    call = f"load_folder({str(root)!r})"
    size = check_size(image_size, call=call)
    check_resample(resample, call=call)
    if channels not in (1, 3):
        raise ValueError(f"{call}: channels={channels!r}; use 1 (grey) or 3 (RGB).")
    folder = Path(root).expanduser()
    if not folder.is_dir():
        raise FileNotFoundError(
            f"{call}: {folder} is not a folder. Pass the folder that holds one subfolder per "
            "class: <root>/<class>/*.png|jpg."
        )
    available = sorted(
        p.name for p in folder.iterdir() if p.is_dir() and not p.name.startswith(".")
    )
    if not available:
        raise ValueError(
            f"{call}: {folder} has no class subfolders; arrange the images as "
            "<root>/<class>/*.png|jpg (one subfolder per class)."
        )
    names = list(available if classes is None else classes)
    unknown = [n for n in names if n not in available]
    if unknown:
        raise ValueError(
            f"{call}: no class folder(s) {unknown[:5]} in {folder}; the classes there are "
            f"{available[:10]}{' ...' if len(available) > 10 else ''}."
        )
    if len(set(names)) != len(names):
        raise ValueError(f"{call}: classes lists a name twice; each class can appear once.")
    suffixes = tuple(e.lower() for e in extensions)
    files: list[list[Path]] = []
    for name in names:
        found = sorted(
            p for p in (folder / name).iterdir() if p.is_file() and p.suffix.lower() in suffixes
        )
        if not found:
            raise ValueError(
                f"{call}: class folder {folder / name} holds no {'/'.join(suffixes)} files; add "
                "images or leave the class out (classes=...)."
            )
        files.append(found)
    fingerprint = hashlib.md5(usedforsecurity=False)
    fingerprint.update(repr((str(folder.resolve()), size, channels, resample)).encode())
    for group in files:
        for path in group:
            stat = path.stat()
            fingerprint.update(
                f"{path.parent.name}/{path.name}:{stat.st_size}:{stat.st_mtime_ns};".encode()
            )
    key = (
        default_cache_dir(cache_dir)
        / "folder"
        / f"{folder.name}-{fingerprint.hexdigest()[:20]}.safetensors"
    )
    if cache and (hit := load_class_images(key)) is not None:
        return hit
    pixels = decode_images(
        [p for group in files for p in group],
        size=size, mode="L" if channels == 1 else "RGB", resample=resample, workers=workers,
        call=call,
    )  # fmt: skip
    arrays, start = [], 0
    for group in files:
        arrays.append(pixels[start : start + len(group)])
        start += len(group)
    data = stack_classes(arrays, names, call=call)
    if cache:
        save_class_images(key, data, source=f"folder:{folder}")
    return data


def folder_splits(
    root: str | os.PathLike[str],
    split: Mapping[str, Sequence[str]],
    **options: Any,
) -> ClassSplits:
    """Train / validation / test class sets of a class-per-folder dataset, named by you.

    Args:
        root: the folder whose subfolders are the classes.
        split: ``{"train": [...], "test": [...]}`` with an optional ``"validation"`` list of class
            folder names; the lists must be disjoint.
        options: :func:`load_folder`'s keyword arguments.

    Example:
        >>> folder_splits("pets", {"train": ["cat", "dog", "hamster"], "test": ["owl", "pig"]})
    """
    call = "folder_splits(...)"
    if not isinstance(split, Mapping):
        raise TypeError(
            f"{call}: split must be a mapping like {{'train': [...], 'validation': [...], "
            f"'test': [...]}} of class folder names, got {type(split).__name__}."
        )
    unknown = sorted(set(split) - set(FOLDER_SPLITS))
    if unknown or "train" not in split or "test" not in split:
        raise ValueError(
            f"{call}: split has keys {sorted(split)}; it needs 'train' and 'test' and may have "
            "'validation', each a list of class folder names."
        )
    for k, names in split.items():
        if isinstance(names, str) or not names:
            raise ValueError(
                f"{call}: split[{k!r}] is {names!r}; pass a non-empty list of class folder names."
            )
    lists = {k: list(v) for k, v in split.items()}
    check_disjoint(lists, call=call)
    order = [name for k in FOLDER_SPLITS for name in lists.get(k, [])]
    everything = load_folder(root, order, **options)
    parts = {k: everything.select_names(v, call=call) for k, v in lists.items()}
    return ClassSplits(parts["train"], parts.get("validation"), parts["test"])
