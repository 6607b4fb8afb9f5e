"""mini-ImageNet, CIFAR-FS and folder-per-class loaders, on tiny files in the real formats."""

from __future__ import annotations

import csv
import pickle
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image

import metafunc.data.folder as folder_module
import metafunc.data.miniimagenet as mini_module
from metafunc.data import (
    CIFAR_FS_CLASSES,
    cifar_fs_splits,
    folder_splits,
    get_benchmark,
    load_cifar_fs,
    load_folder,
    load_mini_imagenet,
)

# CIFAR-100's fine label names, in label order (as in its meta file): an independent reference.
CIFAR100 = (
    "apple", "aquarium_fish", "baby", "bear", "beaver", "bed", "bee", "beetle", "bicycle",
    "bottle", "bowl", "boy", "bridge", "bus", "butterfly", "camel", "can", "castle", "caterpillar",
    "cattle", "chair", "chimpanzee", "clock", "cloud", "cockroach", "couch", "crab", "crocodile",
    "cup", "dinosaur", "dolphin", "elephant", "flatfish", "forest", "fox", "girl", "hamster",
    "house", "kangaroo", "keyboard", "lamp", "lawn_mower", "leopard", "lion", "lizard", "lobster",
    "man", "maple_tree", "motorcycle", "mountain", "mouse", "mushroom", "oak_tree", "orange",
    "orchid", "otter", "palm_tree", "pear", "pickup_truck", "pine_tree", "plain", "plate", "poppy",
    "porcupine", "possum", "rabbit", "raccoon", "ray", "road", "rocket", "rose", "sea", "seal",
    "shark", "shrew", "skunk", "skyscraper", "snail", "snake", "spider", "squirrel", "streetcar",
    "sunflower", "sweet_pepper", "table", "tank", "telephone", "television", "tiger", "tractor",
    "train", "trout", "tulip", "turtle", "wardrobe", "whale", "willow_tree", "wolf", "woman",
    "worm"
)  # fmt: skip


