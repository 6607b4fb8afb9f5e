"""CIFAR-FS (Bertinetto et al. 2019): CIFAR-100's 100 classes split 64 / 16 / 20, 600 images each.

Read from the CIFAR-100 "python version" as torchvision unpacks it::

    <root>/cifar-100-python/train   (pickle: data [50000, 3072] uint8, fine_labels)
    <root>/cifar-100-python/test    (pickle: data [10000, 3072] uint8, fine_labels)
    <root>/cifar-100-python/meta    (pickle: fine_label_names)

Each class takes its 500 training and 100 test images (in that order). The class lists below are
Bertinetto et al.'s split (also used by MetaOptNet and learn2learn).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from metafunc.data.dataset import ClassImages, ClassSplits, stack_classes
from metafunc.data.safe_pickle import safe_load

__all__ = ["CIFAR_FS_CLASSES", "cifar_fs_splits", "load_cifar_fs"]

CIFAR_FS_CLASSES: dict[str, tuple[str, ...]] = {
    "train": (
        "dolphin", "seal", "aquarium_fish", "ray", "trout", "orchid", "sunflower", "tulip",
        "bottle", "bowl", "can", "cup", "plate", "apple", "mushroom", "orange", "pear", "clock",
        "keyboard", "chair", "couch", "bee", "caterpillar", "cockroach", "bear", "lion", "tiger",
        "wolf", "bridge", "castle", "house", "road", "skyscraper", "cloud", "forest", "mountain",
        "elephant", "kangaroo", "porcupine", "possum", "raccoon", "skunk", "lobster", "spider",
        "boy", "girl", "dinosaur", "lizard", "snake", "turtle", "hamster", "mouse", "rabbit",
        "shrew", "squirrel", "oak_tree", "palm_tree", "pine_tree", "willow_tree", "bus", "train",
        "lawn_mower", "streetcar", "tank",
    ),
    "val": (
        "beaver", "otter", "flatfish", "shark", "lamp", "television", "beetle", "butterfly",
        "sea", "camel", "cattle", "crab", "crocodile", "maple_tree", "motorcycle", "tractor",
    ),
    "test": (
        "whale", "poppy", "rose", "sweet_pepper", "telephone", "bed", "table", "wardrobe",
        "leopard", "plain", "chimpanzee", "fox", "snail", "worm", "baby", "man", "woman",
        "bicycle", "pickup_truck", "rocket",
    ),
}  # fmt: skip
"""Bertinetto et al.'s CIFAR-FS class names (CIFAR-100 fine labels) per split."""

_ALIASES = {"validation": "val"}


def read_cifar_pickle(path: Path, *, call: str) -> dict[str, Any]:
    if not path.is_file():
        raise FileNotFoundError(
            f"{call}: {path} does not exist. Download CIFAR-100 (python version, "
            "cifar-100-python.tar.gz from https://www.cs.toronto.edu/~kriz/cifar.html) and unpack "
            f"it into {path.parent.parent}/, or let torchvision.datasets.CIFAR100(root, "
            "download=True) do it."
        )
    content = safe_load(path, call=call, fix="Unpack cifar-100-python.tar.gz again.")
    if not isinstance(content, dict):
        raise ValueError(f"{call}: {path} holds a {type(content).__name__}, not a dict.")
    return {k.decode() if isinstance(k, bytes) else k: v for k, v in content.items()}


def cifar_field(content: dict[str, Any], key: str, path: Path, *, call: str) -> Any:
    if key not in content:
        raise ValueError(f"{call}: {path} has no {key!r} entry (keys: {sorted(content)}).")
    return content[key]


def cifar_fs_splits(root: str | os.PathLike[str]) -> ClassSplits:
    """All three CIFAR-FS splits as uint8 ``[classes, 600, 3, 32, 32]``, reading the files once.

    Args:
        root: the folder holding ``cifar-100-python/`` (torchvision's ``root``).
    """
    return _read(root, call="cifar_fs_splits(...)")


def _read(root: str | os.PathLike[str], *, call: str) -> ClassSplits:
    import numpy as np

    folder = Path(root).expanduser() / "cifar-100-python"
    meta_path = folder / "meta"
    names = [
        str(n)
        for n in cifar_field(
            read_cifar_pickle(meta_path, call=call), "fine_label_names", meta_path, call=call
        )
    ]
    images, labels = [], []
    for part in ("train", "test"):
        path = folder / part
        content = read_cifar_pickle(path, call=call)
        data = np.asarray(cifar_field(content, "data", path, call=call))
        fine = np.asarray(cifar_field(content, "fine_labels", path, call=call), dtype=np.int64)
        if data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3 * 32 * 32:
            raise ValueError(
                f"{call}: {path}: data is {data.dtype} {data.shape}; expected uint8 [N, 3072]."
            )
        if len(fine) != len(data):
            raise ValueError(f"{call}: {path} has {len(data)} images but {len(fine)} labels.")
        images.append(data.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1))
        labels.append(fine)
    pixels, fine = np.concatenate(images), np.concatenate(labels)
    position = {name: i for i, name in enumerate(names)}
    splits = []
    for split in ("train", "val", "test"):
        missing = [n for n in CIFAR_FS_CLASSES[split] if n not in position]
        if missing:
            raise ValueError(
                f"{call}: {meta_path} lacks the CIFAR-100 classes {missing[:5]}; it is not "
                "CIFAR-100's meta file."
            )
        arrays = [pixels[fine == position[n]] for n in CIFAR_FS_CLASSES[split]]
        splits.append(stack_classes(arrays, CIFAR_FS_CLASSES[split], call=call))
    return ClassSplits(*splits)


def load_cifar_fs(root: str | os.PathLike[str], split: str = "train") -> ClassImages:
    """One CIFAR-FS split: ``"train"`` (64 classes), ``"val"``/``"validation"`` (16) or ``"test"``.

    Args:
        root: the folder holding ``cifar-100-python/`` (torchvision's ``root``).
    """
    split = _ALIASES.get(split, split)
    if split not in CIFAR_FS_CLASSES:
        raise ValueError(
            f"load_cifar_fs: unknown split {split!r}; use one of {tuple(CIFAR_FS_CLASSES)} "
            "('validation' also works)."
        )
    train, validation, test = _read(root, call=f"load_cifar_fs(split={split!r})")
    chosen = {"train": train, "val": validation, "test": test}[split]
    assert chosen is not None  # cifar_fs_splits always builds all three
    return chosen
