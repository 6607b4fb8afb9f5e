"""CUB-200-2011 (Wah et al. 2011) as a few-shot benchmark: 200 bird species split 100 / 50 / 50.

Read from the official release unpacked at ``<root>/CUB_200_2011/`` (``images.txt``,
``image_class_labels.txt``, ``classes.txt``, ``bounding_boxes.txt``, ``images/<NNN.Name>/*.jpg``),
or from the official ``<root>/CUB_200_2011.tgz``, md5-checked and unpacked there when the folder
is missing.

The split is Chen et al.'s (2019, "A Closer Look at Few-shot Classification", their
``filelists/CUB/write_CUB_filelist.py``): number the 200 class folders in sorted order from 0
(index = class id - 1); training takes index % 2 == 0 (100 classes), validation index % 4 == 1
(50), test index % 4 == 3 (50). torchmeta's CUB, which credits the few-shot benchmark to Hilliard
et al. (2018), ships the same class lists. Chen et al. use whole images, the default here;
``crop="bbox"`` first crops each image to its annotated bounding box.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from metafunc.data.archive import extract_folder
from metafunc.data.cache import default_cache_dir, load_class_images, save_class_images
from metafunc.data.dataset import ClassSplits, check_disjoint, stack_classes
from metafunc.data.download import check_md5
from metafunc.data.images import check_resample, check_size, decode_images

if TYPE_CHECKING:
    import numpy as np

__all__ = ["CUB_MD5", "cub_split_of", "cub_splits"]

CUB_MD5 = "97eceeb196236b17998738112f37df78"
"""md5 of the official ``CUB_200_2011.tgz`` (as checked by torchmeta)."""
CUB_PAGE = "https://www.vision.caltech.edu/datasets/cub_200_2011/"
CROPS = ("none", "bbox")
_TABLES = ("images.txt", "image_class_labels.txt", "classes.txt")


def cub_split_of(class_id: int) -> str:
    """Chen et al.'s split of CUB's class ``class_id`` (1 to 200): ``"train"``, ``"val"`` or
    ``"test"``."""
    index = class_id - 1
    return "train" if index % 2 == 0 else "val" if index % 4 == 1 else "test"


def cub_splits(
    root: str | os.PathLike[str],
    *,
    image_size: int = 84,
    resample: str = "lanczos",
    crop: str = "none",
    cache_dir: str | os.PathLike[str] | None = None,
    cache: bool = True,
    workers: int | None = None,
) -> ClassSplits:
    """CUB's train / val / test splits as uint8 ``[classes, examples, 3, H, W]`` (100 / 50 / 50).

    Classes are named as in ``classes.txt`` (e.g. ``"001.Black_footed_Albatross"``) and hold 41 to
    60 images each (``counts`` marks the zero padding).

    Args:
        root: the folder holding ``CUB_200_2011/`` or ``CUB_200_2011.tgz``.
        image_size: side of the square output images (resized with ``resample``).
        crop: ``"none"`` (whole images, as Chen et al.) or ``"bbox"`` (the bird's bounding box).
        cache_dir, cache: decoded-tensor cache, keyed by the index files, the folder and the
            options above.
        workers: decoding processes for whole images; cropped images decode in this process.
    """
    call = "cub_splits(...)"
    size = check_size(image_size, call=call)
    check_resample(resample, call=call)
    if crop not in CROPS:
        raise ValueError(f"{call}: crop={crop!r}; use one of {CROPS}.")
    root = Path(root).expanduser()
    folder = root / "CUB_200_2011"
    needed = _TABLES + (("bounding_boxes.txt",) if crop == "bbox" else ())
    if not all((folder / name).is_file() for name in needed):
        _unpack(root, needed, call=call)
    rows = {name: _rows(folder / name, call=call) for name in needed}
    names = {int(i): name for i, name in rows["classes.txt"]}
    label = {int(i): int(c) for i, c in rows["image_class_labels.txt"]}
    ids = sorted(names)
    groups: dict[int, list[int]] = {c: [] for c in ids}
    for image, _ in sorted(rows["images.txt"], key=lambda r: int(r[0])):
        if label.get(int(image)) not in groups:
            raise ValueError(
                f"{call}: image {image} of {folder / 'images.txt'} has no class in "
                "image_class_labels.txt / classes.txt; restore the original files."
            )
        groups[label[int(image)]].append(int(image))
    digest = hashlib.md5(usedforsecurity=False)
    for name in needed:
        digest.update((folder / name).read_bytes())
    digest.update(repr((str(folder.resolve()), size, resample, crop)).encode())
    key = (
        default_cache_dir(cache_dir)
        / "cub"
        / f"{digest.hexdigest()[:20]}-{size[0]}x{size[1]}-{resample}-{crop}.safetensors"
    )
    data = load_class_images(key) if cache else None
    if data is None:
        path = {int(i): folder / "images" / p for i, p in rows["images.txt"]}
        files = [path[i] for c in ids for i in groups[c]]
        if crop == "bbox":
            box = {int(r[0]): tuple(float(v) for v in r[1:]) for r in rows["bounding_boxes.txt"]}
            pixels = _cropped(files, [box[i] for c in ids for i in groups[c]], size, resample, call)
        else:
            pixels = decode_images(
                files, size=size, mode="RGB", resample=resample, workers=workers, call=call
            )
        arrays, start = [], 0
        for c in ids:
            arrays.append(pixels[start : start + len(groups[c])])
            start += len(groups[c])
        data = stack_classes(arrays, [names[c] for c in ids], call=call)
        if cache:
            save_class_images(key, data, source=f"cub:{folder}:{size}:{resample}:{crop}")
    split = {s: [names[c] for c in ids if cub_split_of(c) == s] for s in ("train", "val", "test")}
    check_disjoint(split, call=call)
    return ClassSplits(*(data.select_names(v, call=call) for v in split.values()))


def _rows(path: Path, *, call: str) -> list[list[str]]:
    """The whitespace-separated rows of one of CUB's index files, each an id and its fields."""
    width = 5 if path.name == "bounding_boxes.txt" else 2
    rows = [line.split() for line in path.read_text().splitlines() if line.strip()]
    for number, row in enumerate(rows, start=1):
        if len(row) != width or not row[0].isdigit():
            raise ValueError(
                f"{call}: {path} line {number} is {' '.join(row)!r}; expected an id and "
                f"{width - 1} field(s). Restore the file from CUB_200_2011.tgz."
            )
    return rows


def _cropped(
    files: Sequence[Path],
    boxes: Sequence[tuple[float, ...]],
    size: tuple[int, int],
    resample: str,
    call: str,
) -> np.ndarray:
    """Decode ``files``, crop each to its ``(x, y, width, height)`` box, resize to ``size``."""
    import numpy as np
    from PIL import Image

    out = np.empty((len(files), size[0], size[1], 3), dtype=np.uint8)
    for i, (path, (x, y, w, h)) in enumerate(zip(files, boxes, strict=True)):
        try:
            with Image.open(path) as image:
                picture = image.convert("RGB")
        except FileNotFoundError as err:
            raise FileNotFoundError(f"{call}: image file {path} does not exist ({err}).") from err
        except (OSError, ValueError, SyntaxError) as err:
            raise ValueError(f"{call}: cannot decode image {path}: {err}.") from err
        left, top = max(0, round(x)), max(0, round(y))
        right = min(picture.width, max(left + 1, round(x + w)))
        bottom = min(picture.height, max(top + 1, round(y + h)))
        picture = picture.crop((left, top, right, bottom))
        filt = getattr(Image.Resampling, resample.upper())
        out[i] = np.asarray(picture.resize((size[1], size[0]), filt), dtype=np.uint8)
    return out


def _unpack(root: Path, needed: tuple[str, ...], *, call: str) -> None:
    archive = root / "CUB_200_2011.tgz"
    if not archive.is_file():
        raise FileNotFoundError(
            f"{call}: found neither {root / 'CUB_200_2011'}/ with {', '.join(needed)} and "
            f"images/, nor {archive}. Download CUB_200_2011.tgz (md5 {CUB_MD5}) from {CUB_PAGE} "
            f"and put it at {archive}, or unpack it in {root}/."
        )
    check_md5(archive, CUB_MD5, call=call)
    extract_folder(archive, "CUB_200_2011", call=call)
