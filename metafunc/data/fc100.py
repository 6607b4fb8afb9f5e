"""FC100 (Oreshkin et al. 2018, TADAM): CIFAR-100 split by superclass, 60 / 20 / 20 classes.

CIFAR-FS splits CIFAR-100's classes at random, so a test class often has a sibling of the same
superclass in training (leopard vs. tiger). FC100 splits the 20 superclasses instead, 12 / 4 / 4,
so test classes are further from anything seen in training. By CIFAR-100 coarse label index:

* train: 1, 2, 3, 4, 5, 6, 9, 10, 15, 17, 18, 19
* validation: 8, 11, 13, 16
* test: 0, 7, 12, 14

This is TADAM's split (Oreshkin et al.'s ``class_split`` for CIFAR-100, as reproduced in
scripts built on github.com/ElementAI/TADAM) and torchmeta's ``assets/cifar100/fc100`` lists.
Each class keeps its 500 training and 100 test images (in that order), 32x32 RGB, read from the
python files as torchvision unpacks them (see :mod:`metafunc.data.cifarfs`, whose reader this
shares; pickles go through :func:`~metafunc.data.safe_pickle.safe_load`).
"""

from __future__ import annotations

import os
from pathlib import Path

from metafunc.data.archive import extract_folder
from metafunc.data.cifarfs import cifar_field, read_cifar_pickle
from metafunc.data.dataset import ClassSplits, check_disjoint, stack_classes
from metafunc.data.download import check_md5, download_file

__all__ = ["CIFAR100_MD5", "CIFAR100_URL", "FC100_SUPERCLASSES", "fc100_splits"]

CIFAR100_URL = "https://www.cs.toronto.edu/~kriz/cifar-100-python.tar.gz"
CIFAR100_MD5 = "eb9058c3a382ffc7106e4002c42a8d85"  # torchvision's CIFAR100.tgz_md5

FC100_SUPERCLASSES: dict[str, tuple[str, ...]] = {
    "train": (
        "fish", "flowers", "food_containers", "fruit_and_vegetables",
        "household_electrical_devices", "household_furniture", "large_man-made_outdoor_things",
        "large_natural_outdoor_scenes", "reptiles", "trees", "vehicles_1", "vehicles_2",
    ),
    "val": (
        "large_carnivores", "large_omnivores_and_herbivores", "non-insect_invertebrates",
        "small_mammals",
    ),
    "test": ("aquatic_mammals", "insects", "medium_mammals", "people"),
}  # fmt: skip
"""Oreshkin et al.'s FC100 superclasses (CIFAR-100 coarse label names) per split."""

_FILES = ("train", "test", "meta")


def fc100_splits(root: str | os.PathLike[str], *, download: bool = False) -> ClassSplits:
    """The FC100 splits as uint8 ``[classes, 600, 3, 32, 32]``: 60 / 20 / 20 classes.

    Classes are CIFAR-100 fine labels (e.g. ``"apple"``), ordered by superclass, then fine label.

    Args:
        root: the folder holding ``cifar-100-python/`` (torchvision's ``root``). If that folder is
            missing, ``root/cifar-100-python.tar.gz`` is md5-checked and unpacked.
        download: fetch that tarball from the CIFAR page first when it is not there.
    """
    import numpy as np

    call = "fc100_splits(...)"
    root = Path(root).expanduser()
    folder = root / "cifar-100-python"
    if not all((folder / name).is_file() for name in _FILES):
        _unpack(root, download=download, call=call)
    meta_path = folder / "meta"
    meta = read_cifar_pickle(meta_path, call=call)
    coarse_names = [str(n) for n in cifar_field(meta, "coarse_label_names", meta_path, call=call)]
    fine_names = [str(n) for n in cifar_field(meta, "fine_label_names", meta_path, call=call)]
    images, fines, coarses = [], [], []
    for part in ("train", "test"):
        path = folder / part
        content = read_cifar_pickle(path, call=call)
        data = np.asarray(cifar_field(content, "data", path, call=call))
        fine = np.asarray(cifar_field(content, "fine_labels", path, call=call), dtype=np.int64)
        coarse = np.asarray(cifar_field(content, "coarse_labels", path, call=call), dtype=np.int64)
        if data.dtype != np.uint8 or data.shape[1:] != (3072,) or len(data) != len(fine):
            raise ValueError(
                f"{call}: {path}: data is {data.dtype} {data.shape} with {len(fine)} labels; "
                "expected uint8 [N, 3072] and N labels. Unpack cifar-100-python.tar.gz again."
            )
        images.append(data.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1))
        fines.append(fine)
        coarses.append(coarse)
    pixels, fine, coarse = np.concatenate(images), np.concatenate(fines), np.concatenate(coarses)
    pairs = set(zip(fine.tolist(), coarse.tolist(), strict=True))
    superclass = dict(pairs)
    if len(superclass) != len(pairs):
        raise ValueError(
            f"{call}: {folder}: a fine label occurs under two coarse labels; the files are not "
            "CIFAR-100's. Unpack cifar-100-python.tar.gz again."
        )
    order = sorted(superclass, key=lambda f: (superclass[f], f))
    chosen: dict[str, list[int]] = {}
    for split, names in FC100_SUPERCLASSES.items():
        missing = [n for n in names if n not in coarse_names]
        if missing:
            raise ValueError(
                f"{call}: {meta_path} lacks the CIFAR-100 superclasses {missing}; it is not "
                "CIFAR-100's meta file."
            )
        wanted = {coarse_names.index(n) for n in names}
        chosen[split] = [f for f in order if superclass[f] in wanted]
    check_disjoint({k: [fine_names[f] for f in v] for k, v in chosen.items()}, call=call)
    return ClassSplits(
        *(
            stack_classes([pixels[fine == f] for f in v], [fine_names[f] for f in v], call=call)
            for v in chosen.values()
        )
    )


def _unpack(root: Path, *, download: bool, call: str) -> None:
    """Unpack ``root/cifar-100-python.tar.gz`` (downloading it first if asked), md5-checked."""
    archive = root / "cifar-100-python.tar.gz"
    if archive.is_file():
        check_md5(archive, CIFAR100_MD5, call=call)
    elif download:
        root.mkdir(parents=True, exist_ok=True)
        download_file(CIFAR100_URL, archive, md5=CIFAR100_MD5, call=call)
    else:
        raise FileNotFoundError(
            f"{call}: found neither {root / 'cifar-100-python'}/ (files train, test, meta) nor "
            f"{archive}. Download {CIFAR100_URL} (md5 {CIFAR100_MD5}) to {archive}, or pass "
            "download=True, or let torchvision.datasets.CIFAR100(root, download=True) unpack it."
        )
    extract_folder(archive, "cifar-100-python", call=call)
