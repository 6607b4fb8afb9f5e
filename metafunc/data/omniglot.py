"""Omniglot (Lake, Salakhutdinov & Tenenbaum 2015): 1623 handwritten characters x 20 drawings.

Files are read in the official layout, the one torchvision writes::

    <root>/omniglot-py/images_background/<Alphabet>/characterNN/XXXX_YY.png   (964 characters)
    <root>/omniglot-py/images_evaluation/...                                   (659 characters)

or straight from the official zips beside those folders (``images_background.zip``, ...,
``images_background_small1.zip``, ``images_background_small2.zip``), md5-verified. Images are
converted to grey, resized with a Pillow filter (LANCZOS by default, as in MAML's preprocessing)
and inverted to white strokes on black. File names ``XXXX_YY.png`` carry the drawer ``YY``, kept
as :attr:`ClassImages.drawers` for Lake et al.'s one-shot protocol (:mod:`metafunc.data.lake`).
The decoded uint8 tensor is cached (see :mod:`metafunc.data.cache`), so only the first load
decodes the PNGs.

Splits (:func:`omniglot_splits`):
    ``"vinyals"``: Vinyals et al. 2016 / MAML. All 1623 characters in a fixed order (background
    then evaluation, each sorted by alphabet and character folder) are permuted with
    ``torch.randperm`` seeded by ``split_seed``; the first 1200 are for meta-training (the last
    ``num_validation`` of them, default 100, for validation) and the other 423 for testing.
    ``"lake"``: Lake et al.'s background (964, train) / evaluation (659, test) split.
    ``"small1"``, ``"small2"``: Lake's minimal background sets (136 / 156 characters) for training,
    evaluation for testing.
"""

from __future__ import annotations

import os
import re
import zipfile
from pathlib import Path

import torch

from metafunc.data.cache import default_cache_dir, load_class_images, save_class_images
from metafunc.data.dataset import ClassImages, ClassSplits, concat_classes, stack_classes
from metafunc.data.download import check_md5, download_file
from metafunc.data.images import ImageSource, check_resample, check_size, decode_images
from metafunc.data.lake import alphabet_of

__all__ = [
    "OMNIGLOT_SOURCES",
    "OMNIGLOT_SPLITS",
    "OMNIGLOT_URL",
    "load_omniglot",
    "omniglot_splits",
]

OMNIGLOT_URL = "https://raw.githubusercontent.com/brendenlake/omniglot/master/python/"
"""Where the official archives live (torchvision downloads from the same place)."""

OMNIGLOT_SOURCES: dict[str, tuple[str, str]] = {
    "background": ("images_background", "68d2efa1b9178cc56df9314c21c6e718"),
    "evaluation": ("images_evaluation", "6b91aef0f799c5bb55b94e3f2daec811"),
    "small1": ("images_background_small1", "e704a628b5459e08445c13499850abc4"),
    "small2": ("images_background_small2", "b75a71a51d3b13f821f212756fe481fd"),
}
"""Source name -> (folder / zip stem, md5 of the official zip)."""

OMNIGLOT_SPLITS = ("vinyals", "lake", "small1", "small2")

_VINYALS_TRAIN = 1200
_DRAWER = re.compile(r"^\d+_(\d+)\.png$")


