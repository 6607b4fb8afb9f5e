"""Omniglot: the full set from $METAFUNC_DATA, the official zips, splits, cache, download, errors.

The full set is decoded once per session (about 15-25 s on 2 busy cores) into a session-wide cache
folder; every later load in the session reads that cache.
"""

from __future__ import annotations

import functools
import hashlib
import http.server
import shutil
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image, ImageDraw

import metafunc.data.omniglot as omniglot_module
from metafunc.data import OMNIGLOT_URL, ChecksumError, ClassImages, load_omniglot, omniglot_splits

SMALL1_MD5 = "e704a628b5459e08445c13499850abc4"


@pytest.fixture(scope="session")
def cache_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One cache folder for the whole session, so the full set is decoded only once."""
    return tmp_path_factory.mktemp("metafunc-cache")


@pytest.fixture
def full(data_root: Path, cache_dir: Path) -> dict[str, ClassImages]:
    return {
        s: load_omniglot(data_root, s, cache_dir=cache_dir) for s in ("background", "evaluation")
    }


class _CountingDecoder:
    """Wraps ``decode_images`` to count how many images a load decodes."""

    def __init__(self) -> None:
        self.images = 0

    def __call__(self, sources: Any, **kwargs: Any) -> Any:
        self.images += len(sources)
        return _original_decode(sources, **kwargs)


_original_decode = omniglot_module.decode_images


def test_full_set_counts_and_pixels(data_root: Path, full: dict[str, ClassImages]) -> None:
    import torchvision

    background, evaluation = full["background"], full["evaluation"]
    assert background.images.shape == (964, 20, 28, 28) and background.images.dtype == torch.uint8
    assert evaluation.images.shape == (659, 20, 28, 28)
    assert background.counts is None and evaluation.counts is None
    for data in (background, evaluation):  # white strokes on a black background
        assert float((data.images == 0).double().mean()) > 0.6
        assert int(data.images.amax(dim=(-2, -1)).min()) > 100, "every drawing has bright strokes"

    class Folder(torchvision.datasets.Omniglot):  # the shared folder has no full zips to check
        def _check_integrity(self) -> bool:
            return True

    reference = Folder(str(data_root), background=False)
    names = {f"images_evaluation/{c}" for c in reference._characters}
    assert names == set(evaluation.classes)
    position = {name: i for i, name in enumerate(evaluation.classes)}
    for character in (0, 123, 658):
        files = sorted(reference._character_images[character])
        row = position[f"images_evaluation/{reference._characters[character]}"]
        for j in (0, 19):
            index = reference._flat_character_images.index(files[j])
            image, target = reference[index]
            assert target == character
            expected = 255 - torch.from_numpy(np.array(image.resize((28, 28), Image.LANCZOS)))
            assert torch.equal(evaluation.images[row, j], expected)


def test_cached_reload_does_not_decode(
    data_root: Path, cache_dir: Path, full: dict[str, ClassImages], monkeypatch: pytest.MonkeyPatch
) -> None:
    def no_decoding(*args: Any, **kwargs: Any) -> Any:
        raise AssertionError("the second load decoded PNGs instead of reading the cache")

    monkeypatch.setattr(omniglot_module, "decode_images", no_decoding)
    again = load_omniglot(data_root, "background", cache_dir=cache_dir)
    assert torch.equal(again.images, full["background"].images)
    assert again.classes == full["background"].classes
    assert (cache_dir / "omniglot" / "images_background-28x28-lanczos.safetensors").is_file()
    # METAFUNC_CACHE selects the same folder when no cache_dir is given.
    monkeypatch.setenv("METAFUNC_CACHE", str(cache_dir))
    assert torch.equal(load_omniglot(data_root, "evaluation").images, full["evaluation"].images)


def test_cache_is_keyed_by_resolution(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    _fake_layout(tmp_path, characters=4, drawings=3)
    counter = _CountingDecoder()
    monkeypatch.setattr(omniglot_module, "decode_images", counter)
    cache = tmp_path / "cache"
    assert load_omniglot(tmp_path, cache_dir=cache).images.shape == (4, 3, 28, 28)
    assert counter.images == 12
    assert load_omniglot(tmp_path, cache_dir=cache).images.shape == (4, 3, 28, 28)
    assert counter.images == 12, "the second load read the cache"
    tiny = load_omniglot(tmp_path, image_size=14, resample="bilinear", cache_dir=cache)
    assert counter.images == 24, "a new resolution must decode, not reuse the 28x28 cache"
    assert tiny.images.shape == (4, 3, 14, 14)
    assert sorted(p.name for p in (cache / "omniglot").iterdir()) == [
        "images_background-14x14-bilinear.safetensors",
        "images_background-28x28-lanczos.safetensors",
    ]
    load_omniglot(tmp_path, cache=False, cache_dir=cache)
    assert counter.images == 36, "cache=False decodes"


def test_small_sets_from_zips_match_the_folders(
    data_root: Path, cache_dir: Path, full: dict[str, ClassImages]
) -> None:
    background = full["background"]
    for source, count, alphabets in (
        ("small1", 136, {"Balinese", "Early_Aramaic", "Greek", "Korean", "Latin"}),
        ("small2", 156, {"Greek", "Japanese_(katakana)", "Latin", "Sanskrit", "Tagalog"}),
    ):
        small = load_omniglot(data_root, source, cache_dir=cache_dir)
        assert small.images.shape == (count, 20, 28, 28)
        assert {name.split("/")[1] for name in small.classes} == alphabets
        # Greek is in both minimal sets and in the full background set: same pixels.
        greek = [n for n in small.classes if n.split("/")[1] == "Greek"]
        from_zip = small.select_names(greek, call="test")
        from_folder = background.select_names(
            [n.replace(f"images_background_{source}/", "images_background/") for n in greek],
            call="test",
        )
        assert len(greek) == 24 and torch.equal(from_zip.images, from_folder.images)


def test_vinyals_split(data_root: Path, cache_dir: Path, full: dict[str, ClassImages]) -> None:
    splits = omniglot_splits(data_root, "vinyals", cache_dir=cache_dir)
    assert splits.validation is not None
    sizes = (splits.train.num_classes, splits.validation.num_classes, splits.test.num_classes)
    assert sizes == (1100, 100, 423)
    names = [set(s.classes) for s in (splits.train, splits.validation, splits.test)]
    assert not (names[0] & names[1] or names[0] & names[2] or names[1] & names[2])
    assert names[0] | names[1] | names[2] == set(full["background"].classes) | set(
        full["evaluation"].classes
    )
    # Both sets contribute to test: the split mixes background and evaluation characters.
    assert {n.split("/")[0] for n in splits.test.classes} == {
        "images_background",
        "images_evaluation",
    }
    # Images follow their names.
    name = splits.test.classes[5]
    source = full["background"] if name.startswith("images_background/") else full["evaluation"]
    assert torch.equal(splits.test.images[5], source.select_names([name], call="test").images[0])
    same = omniglot_splits(data_root, "vinyals", cache_dir=cache_dir)
    assert same.test.classes == splits.test.classes and same.train.classes == splits.train.classes
    other = omniglot_splits(data_root, "vinyals", split_seed=1, cache_dir=cache_dir)
    assert set(other.test.classes) != set(splits.test.classes)


def test_lake_and_small_splits(
    data_root: Path, cache_dir: Path, full: dict[str, ClassImages]
) -> None:
    lake = omniglot_splits(data_root, "lake", cache_dir=cache_dir)
    assert lake.validation is None
    assert (
        lake.train.classes == full["background"].classes
        and lake.test.classes == full["evaluation"].classes
    )
    held = omniglot_splits(data_root, "lake", num_validation=50, cache_dir=cache_dir)
    assert held.validation is not None and held.validation.num_classes == 50
    assert set(held.train.classes) | set(held.validation.classes) == set(lake.train.classes)
    small = omniglot_splits(data_root, "small2", cache_dir=cache_dir)
    assert small.train.num_classes == 156 and small.test.num_classes == 659
    with pytest.raises(
        ValueError, match=r"omniglot_splits: unknown split 'vinyal'.*'vinyals', 'lake'"
    ):
        omniglot_splits(data_root, "vinyal", cache_dir=cache_dir)
    with pytest.raises(ValueError, match=r"load_omniglot: unknown source 'images'.*'background'"):
        load_omniglot(data_root, "images", cache_dir=cache_dir)


# --- archives, download and errors (no full decode) ---------------------------------------------


def test_checksum_mismatch_names_file_and_digests(data_root: Path, tmp_path: Path) -> None:
    archive = tmp_path / "omniglot-py" / "images_background_small1.zip"
    archive.parent.mkdir()
    data = bytearray((data_root / "omniglot-py" / archive.name).read_bytes())
    data[len(data) // 2] ^= 0xFF
    archive.write_bytes(bytes(data))
    actual = hashlib.md5(bytes(data)).hexdigest()
    with pytest.raises(ChecksumError) as info:
        load_omniglot(tmp_path, "small1", cache_dir=tmp_path / "cache")
    message = str(info.value)
    assert message.startswith("load_omniglot(source='small1')")
    assert str(archive) in message and SMALL1_MD5 in message and actual in message


def test_missing_files_say_what_to_put_where(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError) as info:
        load_omniglot(tmp_path, "background", cache_dir=tmp_path / "cache")
    message = str(info.value)
    assert "images_background.zip" in message and "68d2efa1b9178cc56df9314c21c6e718" in message
    assert str(tmp_path / "omniglot-py") in message and "download=True" in message
    assert OMNIGLOT_URL + "images_background.zip" in message
    (tmp_path / "omniglot-py" / "images_evaluation").mkdir(parents=True)
    with pytest.raises(
        FileNotFoundError, match=rf"looks like omniglot-py/ itself: pass root={tmp_path}\."
    ):
        load_omniglot(tmp_path / "omniglot-py", "evaluation", cache_dir=tmp_path / "cache")


@pytest.fixture
def server(data_root: Path, tmp_path: Path) -> Iterator[tuple[str, Path]]:
    """An HTTP server on 127.0.0.1 serving a copy of the small1 zip (and a wrong one)."""
    served = tmp_path / "served"
    (served / "good").mkdir(parents=True)
    (served / "bad").mkdir()
    name = "images_background_small1.zip"
    shutil.copy(data_root / "omniglot-py" / name, served / "good" / name)
    shutil.copy(data_root / "omniglot-py" / "images_background_small2.zip", served / "bad" / name)
    handler = functools.partial(QuietHandler, directory=str(served))
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{httpd.server_address[1]}", served
    finally:
        httpd.shutdown()
        httpd.server_close()
        thread.join()


class QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, format: str, *args: Any) -> None:
        pass


def test_download_fetches_verifies_and_loads(server: tuple[str, Path], tmp_path: Path) -> None:
    url, _ = server
    root = tmp_path / "root"
    data = load_omniglot(
        root, "small1", download=True, base_url=f"{url}/good/", cache_dir=tmp_path / "c"
    )
    archive = root / "omniglot-py" / "images_background_small1.zip"
    assert hashlib.md5(archive.read_bytes()).hexdigest() == SMALL1_MD5
    assert data.images.shape == (136, 20, 28, 28)
    assert [p.name for p in archive.parent.iterdir()] == [archive.name], "no temporary files left"


def test_download_of_wrong_bytes_writes_nothing(server: tuple[str, Path], tmp_path: Path) -> None:
    url, _ = server
    root = tmp_path / "root"
    with pytest.raises(
        ChecksumError, match=rf"load_omniglot.*has md5 [0-9a-f]{{32}}, expected {SMALL1_MD5}"
    ):
        load_omniglot(
            root, "small1", download=True, base_url=f"{url}/bad/", cache_dir=tmp_path / "c"
        )
    assert list((root / "omniglot-py").iterdir()) == []
    with pytest.raises(ConnectionError, match=r"could not download .*/missing/.*put it at"):
        load_omniglot(
            root, "small1", download=True, base_url=f"{url}/missing/", cache_dir=tmp_path / "c"
        )


def _write_drawing(path: Path, seed: int) -> None:
    """A 105x105 1-bit PNG, black strokes on white, like the official files."""
    g = torch.Generator().manual_seed(seed)
    image = Image.new("1", (105, 105), 1)
    points = (torch.rand(6, generator=g) * 105).tolist()
    ImageDraw.Draw(image).line(points, fill=0, width=6)
    path.parent.mkdir(parents=True, exist_ok=True)
    image.save(path)


def _fake_layout(root: Path, characters: int, drawings: int) -> list[Path]:
    files = []
    for c in range(characters):
        for d in range(drawings):
            path = (
                root
                / "omniglot-py"
                / "images_background"
                / f"Alpha{c % 2}"
                / f"character{c:02d}"
                / f"{c:04d}_{d:02d}.png"
            )
            _write_drawing(path, seed=100 * c + d)
            files.append(path)
    return files


def test_fake_layout_inverts_resizes_and_orders(tmp_path: Path) -> None:
    files = _fake_layout(tmp_path, characters=4, drawings=3)
    data = load_omniglot(
        tmp_path, image_size=(20, 24), resample="bilinear", cache_dir=tmp_path / "c"
    )
    assert data.classes == (
        "images_background/Alpha0/character00",
        "images_background/Alpha0/character02",
        "images_background/Alpha1/character01",
        "images_background/Alpha1/character03",
    )
    with Image.open(files[2 * 3 + 1]) as image:  # character02, drawing 01
        expected = 255 - torch.from_numpy(
            np.array(image.convert("L").resize((24, 20), Image.BILINEAR))
        )
    assert torch.equal(data.images[1, 1], expected)


@pytest.mark.parametrize("workers", [0, 2])
def test_corrupt_png_is_named(tmp_path: Path, workers: int) -> None:
    files = _fake_layout(tmp_path, characters=26 if workers else 2, drawings=20)
    bad = files[len(files) - 7]
    bad.write_bytes(b"\x89PNG\r\n\x1a\n" + b"not really a png")
    with pytest.raises(
        ValueError, match=r"load_omniglot\(source='background'\): cannot decode image"
    ) as info:
        load_omniglot(tmp_path, workers=workers, cache_dir=tmp_path / "c")
    assert str(bad) in str(info.value) and "replace it" in str(info.value)


def test_empty_folder_and_corrupt_cache(tmp_path: Path) -> None:
    (tmp_path / "omniglot-py" / "images_background").mkdir(parents=True)
    with pytest.raises(ValueError, match=r"load_omniglot.*images_background holds no"):
        load_omniglot(tmp_path, cache_dir=tmp_path / "c")
    _fake_layout(tmp_path, characters=2, drawings=3)
    first = load_omniglot(tmp_path, cache_dir=tmp_path / "c")
    key = tmp_path / "c" / "omniglot" / "images_background-28x28-lanczos.safetensors"
    key.write_bytes(key.read_bytes()[:100])  # a damaged cache file is a miss, not an error
    assert torch.equal(load_omniglot(tmp_path, cache_dir=tmp_path / "c").images, first.images)
    assert len(key.read_bytes()) > 100, "the damaged cache file was rewritten"


def test_omniglot_benchmark(data_root: Path, cache_dir: Path) -> None:
    from metafunc.data import EpisodeSampler, get_benchmark

    bench = get_benchmark("omniglot", data_root, ways=20, shots=1, queries=5, cache_dir=cache_dir)
    assert isinstance(bench.train, EpisodeSampler) and isinstance(bench.test, EpisodeSampler)
    assert bench.validation is not None and isinstance(bench.validation, EpisodeSampler)
    assert bench.train.num_classes == 1100 * 4, "training classes are augmented by rotation"
    assert bench.validation.num_classes == 100 and bench.test.num_classes == 423
    batch = bench.train.sample(32, torch.Generator().manual_seed(0))
    assert batch.support_x.shape == (32, 20, 1, 28, 28) and batch.query_x.shape == (
        32,
        100,
        1,
        28,
        28,
    )
    first = list(bench.test.episodes(600, seed=0, batch_size=100))
    again = list(bench.test.episodes(600, seed=0, batch_size=100))
    assert len(first) == 6
    assert all(torch.equal(a.query_x, b.query_x) for a, b in zip(first, again, strict=True))
    lake = get_benchmark("omniglot-lake", data_root, ways=5, cache_dir=cache_dir)
    assert lake.validation is None and lake.train.num_classes == 964 * 4
