"""tiered-ImageNet, CUB-200-2011 and FC100 loaders, on tiny files in the real on-disk formats."""

from __future__ import annotations

import hashlib
import io
import os
import pickle
import shutil
import tarfile
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image

import metafunc.data.cub as cub_module
import metafunc.data.fc100 as fc100_module
import metafunc.data.folder as folder_module
from metafunc.data import (
    FC100_SUPERCLASSES,
    ChecksumError,
    UnsafePickleError,
    cifar_fs_splits,
    cub_splits,
    fc100_splits,
    get_benchmark,
    tiered_imagenet_splits,
)
from metafunc.data.cub import cub_split_of


def seeded(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def never(*args: Any, **kwargs: Any) -> Any:
    raise AssertionError("decoded images although the cache should have been used")


class Evil:
    """Unpickling this runs a shell command: what the safe loader must refuse without running."""

    def __init__(self, sentinel: Path) -> None:
        self.sentinel = sentinel

    def __reduce__(self) -> tuple[Any, ...]:
        return (os.system, (f"touch {self.sentinel}",))


def md5_of(path: Path) -> str:
    return hashlib.md5(path.read_bytes(), usedforsecurity=False).hexdigest()


def tar_folder(archive: Path, folder: Path, extra: dict[str, bytes] | None = None) -> None:
    with tarfile.open(archive, "w:gz") as tar:
        tar.add(folder, arcname=folder.name)
        for name, data in (extra or {}).items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))


# --- tiered-ImageNet ------------------------------------------------------------------------------


def tiered_pixels(sizes: list[int], shade: int) -> tuple[np.ndarray, np.ndarray]:
    """RGB images [N, 84, 84, 3] with classes interleaved: red = shade + class, green = index."""
    labels = np.concatenate([np.full(n, c) for c, n in enumerate(sizes)])
    labels = labels[np.random.default_rng(shade).permutation(len(labels))]
    rgb = np.zeros((len(labels), 84, 84, 3), dtype=np.uint8)
    rgb[..., 0] = (shade + labels)[:, None, None]
    rgb[..., 1] = np.arange(len(labels))[:, None, None]
    rgb[..., 2] = 9
    rgb[:, 0, 1, 2] = 250  # row 0, column 1, blue: catches a transposed or channel-swapped image
    return rgb, labels


def write_labels(path: Path, labels: np.ndarray, names: list[str], protocol: int) -> None:
    content = {
        "label_specific": labels.astype(np.int32),
        "label_general": np.zeros(len(labels), dtype=np.int32),
        "label_specific_str": names,
        "label_general_str": ["everything"],
    }
    with open(path, "wb") as f:
        pickle.dump(content, f, protocol=protocol)


def write_tiered(root: Path, split: str, kind: str, names: list[str], sizes: list[int]) -> None:
    """One split as the authors' PNG pickle, its OpenCV npz, or ImageNet wnid folders."""
    folder = root / "tiered-imagenet"
    folder.mkdir(parents=True, exist_ok=True)
    rgb, labels = tiered_pixels(sizes, shade=10 * len(split))
    if kind == "folder":
        for c, name in enumerate(names):
            (folder / split / name).mkdir(parents=True)
            for i in np.flatnonzero(labels == c):
                Image.fromarray(rgb[i]).save(folder / split / name / f"{name}_{i}.png")
        return
    write_labels(folder / f"{split}_labels.pkl", labels, names, protocol=2)
    if kind == "npz":  # the authors' decompress() writes OpenCV's BGR
        np.savez(folder / f"{split}_images.npz", images=rgb[..., ::-1])
        return
    encoded = []
    for i, image in enumerate(rgb):
        buffer = io.BytesIO()
        Image.fromarray(image).save(buffer, format="PNG")
        raw = buffer.getvalue()  # cv2.imencode gives a uint8 [n, 1] array; bytes work too
        encoded.append(np.frombuffer(raw, dtype=np.uint8)[:, None] if i % 2 else raw)
    with open(folder / f"{split}_images_png.pkl", "wb") as f:
        pickle.dump(encoded, f)


TIERED = {
    "train": (["house finch", "crane", "robin"], [3, 2, 4]),
    "val": (["tabby", "lynx"], [2, 3]),
    "test": (["n03126707", "n04592741"], [2, 2]),  # wnids: the folder layout's names
}