def load_omniglot(
    root: str | os.PathLike[str],
    source: str = "background",
    *,
    image_size: int | tuple[int, int] = 28,
    resample: str = "lanczos",
    cache_dir: str | os.PathLike[str] | None = None,
    cache: bool = True,
    download: bool = False,
    base_url: str = OMNIGLOT_URL,
    workers: int | None = None,
) -> ClassImages:
    """One Omniglot image set as uint8 ``[characters, 20, H, W]``, white strokes on black.

    Args:
        root: the folder holding ``omniglot-py/`` (torchvision's ``root``).
        source: ``"background"``, ``"evaluation"``, ``"small1"`` or ``"small2"``.
        image_size: output size (int or ``(height, width)``); 28 as in MAML.
        resample: Pillow filter for resizing (``"lanczos"``, ``"bilinear"``, ...).
        cache_dir: cache folder (default ``$METAFUNC_CACHE`` or ``~/.cache/metafunc``).
        cache: read and write the decoded-tensor cache.
        download: fetch the official zip from ``base_url`` when neither the folder nor the zip
            is present.
        workers: decoding processes (``None``: available cores, at most 8).

    Class names are ``"<folder>/<Alphabet>/characterNN"``, sorted by alphabet, then character.
    """
    call = f"load_omniglot(source={source!r})"
    if source not in OMNIGLOT_SOURCES:
        raise ValueError(
            f"load_omniglot: unknown source {source!r}; use one of {tuple(OMNIGLOT_SOURCES)}."
        )
    size = check_size(image_size, call=call)
    check_resample(resample, call=call)
    stem, md5 = OMNIGLOT_SOURCES[source]
    key = (
        default_cache_dir(cache_dir)
        / "omniglot"
        / f"{stem}-{size[0]}x{size[1]}-{resample}.safetensors"
    )
    if cache and (hit := load_class_images(key)) is not None and hit.drawers is not None:
        return hit
    names, files = _find_images(Path(root).expanduser(), stem, md5, download, base_url, call=call)
    pixels = decode_images(
        [f for group in files for f in group],
        size=size, mode="L", resample=resample, invert=True, workers=workers, call=call,
    )  # fmt: skip
    arrays, start = [], 0
    for group in files:
        arrays.append(pixels[start : start + len(group)])
        start += len(group)
    data = stack_classes(arrays, names, call=call)._replace(drawers=_drawers(files))
    if cache:
        save_class_images(key, data, source=f"omniglot:{stem}:{size[0]}x{size[1]}:{resample}")
    return data


def _drawers(files: list[list[ImageSource]]) -> torch.Tensor | None:
    """int64 ``[characters, most drawings]``: the drawer of each image from its file name
    (``XXXX_YY.png``), -1 for padding; ``None`` if a file name does not carry one."""
    most = max(len(group) for group in files)
    out = torch.full((len(files), most), -1, dtype=torch.int64)
    for i, group in enumerate(files):
        for j, source in enumerate(group):
            name = Path(source if isinstance(source, (str, os.PathLike)) else source[1]).name
            match = _DRAWER.match(name)
            if match is None:
                return None
            out[i, j] = int(match.group(1))
    return out


def _find_images(
    root: Path, stem: str, md5: str, download: bool, base_url: str, *, call: str
) -> tuple[list[str], list[list[ImageSource]]]:
    """Class names and per-class image sources, from the folder if present, else from the zip."""
    base = root / "omniglot-py"
    folder, archive = base / stem, base / f"{stem}.zip"
    url = f"{base_url.rstrip('/')}/{stem}.zip"
    if folder.is_dir():
        groups: dict[tuple[str, str], list[ImageSource]] = {}
        for alphabet in sorted(p for p in folder.iterdir() if p.is_dir()):
            for character in sorted(p for p in alphabet.iterdir() if p.is_dir()):
                pngs: list[ImageSource] = [f for f in sorted(character.glob("*.png"))]
                groups[(alphabet.name, character.name)] = pngs
        where = str(folder)
    else:
        if not archive.is_file():
            if not download:
                hint = ""
                if (root / stem).exists() or (root / f"{stem}.zip").exists():
                    hint = f" {root} looks like omniglot-py/ itself: pass root={root.parent}."
                raise FileNotFoundError(
                    f"{call}: found neither the folder {folder}/ nor the archive {archive}. Put "
                    f"the official {stem}.zip (md5 {md5}, from {url}) into "
                    f"{base}/ (unpacked or not), or pass download=True.{hint}"
                )
            download_file(url, archive, md5=md5, call=call)
        check_md5(archive, md5, call=call)
        groups = {}
        with zipfile.ZipFile(archive) as z:
            for member in sorted(z.namelist()):
                parts = member.split("/")
                if len(parts) == 4 and parts[0] == stem and parts[3].endswith(".png"):
                    groups.setdefault((parts[1], parts[2]), []).append((str(archive), member))
        groups = dict(sorted(groups.items()))
        where = str(archive)
    groups = {k: v for k, v in groups.items() if v}
    if not groups:
        raise ValueError(
            f"{call}: {where} holds no <Alphabet>/<character>/*.png images. Replace it with the "
            f"official {stem}.zip (md5 {md5}) or its unpacked folder."
        )
    names = [f"{stem}/{alphabet}/{character}" for alphabet, character in groups]
    return names, list(groups.values())


