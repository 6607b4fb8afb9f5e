"""tiered-ImageNet (Ren et al. 2018): 608 ImageNet classes split 351 / 97 / 160 by category.

The classes come from 34 high-level ImageNet categories split 20 / 6 / 8, so no test class shares
a category with a training class: a wider gap than mini-ImageNet's. Images are 84x84 RGB.

For each split (``train``, ``val``, ``test``) the first of these in ``<root>/tiered-imagenet/`` is
read:

* the authors' release (github.com/renmengye/few-shot-ssl-public; what learn2learn and torchmeta
  download): ``<split>_images_png.pkl``, a pickled list of PNG files (bytes or uint8 arrays), and
  ``<split>_labels.pkl``, a pickled dict whose ``label_specific`` (an int per image) indexes
  ``label_specific_str`` (class names). The PNGs are decoded, resized if ``image_size`` differs,
  and cached.
* its decompressed form ``<split>_images.npz`` (``images``: uint8 ``[N, 84, 84, 3]``) with the
  same labels pickle, used as stored. The authors write it with OpenCV, so its channels are BGR;
  they are reversed here.
* ImageNet's own images, ``<split>/<wnid>/*.JPEG`` (or png), read with :func:`load_folder`.

Pickles are read with :func:`~metafunc.data.safe_pickle.safe_load`, which refuses anything but
plain data and NumPy arrays.
"""

from __future__ import annotations

import collections
import hashlib
import io
import os
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from metafunc.data.cache import default_cache_dir, load_class_images, save_class_images
from metafunc.data.dataset import ClassImages, ClassSplits, check_disjoint, stack_classes
from metafunc.data.folder import load_folder
from metafunc.data.images import check_resample, check_size
from metafunc.data.safe_pickle import safe_load

if TYPE_CHECKING:
    import numpy as np

__all__ = ["TIERED_SPLITS", "tiered_imagenet_splits"]

TIERED_SPLITS = ("train", "val", "test")
_KEYS = frozenset({"label_specific", "label_specific_str"})
_FIX = "Replace it with the file from the authors' tiered-imagenet archive."


def tiered_imagenet_splits(
    root: str | os.PathLike[str],
    *,
    image_size: int = 84,
    resample: str = "lanczos",
    cache_dir: str | os.PathLike[str] | None = None,
    cache: bool = True,
    workers: int | None = None,
) -> ClassSplits:
    """The train / val / test splits as uint8 ``[classes, examples, 3, H, W]`` (351 / 97 / 160).

    Classes are named by the release's ``label_specific_str`` (a name that occurs twice gets its
    split and label appended), or by wnid for image folders.

    Args:
        root: the folder holding ``tiered-imagenet/``.
        image_size: side of the square output images; PNGs and image files are resized with
            ``resample``, the npz is used as stored, so ``image_size`` must match it.
        cache_dir, cache: decoded-tensor cache for PNG pickles and image folders.
        workers: decoding processes for image folders (PNG pickles decode in this process).
    """
    call = "tiered_imagenet_splits(...)"
    check_size(image_size, call=call)
    check_resample(resample, call=call)
    folder = Path(root).expanduser() / "tiered-imagenet"
    parts: dict[str, ClassImages] = {}
    pickled = []
    for split in TIERED_SPLITS:
        pngs, npz = folder / f"{split}_images_png.pkl", folder / f"{split}_images.npz"
        if pngs.is_file() or npz.is_file():
            pickled.append(split)
            parts[split] = _from_pickles(
                pngs if pngs.is_file() else npz, folder / f"{split}_labels.pkl", image_size,
                resample, cache_dir, cache, call,
            )  # fmt: skip
        elif (folder / split).is_dir():
            parts[split] = load_folder(
                folder / split, image_size=image_size, channels=3, resample=resample,
                cache_dir=cache_dir, cache=cache, workers=workers,
            )  # fmt: skip
        else:
            raise FileNotFoundError(
                f"{call}: no {split!r} split in {folder}/. Put the authors' {pngs.name} and "
                f"{split}_labels.pkl there (from the tiered-imagenet archive linked at "
                f"github.com/renmengye/few-shot-ssl-public), or {npz.name} with "
                f"{split}_labels.pkl, or ImageNet images as {folder / split}/<wnid>/*.JPEG."
            )
    # The release names classes by ImageNet's words, which can repeat across synsets.
    seen = collections.Counter(n for split in pickled for n in parts[split].classes)
    for split in pickled:
        names = [
            n if seen[n] == 1 else f"{n} ({split} {j})" for j, n in enumerate(parts[split].classes)
        ]
        parts[split] = parts[split]._replace(classes=tuple(names))
    check_disjoint({split: part.classes for split, part in parts.items()}, call=call)
    return ClassSplits(parts["train"], parts["val"], parts["test"])


