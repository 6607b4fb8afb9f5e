"""mini-ImageNet (Vinyals et al. 2016) with Ravi & Larochelle's (2017) 64 / 16 / 20 class split.

Two on-disk formats are read from ``<root>/mini-imagenet/``:

* Ravi & Larochelle's: ``train.csv``, ``val.csv``, ``test.csv`` with ``filename,label`` rows, and an
  ``images/`` folder holding every file named there (JPEGs of any size, resized here).
* The widely shared pickles ``mini-imagenet-cache-{train,val,test}.pkl``: a dict with
  ``image_data`` (uint8 ``[N, 84, 84, 3]``) and ``class_dict`` (``{label: [indices]}``).
  Unpickling can run arbitrary code: only load pickles from a source you trust.

If both exist, the pickle is used. Neither can be downloaded automatically (the images are
ImageNet's, under its terms of use).
"""

from __future__ import annotations

import csv
import hashlib
import os
import pickle
from pathlib import Path
from typing import Any

from metafunc.data.cache import default_cache_dir, load_class_images, save_class_images
from metafunc.data.dataset import ClassImages, ClassSplits, stack_classes
from metafunc.data.images import check_resample, decode_images

__all__ = ["MINI_IMAGENET_SPLITS", "load_mini_imagenet", "mini_imagenet_splits"]

MINI_IMAGENET_SPLITS = ("train", "val", "test")
_ALIASES = {"validation": "val"}


def load_mini_imagenet(
    root: str | os.PathLike[str],
    split: str = "train",
    *,
    image_size: int = 84,
    resample: str = "lanczos",
    cache_dir: str | os.PathLike[str] | None = None,
    cache: bool = True,
    workers: int | None = None,
) -> ClassImages:
    """One mini-ImageNet split as uint8 ``[classes, 600, 3, H, W]``, classes sorted by label.

    Args:
        root: the folder holding ``mini-imagenet/``.
        split: ``"train"`` (64 classes), ``"val"`` or ``"validation"`` (16), ``"test"`` (20).
        image_size: side of the square output images; JPEGs are resized with ``resample`` (Pillow
            LANCZOS by default, like MAML's preprocessing script). Pickled images are used as
            stored, so ``image_size`` must match them.
        cache_dir, cache: decoded-tensor cache for the CSV format (see ``load_omniglot``).
        workers: JPEG decoding processes (``None``: available cores, at most 8).
    """
    split = _ALIASES.get(split, split)
    call = f"load_mini_imagenet(split={split!r})"
    if split not in MINI_IMAGENET_SPLITS:
        raise ValueError(
            f"load_mini_imagenet: unknown split {split!r}; use one of {MINI_IMAGENET_SPLITS} "
            "('validation' also works)."
        )
    check_resample(resample, call=call)
    folder = Path(root).expanduser() / "mini-imagenet"
    pkl, table = folder / f"mini-imagenet-cache-{split}.pkl", folder / f"{split}.csv"
    if pkl.is_file():
        return _from_pickle(pkl, image_size, call=call)
    if not table.is_file():
        raise FileNotFoundError(
            f"{call}: found neither {table} nor {pkl}. Put Ravi & Larochelle's train.csv, val.csv, "
            f"test.csv and the images/ folder they name into {folder}/, or the pickles "
            "mini-imagenet-cache-{train,val,test}.pkl."
        )
    raw = table.read_bytes()
    images = folder / "images"
    digest = hashlib.md5(raw + str(images.resolve()).encode(), usedforsecurity=False).hexdigest()
    key = (
        default_cache_dir(cache_dir)
        / "mini-imagenet"
        / f"{split}-{digest[:16]}-{image_size}x{image_size}-{resample}.safetensors"
    )
    if cache and (hit := load_class_images(key)) is not None:
        return hit
    groups = _read_csv(raw.decode("utf-8"), table, call=call)
    labels = sorted(groups)
    files = [images / name for label in labels for name in groups[label]]
    pixels = decode_images(
        files, size=(image_size, image_size), mode="RGB", resample=resample, workers=workers,
        call=call,
    )  # fmt: skip
    arrays, start = [], 0
    for label in labels:
        arrays.append(pixels[start : start + len(groups[label])])
        start += len(groups[label])
    data = stack_classes(arrays, labels, call=call)
    if cache:
        save_class_images(key, data, source=f"mini-imagenet:{table}:{image_size}:{resample}")
    return data


def _read_csv(text: str, path: Path, *, call: str) -> dict[str, list[str]]:
    rows = list(csv.reader(text.splitlines()))
    if not rows or [c.strip() for c in rows[0]] != ["filename", "label"]:
        raise ValueError(
            f"{call}: {path} must start with the header 'filename,label' (Ravi & Larochelle's "
            f"format), found {rows[0] if rows else 'an empty file'}."
        )
    groups: dict[str, list[str]] = {}
    for number, row in enumerate(rows[1:], start=2):
        if not row:
            continue
        if len(row) != 2:
            raise ValueError(f"{call}: {path} line {number} has {len(row)} fields, expected 2.")
        groups.setdefault(row[1].strip(), []).append(row[0].strip())
    if not groups:
        raise ValueError(f"{call}: {path} lists no images; restore the original file.")
    return groups


def _from_pickle(path: Path, image_size: int, *, call: str) -> ClassImages:
    import numpy as np

    try:
        with open(path, "rb") as f:
            try:
                content: Any = pickle.load(f)
            except UnicodeDecodeError:  # pickled by Python 2
                f.seek(0)
                content = pickle.load(f, encoding="latin1")
    except (pickle.UnpicklingError, EOFError, ValueError, AttributeError, ImportError) as err:
        raise ValueError(
            f"{call}: cannot unpickle {path} ({type(err).__name__}: {err}); the file is corrupt "
            "or not a mini-ImageNet cache pickle. Replace it with a good copy."
        ) from err
    if not isinstance(content, dict) or not {"image_data", "class_dict"} <= set(content):
        found = sorted(content) if isinstance(content, dict) else type(content).__name__
        raise ValueError(
            f"{call}: {path} must hold a dict with keys 'image_data' and 'class_dict', found "
            f"{found}."
        )
    pixels = np.asarray(content["image_data"])
    if pixels.dtype != np.uint8 or pixels.ndim != 4 or pixels.shape[-1] != 3:
        raise ValueError(
            f"{call}: {path}: image_data is {pixels.dtype} {pixels.shape}; expected uint8 "
            "[N, H, W, 3]."
        )
    if pixels.shape[1:3] != (image_size, image_size):
        raise ValueError(
            f"{call}: the pickled images are {pixels.shape[1]}x{pixels.shape[2]} but "
            f"image_size={image_size}; pass image_size={pixels.shape[1]}, or use the CSV + "
            "images/ format, which is resized on load."
        )
    class_dict = content["class_dict"]
    labels = sorted(class_dict)
    arrays = []
    for label in labels:
        index = np.asarray(class_dict[label], dtype=np.int64)
        if index.size and (index.min() < 0 or index.max() >= len(pixels)):
            raise ValueError(
                f"{call}: {path}: class_dict[{label!r}] indexes past the {len(pixels)} images."
            )
        arrays.append(pixels[index])
    return stack_classes(arrays, [str(label) for label in labels], call=call)


def mini_imagenet_splits(root: str | os.PathLike[str], **options: Any) -> ClassSplits:
    """The train / val / test splits; ``options`` are :func:`load_mini_imagenet`'s."""
    return ClassSplits(
        *(load_mini_imagenet(root, split, **options) for split in MINI_IMAGENET_SPLITS)
    )