def omniglot_splits(
    root: str | os.PathLike[str],
    split: str = "vinyals",
    *,
    num_validation: int | None = None,
    validation_alphabets: int = 0,
    split_seed: int = 0,
    image_size: int | tuple[int, int] = 28,
    resample: str = "lanczos",
    cache_dir: str | os.PathLike[str] | None = None,
    cache: bool = True,
    download: bool = False,
    base_url: str = OMNIGLOT_URL,
    workers: int | None = None,
) -> ClassSplits:
    """Omniglot's train / validation / test characters for a named split (module docs). The
    arguments not listed here are :func:`load_omniglot`'s.

    Args:
        split: one of :data:`OMNIGLOT_SPLITS`.
        num_validation: characters held out of the training set for validation, chosen with
            ``split_seed``; default 100 for ``"vinyals"`` and 0 (no validation set, as in Lake et
            al.) for the others.
        validation_alphabets: whole background alphabets held out for validation instead, chosen
            with ``split_seed`` (``"lake"``, ``"small1"``, ``"small2"``): what Lake et al.'s
            within-alphabet runs need to validate on. For the small sets they come from the
            background alphabets outside the set, so training keeps all of the set's alphabets.
        split_seed: seed of the permutation that assigns characters to splits.
    """
    call = f"omniglot_splits(split={split!r})"
    if split not in OMNIGLOT_SPLITS:
        raise ValueError(f"omniglot_splits: unknown split {split!r}; use one of {OMNIGLOT_SPLITS}.")
    if num_validation is None:
        num_validation = 100 if split == "vinyals" else 0

    def load(source: str) -> ClassImages:
        return load_omniglot(
            root, source, image_size=image_size, resample=resample, cache_dir=cache_dir,
            cache=cache, download=download, base_url=base_url, workers=workers,
        )  # fmt: skip

    generator = torch.Generator().manual_seed(split_seed)
    test = load("evaluation")
    if split == "vinyals":
        everything = concat_classes([load("background"), test], call=call)
        if everything.num_classes <= _VINYALS_TRAIN:
            raise ValueError(
                f"{call}: found only {everything.num_classes} characters; the split needs all "
                "1623 (restore the missing files of images_background/ and images_evaluation/)."
            )
        order = torch.randperm(everything.num_classes, generator=generator)
        train = everything.select(order[:_VINYALS_TRAIN].sort().values)
        test = everything.select(order[_VINYALS_TRAIN:].sort().values)
    else:
        train = load("background" if split == "lake" else split)
    if validation_alphabets:
        return _hold_out_alphabets(
            train, load("background"), test, split, validation_alphabets, num_validation,
            generator, call=call,
        )  # fmt: skip
    if not 0 <= num_validation < train.num_classes:
        raise ValueError(
            f"{call}: num_validation={num_validation} must be in [0, {train.num_classes})."
        )
    if num_validation == 0:
        return ClassSplits(train, None, test)
    held = torch.randperm(train.num_classes, generator=generator)
    keep, validation = held[num_validation:].sort().values, held[:num_validation].sort().values
    return ClassSplits(train.select(keep), train.select(validation), test)


def _hold_out_alphabets(
    train: ClassImages,
    background: ClassImages,
    test: ClassImages,
    split: str,
    count: int,
    num_validation: int,
    generator: torch.Generator,
    *,
    call: str,
) -> ClassSplits:
    """Splits with ``count`` whole background alphabets held out for validation: out of the
    training set for ``"lake"``, from the background alphabets outside it for the small sets."""
    if isinstance(count, bool) or not isinstance(count, int):
        raise ValueError(f"{call}: validation_alphabets={count!r}; pass an int (alphabets).")
    if split == "vinyals" or num_validation:
        raise ValueError(
            f"{call}: validation_alphabets holds out whole alphabets of the Lake splits "
            "('lake', 'small1', 'small2'); for this split use num_validation (characters)."
        )
    mine = sorted({alphabet_of(n).split("/")[-1] for n in train.classes})
    pool = mine if split == "lake" else sorted(
        {alphabet_of(n).split("/")[-1] for n in background.classes} - set(mine)
    )  # fmt: skip
    if not 0 < count < len(pool) + (split != "lake"):
        raise ValueError(
            f"{call}: validation_alphabets={count} must be in [1, {len(pool) - (split == 'lake')}]"
            f" ({len(pool)} alphabets to hold out from)."
        )
    held = {pool[i] for i in torch.randperm(len(pool), generator=generator)[:count].tolist()}

    def where(data: ClassImages, inside: bool) -> ClassImages:
        keep = [i for i, n in enumerate(data.classes) if (alphabet_of(n).split("/")[-1] in held)
                == inside]  # fmt: skip
        return data.select(keep)

    validation = where(background, True)
    return ClassSplits(where(train, False) if split == "lake" else train, validation, test)