def _from_pickles(
    images: Path,
    labels: Path,
    image_size: int,
    resample: str,
    cache_dir: str | os.PathLike[str] | None,
    cache: bool,
    call: str,
) -> ClassImages:
    import numpy as np

    if not labels.is_file():
        raise FileNotFoundError(f"{call}: {images} needs {labels.name} beside it; copy it there.")
    png = images.suffix == ".pkl"
    stamp = [(str(p.resolve()), p.stat().st_size, p.stat().st_mtime_ns) for p in (images, labels)]
    digest = hashlib.md5(repr((stamp, image_size, resample)).encode(), usedforsecurity=False)
    key = (
        default_cache_dir(cache_dir)
        / "tiered-imagenet"
        / f"{images.name}-{digest.hexdigest()[:16]}-{image_size}-{resample}.safetensors"
    )
    if png and cache and (hit := load_class_images(key)) is not None:
        return hit
    content = safe_load(labels, call=call, fix=_FIX)
    if isinstance(content, dict):
        content = {k.decode() if isinstance(k, bytes) else k: v for k, v in content.items()}
    if not isinstance(content, dict) or not _KEYS.issubset(content):
        raise ValueError(f"{call}: {labels} must hold a dict with keys {sorted(_KEYS)}. {_FIX}")
    specific = np.asarray(content["label_specific"]).astype(np.int64).reshape(-1)
    names = [n.decode() if isinstance(n, bytes) else str(n) for n in content["label_specific_str"]]
    if specific.size and (specific.min() < 0 or specific.max() >= len(names)):
        raise ValueError(f"{call}: {labels}: label_specific indexes past its {len(names)} names.")
    order = np.argsort(specific, kind="stable")
    if png:
        items = safe_load(images, call=call, fix=_FIX)
        if not isinstance(items, list | tuple) or len(items) != len(specific):
            raise ValueError(f"{call}: {images} must hold a list of {len(specific)} PNGs. {_FIX}")
        pixels = _decode(items, order.tolist(), image_size, resample, images, call)
    else:
        with np.load(images) as npz:  # allow_pickle stays False
            stored = npz["images"] if "images" in npz.files else None
        expected = (len(specific), *stored.shape[1:3], 3) if stored is not None else ()
        if stored is None or stored.dtype != np.uint8 or stored.shape != expected:
            found = "no 'images'" if stored is None else f"{stored.dtype} {stored.shape}"
            raise ValueError(f"{call}: {images} holds {found}; expected uint8 {list(expected)} "
                             f"(one image per label in {labels.name}). {_FIX}")  # fmt: skip
        if stored.shape[1:3] != (image_size, image_size):
            raise ValueError(
                f"{call}: {images} holds {stored.shape[1]}x{stored.shape[2]} images but "
                f"image_size={image_size}; pass image_size={stored.shape[1]}, or use the PNG "
                "pickle, which is resized on load."
            )
        pixels = stored[order][..., ::-1]  # OpenCV's BGR to RGB
    counts = np.bincount(specific, minlength=len(names))
    data = stack_classes(np.split(pixels, np.cumsum(counts)[:-1]), names, call=call)
    if png and cache:
        save_class_images(key, data, source=f"tiered-imagenet:{images}:{image_size}:{resample}")
    return data


def _decode(
    items: Sequence[Any], order: list[int], size: int, resample: str, path: Path, call: str
) -> np.ndarray:
    """Decode the PNGs ``items[order]`` into uint8 ``[N, size, size, 3]``."""
    import numpy as np
    from PIL import Image

    filt = getattr(Image.Resampling, resample.upper())
    out = np.empty((len(order), size, size, 3), dtype=np.uint8)
    for i, j in enumerate(order):
        item = items[j]
        if isinstance(item, str):  # pickled by Python 2
            item = item.encode("latin1")
        raw = bytes(item) if isinstance(item, bytes | bytearray) else np.asarray(item).tobytes()
        try:
            with Image.open(io.BytesIO(raw)) as image:
                picture = image.convert("RGB")
        except (OSError, ValueError, SyntaxError) as err:
            raise ValueError(
                f"{call}: {path}: image {j} is not a readable PNG ({type(err).__name__}: {err}). "
                + _FIX
            ) from err
        if picture.size != (size, size):
            picture = picture.resize((size, size), filt)
        out[i] = np.asarray(picture, dtype=np.uint8)
    return out