def check_tiered_split(data: Any, split: str) -> None:
    names, sizes = TIERED[split]
    shape = (len(names), max(sizes), 3, 84, 84)
    assert data.images.dtype == torch.uint8 and data.images.shape == shape
    assert data.example_counts().tolist() == sizes
    for c in range(len(names)):
        real = data.images[c, : sizes[c]]
        assert bool((real[:, 0, 1:] == 10 * len(split) + c).all()), "grouped by label"
        assert bool((real[:, 2, 1:] == 9).all()) and bool((real[:, 2, 0, 1] == 250).all())
        assert len(set(real[:, 1, 5, 5].tolist())) == sizes[c], "every image once"


def test_tiered_formats(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    one, two = tmp_path / "one", tmp_path / "two"
    for root, kinds in ((one, ("png", "npz", "folder")), (two, ("npz", "png", "folder"))):
        for split, kind in zip(("train", "val", "test"), kinds, strict=True):
            write_tiered(root, split, kind, *TIERED[split])
    first = tiered_imagenet_splits(one, cache_dir=tmp_path / "c")
    second = tiered_imagenet_splits(two, cache_dir=tmp_path / "c")
    for split, a, b in zip(("train", "val", "test"), first, second, strict=True):
        check_tiered_split(a, split)
        assert a.classes == b.classes == tuple(TIERED[split][0])
        assert torch.equal(a.images, b.images), "the PNG pickle and the BGR npz agree"
    monkeypatch.setattr(Image, "open", never)  # the PNG pickle's images are opened by PIL
    monkeypatch.setattr(folder_module, "decode_images", never)
    again = tiered_imagenet_splits(one, cache_dir=tmp_path / "c")
    assert all(torch.equal(a.images, b.images) for a, b in zip(first, again, strict=True))
    with pytest.raises(AssertionError, match="decoded images"):  # the patch is what was avoided
        tiered_imagenet_splits(one, cache=False)


def test_tiered_resizing_and_repeated_names(tmp_path: Path) -> None:
    write_tiered(tmp_path, "train", "png", ["crane", "kite"], [2, 2])
    write_tiered(tmp_path, "val", "npz", ["tabby", "lynx"], [2, 2])
    write_tiered(tmp_path, "test", "png", ["crane", "ibex"], [2, 2])  # a second synset "crane"
    with pytest.raises(ValueError, match=r"val_images.npz holds 84x84.*pass image_size=84"):
        tiered_imagenet_splits(tmp_path, image_size=8, cache=False)
    (tmp_path / "tiered-imagenet" / "val_images.npz").unlink()
    write_tiered(tmp_path, "val", "png", ["tabby", "lynx"], [2, 2])
    train, val, test = tiered_imagenet_splits(tmp_path, image_size=8, cache=False)
    assert val is not None and train.images.shape == (2, 2, 3, 8, 8)
    assert train.classes == ("crane (train 0)", "kite") and test.classes[0] == "crane (test 0)"


def test_tiered_errors_and_unsafe_pickle(tmp_path: Path) -> None:
    with pytest.raises(
        FileNotFoundError,
        match=r"no 'train' split .*train_images_png.pkl and train_labels.pkl .*train_images.npz"
        r".*train/<wnid>/\*.JPEG",
    ):
        tiered_imagenet_splits(tmp_path, cache=False)
    for split in ("train", "val", "test"):
        write_tiered(tmp_path, split, "png", *TIERED[split][:1], [2] * len(TIERED[split][0]))
    labels = tmp_path / "tiered-imagenet" / "val_labels.pkl"
    labels.rename(labels.with_suffix(".bak"))
    with pytest.raises(FileNotFoundError, match=r"val_images_png.pkl needs val_labels.pkl"):
        tiered_imagenet_splits(tmp_path, cache=False)
    sentinel = tmp_path / "pwned"
    with open(labels, "wb") as f:
        pickle.dump({"label_specific": Evil(sentinel), "label_specific_str": ["a"]}, f)
    with pytest.raises(UnsafePickleError, match=r"refused to unpickle .*val_labels.pkl.*\.system"):
        tiered_imagenet_splits(tmp_path, cache=False)
    assert not sentinel.exists(), "the pickled command ran"


def test_tiered_benchmark(tmp_path: Path) -> None:
    for split in ("train", "val", "test"):
        write_tiered(tmp_path, split, "npz" if split == "val" else "png", *TIERED[split])
    bench = get_benchmark(
        "tiered-imagenet", tmp_path, ways=2, shots=1, queries=1, cache_dir=tmp_path / "c"
    )
    batch = bench.train.sample(3, seeded(0))
    assert batch.support_x.shape == (3, 2, 3, 84, 84) and batch.query_x.shape == (3, 2, 3, 84, 84)


# --- CUB-200-2011 ---------------------------------------------------------------------------------

# The first eight CUB classes; torchmeta's CUB test list (Chen et al.'s split) starts with 004, 008.
CUB_NAMES = (
    "001.Black_footed_Albatross", "002.Laysan_Albatross", "003.Sooty_Albatross",
    "004.Groove_billed_Ani", "005.Crested_Auklet", "006.Least_Auklet", "007.Parakeet_Auklet",
    "008.Rhinoceros_Auklet",
)  # fmt: skip
CUB_SIZES = (3, 2, 2, 2, 3, 2, 2, 2)


def write_cub(root: Path) -> Path:
    """CUB_200_2011/ with its index files; image ids interleave the classes as in the release."""
    folder = root / "CUB_200_2011"
    (folder / "images").mkdir(parents=True)
    rows: list[tuple[int, int, str]] = []
    for k in range(max(CUB_SIZES)):
        for c, name in enumerate(CUB_NAMES, start=1):
            if k < CUB_SIZES[c - 1]:
                rows.append((len(rows) + 1, c, f"{name}/{name[4:]}_{k:04d}_{len(rows)}.jpg"))
    for _, c, path in rows:
        (folder / "images" / path).parent.mkdir(exist_ok=True)
        picture = Image.new("RGB", (40, 30), (20 * c, 200, 40))
        picture.paste((200, 20 * c, 90), (10, 5, 20, 15))  # the bird, inside its bounding box
        picture.save(folder / "images" / path, quality=95, subsampling=0)
    (folder / "classes.txt").write_text("".join(f"{c} {n}\n" for c, n in enumerate(CUB_NAMES, 1)))
    (folder / "images.txt").write_text("".join(f"{i} {p}\n" for i, _, p in rows))
    (folder / "image_class_labels.txt").write_text("".join(f"{i} {c}\n" for i, c, _ in rows))
    (folder / "bounding_boxes.txt").write_text(
        "".join(f"{i} 10.0 5.0 10.0 10.0\n" for i, *_ in rows)
    )
    return folder


def test_cub_split_rule() -> None:
    split = {
        s: [c for c in range(1, 201) if cub_split_of(c) == s] for s in ("train", "val", "test")
    }
    assert [len(v) for v in split.values()] == [100, 50, 50]
    assert split["test"] == list(range(4, 201, 4)), "torchmeta's CUB test list: 004, 008, ..., 200"
    assert split["train"] == list(range(1, 201, 2)) and split["val"] == list(range(2, 201, 4))


def test_cub_folder_crop_and_cache(tmp_path: Path) -> None:
    folder = write_cub(tmp_path)
    train, val, test = cub_splits(tmp_path, image_size=12, cache_dir=tmp_path / "c")
    assert val is not None
    assert train.classes == CUB_NAMES[0::2] and val.classes == (CUB_NAMES[1], CUB_NAMES[5])
    assert test.classes == ("004.Groove_billed_Ani", "008.Rhinoceros_Auklet")
    assert train.images.dtype == torch.uint8 and train.images.shape == (4, 3, 3, 12, 12)
    assert train.example_counts().tolist() == [3, 2, 3, 2]
    for part in (train, val, test):
        for c, name in enumerate(part.classes):
            corner = part.images[c, : part.example_counts()[c], :, 0, 0].int()
            assert (corner - torch.tensor([20 * int(name[:3]), 200, 40])).abs().max() <= 6
    cropped = cub_splits(tmp_path, image_size=12, crop="bbox", cache_dir=tmp_path / "c")
    bird = cropped.train.images[1, :2, :, 2:-2, 2:-2].int()  # class 003: only the box's colour
    assert (bird - torch.tensor([200, 60, 90])[:, None, None]).abs().max() <= 12
    shutil.rmtree(folder / "images")
    again = cub_splits(tmp_path, image_size=12, cache_dir=tmp_path / "c")
    assert torch.equal(again.test.images, test.images), "read from the cache"
    with pytest.raises(FileNotFoundError, match=r"cub_splits.*image file .*Black_footed"):
        cub_splits(tmp_path, image_size=12, cache=False)


def test_cub_tarball_md5(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(
        FileNotFoundError,
        match=r"CUB_200_2011/ with images.txt.*CUB_200_2011.tgz \(md5 97eceeb196236b17998738112f37",
    ):
        cub_splits(tmp_path, cache=False)
    source = write_cub(tmp_path / "src")
    archive = tmp_path / "CUB_200_2011.tgz"
    tar_folder(archive, source, extra={"attributes.txt": b"1 has_bill_shape::dagger\n"})
    with pytest.raises(ChecksumError, match=r"CUB_200_2011.tgz has md5 .*expected 97eceeb1962"):
        cub_splits(tmp_path, cache=False)
    assert not (tmp_path / "CUB_200_2011").exists(), "nothing unpacked from an unverified file"
    monkeypatch.setattr(cub_module, "CUB_MD5", md5_of(archive))
    splits = cub_splits(tmp_path, image_size=10, cache=False)
    assert splits.test.classes == ("004.Groove_billed_Ani", "008.Rhinoceros_Auklet")
    assert (tmp_path / "CUB_200_2011" / "images.txt").is_file()
    assert not (tmp_path / "attributes.txt").exists(), "only CUB_200_2011/ is unpacked"
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []
    bench = get_benchmark("cub", tmp_path, ways=2, shots=1, queries=1, cache_dir=tmp_path / "c")
    assert bench.test.sample(2, seeded(0)).query_x.shape == (2, 2, 3, 84, 84)
    crafted = tmp_path / "crafted" / "CUB_200_2011.tgz"
    crafted.parent.mkdir()
    with tarfile.open(crafted, "w:gz") as tar:
        link = tarfile.TarInfo("CUB_200_2011/images.txt")
        link.type, link.linkname = tarfile.SYMTYPE, "/etc/passwd"
        tar.addfile(link)
    monkeypatch.setattr(cub_module, "CUB_MD5", md5_of(crafted))
    with pytest.raises(ValueError, match=r"holds 'CUB_200_2011/images.txt', a link"):
        cub_splits(crafted.parent, cache=False)
    assert [p.name for p in crafted.parent.iterdir()] == ["CUB_200_2011.tgz"]


# --- FC100 ----------------------------------------------------------------------------------------

# CIFAR-100's superclasses and their classes, as listed on its web page: an independent reference.
CIFAR100_SUPER = {
    "aquatic_mammals": "beaver dolphin otter seal whale",
    "fish": "aquarium_fish flatfish ray shark trout",
    "flowers": "orchid poppy rose sunflower tulip",
    "food_containers": "bottle bowl can cup plate",
    "fruit_and_vegetables": "apple mushroom orange pear sweet_pepper",
    "household_electrical_devices": "clock keyboard lamp telephone television",
    "household_furniture": "bed chair couch table wardrobe",
    "insects": "bee beetle butterfly caterpillar cockroach",
    "large_carnivores": "bear leopard lion tiger wolf",
    "large_man-made_outdoor_things": "bridge castle house road skyscraper",
    "large_natural_outdoor_scenes": "cloud forest mountain plain sea",
    "large_omnivores_and_herbivores": "camel cattle chimpanzee elephant kangaroo",
    "medium_mammals": "fox porcupine possum raccoon skunk",
    "non-insect_invertebrates": "crab lobster snail spider worm",
    "people": "baby boy girl man woman",
    "reptiles": "crocodile dinosaur lizard snake turtle",
    "small_mammals": "hamster mouse rabbit shrew squirrel",
    "trees": "maple_tree oak_tree palm_tree pine_tree willow_tree",
    "vehicles_1": "bicycle bus motorcycle pickup_truck train",
    "vehicles_2": "lawn_mower rocket streetcar tank tractor",
}
FINE = sorted(n for names in CIFAR100_SUPER.values() for n in names.split())
COARSE = list(CIFAR100_SUPER)


def write_cifar100(root: Path) -> Path:
    """torchvision's cifar-100-python/: 2 training and 1 test image per class, shuffled."""
    folder = root / "cifar-100-python"
    folder.mkdir(parents=True)
    coarse_of = {n: COARSE.index(s) for s, names in CIFAR100_SUPER.items() for n in names.split()}
    g = np.random.default_rng(0)
    for part, per_class, marker in (("train", 2, 0), ("test", 1, 1)):
        labels = g.permutation(np.repeat(np.arange(100), per_class))
        planes = np.zeros((len(labels), 3, 32, 32), dtype=np.uint8)
        planes[:, 0] = labels[:, None, None]
        planes[:, 0, 0, 1] = 200  # row 0, column 1: catches a transposed image
        planes[:, 2] = marker
        content = {
            b"data": planes.reshape(len(labels), 3072),
            b"fine_labels": labels.tolist(),
            b"coarse_labels": [coarse_of[FINE[i]] for i in labels],
        }
        with open(folder / part, "wb") as f:
            pickle.dump(content, f, protocol=2)
    with open(folder / "meta", "wb") as f:
        pickle.dump({b"fine_label_names": FINE, b"coarse_label_names": COARSE}, f, protocol=2)
    return folder


def test_fc100_superclass_split(tmp_path: Path) -> None:
    write_cifar100(tmp_path)
    train, val, test = fc100_splits(tmp_path)
    assert val is not None
    assert [p.images.shape for p in (train, val, test)] == [
        (60, 3, 3, 32, 32), (20, 3, 3, 32, 32), (20, 3, 3, 32, 32)
    ]  # fmt: skip
    assert train.images.dtype == torch.uint8
    for part, indices in ((train, (1, 2, 3, 4, 5, 6, 9, 10, 15, 17, 18, 19)),
                          (val, (8, 11, 13, 16)), (test, (0, 7, 12, 14))):  # fmt: skip
        expected = [n for i in indices for n in sorted(CIFAR100_SUPER[COARSE[i]].split())]
        assert list(part.classes) == expected, "Oreshkin et al.'s superclass indices"
        for c, name in enumerate(part.classes):
            assert bool((part.images[c, :, 0, 1:] == FINE.index(name)).all())
        assert bool((part.images[:, :, 0, 0, 1] == 200).all())
        assert part.images[:, :2, 2].eq(0).all() and part.images[:, 2:, 2].eq(1).all()
    assert set(FC100_SUPERCLASSES["test"]) == {COARSE[i] for i in (0, 7, 12, 14)}
    bench = get_benchmark("fc100", tmp_path, ways=2, shots=1, queries=1)
    assert bench.validation is not None
    assert bench.validation.sample(4, seeded(0)).support_x.shape == (4, 2, 3, 32, 32)


def test_fc100_tarball_download_and_unsafe_pickle(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    with pytest.raises(
        FileNotFoundError,
        match=r"cifar-100-python.tar.gz \(md5 eb9058c3a382ffc7106e4002c42a8d85\).*download=True",
    ):
        fc100_splits(tmp_path)
    source = write_cifar100(tmp_path / "src")
    made = tmp_path / "made.tar.gz"
    tar_folder(made, source)
    fetched: list[tuple[str, str]] = []

    def fake_download(url: str, path: Path, *, md5: str, call: str) -> Path:
        fetched.append((url, md5))
        shutil.copyfile(made, path)
        return path

    monkeypatch.setattr(fc100_module, "download_file", fake_download)
    monkeypatch.setattr(fc100_module, "CIFAR100_MD5", md5_of(made))
    train = fc100_splits(tmp_path / "down", download=True).train
    assert fetched == [(fc100_module.CIFAR100_URL, md5_of(made))] and train.num_classes == 60
    monkeypatch.setattr(fc100_module, "CIFAR100_MD5", "0" * 32)
    shutil.copyfile(made, tmp_path / "cifar-100-python.tar.gz")
    with pytest.raises(ChecksumError, match=r"cifar-100-python.tar.gz has md5 .*expected 0000"):
        fc100_splits(tmp_path)
    sentinel = tmp_path / "pwned"
    with open(source / "meta", "wb") as f:
        pickle.dump({"fine_label_names": Evil(sentinel)}, f)
    for load in (fc100_splits, cifar_fs_splits):  # CIFAR-FS reads the same files the same way
        with pytest.raises(UnsafePickleError, match=r"refused to unpickle .*meta: .*\.system"):
            load(tmp_path / "src")
    assert not sentinel.exists(), "the pickled command ran"