def seeded(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def never(*args: Any, **kwargs: Any) -> Any:
    raise AssertionError("decoded images although the cache should have been used")


# --- mini-ImageNet --------------------------------------------------------------------------------

COLOURS = {"n01": (200, 30, 30), "n02": (30, 200, 30), "n03": (30, 30, 200), "n04": (220, 220, 40)}


def write_mini_csv(
    root: Path, split: str, labels: list[str], per_class: int
) -> dict[str, list[str]]:
    folder = root / "mini-imagenet"
    (folder / "images").mkdir(parents=True, exist_ok=True)
    rows = [
        (f"{label}{i:08d}.jpg", label) for i in range(per_class) for label in labels
    ]  # interleaved
    for name, label in rows:
        Image.new("RGB", (20, 16), COLOURS[label]).save(folder / "images" / name, quality=95)
    with open(folder / f"{split}.csv", "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["filename", "label"])
        writer.writerows(rows)
    return {label: [n for n, lab in rows if lab == label] for label in labels}


def test_mini_imagenet_csv_format(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    files = write_mini_csv(tmp_path, "val", ["n03", "n01", "n02"], per_class=4)
    data = load_mini_imagenet(tmp_path, "validation", image_size=8, cache_dir=tmp_path / "c")
    assert data.images.shape == (3, 4, 3, 8, 8) and data.images.dtype == torch.uint8
    assert data.classes == ("n01", "n02", "n03")
    for c, label in enumerate(data.classes):
        colour = data.images[c].double().mean(dim=(0, 2, 3))
        assert torch.allclose(colour, torch.tensor(COLOURS[label], dtype=torch.float64), atol=4)
    with Image.open(tmp_path / "mini-imagenet" / "images" / files["n02"][3]) as image:
        expected = np.array(image.convert("RGB").resize((8, 8), Image.LANCZOS)).transpose(2, 0, 1)
    assert torch.equal(data.images[1, 3], torch.from_numpy(expected))
    monkeypatch.setattr(mini_module, "decode_images", never)
    again = load_mini_imagenet(tmp_path, "val", image_size=8, cache_dir=tmp_path / "c")
    assert torch.equal(again.images, data.images)


def test_mini_imagenet_pickle_format(tmp_path: Path) -> None:
    g = np.random.default_rng(0)
    order = g.permutation(12)  # the images of a class are scattered through image_data
    image_data = np.zeros((12, 84, 84, 3), dtype=np.uint8)
    class_dict: dict[str, list[int]] = {}
    for k, slot in enumerate(order.tolist()):
        label, example = ("n10", "n20", "n30")[k // 4], k % 4
        image_data[slot, :, :, 0] = 10 * (k // 4) + example
        image_data[slot, 5, 7, 1] = 99  # an asymmetric pixel: catches a transposed H/W
        class_dict.setdefault(label, []).append(slot)
    folder = tmp_path / "mini-imagenet"
    folder.mkdir()
    with open(folder / "mini-imagenet-cache-test.pkl", "wb") as f:
        pickle.dump({"image_data": image_data, "class_dict": class_dict}, f)
    write_mini_csv(tmp_path, "test", ["n01"], per_class=2)  # the pickle takes precedence
    data = load_mini_imagenet(tmp_path, "test", cache_dir=tmp_path / "c")
    assert data.images.shape == (3, 4, 3, 84, 84) and data.classes == ("n10", "n20", "n30")
    for c in range(3):
        for e in range(4):
            assert torch.equal(
                data.images[c, e],
                torch.from_numpy(image_data[class_dict[data.classes[c]][e]]).permute(2, 0, 1),
            )
            assert (
                int(data.images[c, e, 0, 0, 0]) == 10 * c + e
                and int(data.images[c, e, 1, 5, 7]) == 99
            )
    with pytest.raises(
        ValueError, match=r"load_mini_imagenet\(split='test'\).*84x84.*image_size=32.*image_size=84"
    ):
        load_mini_imagenet(tmp_path, "test", image_size=32)
    with open(folder / "mini-imagenet-cache-test.pkl", "wb") as f:
        pickle.dump({"images": image_data}, f)
    with pytest.raises(ValueError, match=r"'image_data' and 'class_dict', found \['images'\]"):
        load_mini_imagenet(tmp_path, "test")
    (folder / "mini-imagenet-cache-test.pkl").write_bytes(b"\x80\x04garbage")
    with pytest.raises(ValueError, match=r"cannot unpickle .*mini-imagenet-cache-test.pkl"):
        load_mini_imagenet(tmp_path, "test")


def test_mini_imagenet_errors(tmp_path: Path) -> None:
    with pytest.raises(
        ValueError, match=r"load_mini_imagenet: unknown split 'dev'.*'train', 'val', 'test'"
    ):
        load_mini_imagenet(tmp_path, "dev")
    with pytest.raises(
        FileNotFoundError, match=r"train.csv.*mini-imagenet-cache-train.pkl.*train.csv, val.csv"
    ):
        load_mini_imagenet(tmp_path, "train")
    files = write_mini_csv(tmp_path, "train", ["n01", "n02"], per_class=3)
    missing = tmp_path / "mini-imagenet" / "images" / files["n02"][1]
    missing.unlink()
    with pytest.raises(
        FileNotFoundError, match=rf"load_mini_imagenet\(split='train'\).*{missing.name}"
    ):
        load_mini_imagenet(tmp_path, "train", image_size=8, cache=False)
    missing.write_bytes(b"\xff\xd8\xff\xe0 truncated jpeg")
    with pytest.raises(ValueError, match=rf"cannot decode image .*{missing.name}"):
        load_mini_imagenet(tmp_path, "train", image_size=8, cache=False)
    (tmp_path / "mini-imagenet" / "train.csv").write_text("file,class\na.jpg,n01\n")
    with pytest.raises(ValueError, match=r"must start with the header 'filename,label'"):
        load_mini_imagenet(tmp_path, "train", image_size=8, cache=False)


# --- CIFAR-FS -------------------------------------------------------------------------------------


def test_cifar_fs_class_lists_partition_cifar100() -> None:
    sizes = {k: len(v) for k, v in CIFAR_FS_CLASSES.items()}
    assert sizes == {"train": 64, "val": 16, "test": 20}
    every = [n for names in CIFAR_FS_CLASSES.values() for n in names]
    assert len(every) == len(set(every)) == 100 and set(every) == set(CIFAR100)


def write_cifar100(root: Path, train_per_class: int = 3, test_per_class: int = 2) -> None:
    folder = root / "cifar-100-python"
    folder.mkdir(parents=True)
    g = np.random.default_rng(1)
    for part, per_class, marker in (("train", train_per_class, 0), ("test", test_per_class, 1)):
        labels = g.permutation(np.repeat(np.arange(100), per_class))
        planes = np.zeros((len(labels), 3, 32, 32), dtype=np.uint8)
        planes[:, 0] = labels[:, None, None]
        planes[:, 0, 0, 1] = 200  # row 0, column 1: catches a transposed image
        planes[:, 1] = (np.arange(len(labels)) % 251)[:, None, None]
        planes[:, 2] = marker
        content = {"data": planes.reshape(len(labels), 3072), "fine_labels": labels.tolist()}
        content["coarse_labels"] = [0] * len(labels)
        with open(folder / part, "wb") as f:
            pickle.dump(content, f)
    with open(folder / "meta", "wb") as f:
        pickle.dump({b"fine_label_names": CIFAR100, b"coarse_label_names": ["x"] * 20}, f)


def test_cifar_fs_reads_cifar100_python_files(tmp_path: Path) -> None:
    write_cifar100(tmp_path)
    train, validation, test = cifar_fs_splits(tmp_path)
    assert validation is not None
    assert train.images.shape == (64, 5, 3, 32, 32) and validation.images.shape == (
        16,
        5,
        3,
        32,
        32,
    )
    assert test.images.shape == (20, 5, 3, 32, 32)
    assert train.classes == CIFAR_FS_CLASSES["train"] and test.classes == CIFAR_FS_CLASSES["test"]
    for split in (train, validation, test):
        for c, name in enumerate(split.classes):
            assert bool((split.images[c, :, 0, 1:, :] == CIFAR100.index(name)).all())
        assert bool((split.images[:, :, 0, 0, 1] == 200).all())
        assert split.images[:, :3, 2].eq(0).all() and split.images[:, 3:, 2].eq(1).all(), (
            "train then test"
        )
    assert torch.equal(load_cifar_fs(tmp_path, "validation").images, validation.images)
    with pytest.raises(
        ValueError, match=r"load_cifar_fs: unknown split 'valid'.*'train', 'val', 'test'"
    ):
        load_cifar_fs(tmp_path, "valid")


def test_cifar_fs_missing_files(tmp_path: Path) -> None:
    with pytest.raises(
        FileNotFoundError, match=r"load_cifar_fs\(split='test'\).*cifar-100-python.tar.gz"
    ):
        load_cifar_fs(tmp_path, "test")


# --- folder per class -----------------------------------------------------------------------------


def write_folder(root: Path) -> dict[str, int]:
    counts = {"cat": 4, "dog": 6, "owl": 3, "pig": 5}
    suffix = {"cat": "png", "dog": "jpg", "owl": "jpeg", "pig": "PNG"}
    for c, (name, n) in enumerate(counts.items()):
        (root / name).mkdir(parents=True)
        for i in range(n):
            Image.new("RGB", (10, 12), (40 * c + 20, 10 * i + 5, 77)).save(
                root / name / f"{i:03d}.{suffix[name]}"
            )
    (root / "empty").mkdir()
    (root / "README.txt").write_text("not a class")
    return counts


def test_folder_loader_ragged_classes(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    counts = write_folder(tmp_path / "pets")
    names = list(counts)
    data = load_folder(tmp_path / "pets", names, image_size=(6, 8), cache_dir=tmp_path / "c")
    assert data.images.shape == (4, 6, 3, 6, 8) and data.classes == tuple(names)
    assert data.counts is not None and data.counts.tolist() == list(counts.values())
    for c, n in enumerate(counts.values()):
        red = data.images[c, :n, 0].double().mean(dim=(1, 2))
        assert torch.allclose(red, torch.full((n,), 40.0 * c + 20).double(), atol=3)
        green = data.images[c, :n, 1].double().mean(dim=(1, 2))
        assert torch.allclose(green, 10.0 * torch.arange(n).double() + 5, atol=3), (
            "files in sorted order"
        )
        assert int(data.images[c, n:].abs().sum()) == 0, "padding is zero"
    grey = load_folder(
        tmp_path / "pets", ["cat"], image_size=5, channels=1, cache_dir=tmp_path / "c"
    )
    assert grey.images.shape == (1, 4, 5, 5)
    monkeypatch.setattr(folder_module, "decode_images", never)
    again = load_folder(tmp_path / "pets", names, image_size=(6, 8), cache_dir=tmp_path / "c")
    assert torch.equal(again.images, data.images)
    Image.new("RGB", (10, 12), (0, 0, 0)).save(tmp_path / "pets" / "cat" / "000.png")  # changed
    with pytest.raises(AssertionError, match="decoded images"):
        load_folder(tmp_path / "pets", names, image_size=(6, 8), cache_dir=tmp_path / "c")


def test_folder_splits_and_benchmark(tmp_path: Path) -> None:
    write_folder(tmp_path / "pets")
    split = {"train": ["cat", "dog"], "validation": ["owl"], "test": ["pig", "cat"]}
    with pytest.raises(ValueError, match=r"folder_splits.*'cat' is in both the 'train' and 'test'"):
        folder_splits(tmp_path / "pets", split, cache=False)
    split["test"] = ["pig"]
    parts = folder_splits(tmp_path / "pets", split, image_size=6, cache=False)
    assert parts.train.classes == ("cat", "dog") and parts.test.classes == ("pig",)
    assert parts.validation is not None and parts.validation.classes == ("owl",)
    two_way = {"train": ["cat", "dog"], "test": ["pig", "owl"]}
    bench = get_benchmark(
        "folder",
        tmp_path / "pets",
        ways=2,
        shots=1,
        queries=2,
        split=two_way,
        image_size=6,
        cache=False,
    )
    assert bench.validation is None
    batch = bench.train.sample(50, seeded(0))
    assert batch.support_x.shape == (50, 2, 3, 6, 6) and batch.query_x.shape == (50, 4, 3, 6, 6)
    red = (batch.query_x[:, :, 0] * 255).mean(dim=(-2, -1))
    assert bool((red > 10).all()), "no zero padding drawn from the smaller classes"
    with pytest.raises(
        ValueError,
        match=r"get_benchmark\('folder'\): the test split: EpisodeSampler.*ways=3 but only 1",
    ):
        three_way = {"train": ["cat", "dog", "owl"], "test": ["pig"]}
        get_benchmark("folder", tmp_path / "pets", ways=3, queries=1, split=three_way, cache=False)


def test_folder_errors(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match=r"load_folder.*is not a folder"):
        load_folder(tmp_path / "nowhere")
    (tmp_path / "flat").mkdir()
    Image.new("RGB", (4, 4)).save(tmp_path / "flat" / "a.png")
    with pytest.raises(ValueError, match=r"load_folder.*has no class subfolders.*<root>/<class>/"):
        load_folder(tmp_path / "flat")
    write_folder(tmp_path / "pets")
    with pytest.raises(ValueError, match=r"class folder .*empty holds no .png/.jpg/.jpeg files"):
        load_folder(tmp_path / "pets", cache=False)
    with pytest.raises(ValueError, match=r"no class folder\(s\) \['horse'\].*'cat', 'dog'"):
        load_folder(tmp_path / "pets", ["cat", "horse"], cache=False)
    bad = tmp_path / "pets" / "dog" / "003.jpg"
    bad.write_bytes(b"\xff\xd8\xff\xe0 not a jpeg")
    with pytest.raises(ValueError, match=rf"cannot decode image .*{bad.name}"):
        load_folder(tmp_path / "pets", ["dog"], cache=False)
    with pytest.raises(ValueError, match=r"folder_splits.*needs 'train' and 'test'"):
        folder_splits(tmp_path / "pets", {"train": ["cat"], "val": ["owl"]})


def test_image_benchmarks_from_registry(tmp_path: Path) -> None:
    write_cifar100(tmp_path)
    bench = get_benchmark("cifar-fs", tmp_path, ways=5, shots=2, queries=3, mean=0.5, std=0.25)
    batch = bench.train.sample(4, seeded(0))
    assert batch.support_x.shape == (4, 10, 3, 32, 32) and batch.query_x.shape == (4, 15, 3, 32, 32)
    assert float(batch.support_x.min()) < 0, "mean/std were applied"
    assert bench.validation is not None
    val = next(iter(bench.validation.episodes(3, seed=0, batch_size=3)))
    red = ((val.support_x[:, :, 0, 5, 5] * 0.25 + 0.5) * 255).round().long()
    val_ids = {CIFAR100.index(n) for n in CIFAR_FS_CLASSES["val"]}
    assert set(red.flatten().tolist()) <= val_ids, "validation tasks use validation classes only"
    folder = tmp_path / "mini-imagenet"
    for split, labels in (("train", "abc"), ("val", "de"), ("test", "fgh")):
        image_data = np.repeat(np.arange(len(labels) * 3, dtype=np.uint8), 84 * 84 * 3)
        class_dict = {label: [3 * i, 3 * i + 1, 3 * i + 2] for i, label in enumerate(labels)}
        folder.mkdir(exist_ok=True)
        with open(folder / f"mini-imagenet-cache-{split}.pkl", "wb") as f:
            pickle.dump(
                {"image_data": image_data.reshape(-1, 84, 84, 3), "class_dict": class_dict}, f
            )
    mini = get_benchmark("mini-imagenet", tmp_path, ways=2, shots=1, queries=2)
    assert mini.test.sample(3, seeded(1)).query_x.shape == (3, 4, 3, 84, 84)
    with pytest.raises(
        ValueError,
        match=r"get_benchmark\('mini-imagenet'\): the validation split.*ways=3 but only 2",
    ):
        get_benchmark("mini-imagenet", tmp_path, ways=3, shots=1, queries=1)
