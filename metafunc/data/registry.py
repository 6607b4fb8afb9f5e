"""Named benchmarks: meta-train, validation and test task samplers in one call.

>>> bench = get_benchmark("omniglot", root="data", ways=20, shots=1, queries=5)
>>> batch = bench.train.sample(32, torch.Generator().manual_seed(0))
>>> for batch in bench.test.episodes(600, seed=0, batch_size=50): ...
"""

from __future__ import annotations

import inspect
import math
import os
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any, NamedTuple

import torch

from metafunc.data.cifarfs import cifar_fs_splits
from metafunc.data.cub import cub_splits
from metafunc.data.dataset import ClassImages, ClassSplits
from metafunc.data.fc100 import fc100_splits
from metafunc.data.folder import IMAGE_EXTENSIONS, folder_splits
from metafunc.data.lake import WithinAlphabetRuns, mirrored_alphabets
from metafunc.data.miniimagenet import mini_imagenet_splits
from metafunc.data.omniglot import OMNIGLOT_URL, omniglot_splits
from metafunc.data.sampler import EpisodeSampler, TaskSampler
from metafunc.data.sinusoid import SinusoidTasks
from metafunc.data.tiered import tiered_imagenet_splits

__all__ = ["PROTOCOLS", "Benchmark", "benchmark_names", "get_benchmark"]

PROTOCOLS = ("random", "within-alphabet")
"""Omniglot's evaluation episodes: random characters of any alphabet (Vinyals et al.), or Lake et
al.'s one-shot runs within one alphabet, support and queries by different drawers
(:mod:`metafunc.data.lake`)."""


class Benchmark(NamedTuple):
    """Task samplers for meta-training, validation (``None`` if the benchmark has none) and test."""

    train: TaskSampler
    validation: TaskSampler | None
    test: TaskSampler


class _Common(NamedTuple):
    name: str
    ways: int
    shots: int
    queries: int
    device: torch.device | str | None
    dtype: torch.dtype


def _samplers(
    splits: ClassSplits,
    c: _Common,
    *,
    rotations: Sequence[int] = (0,),
    eval_rotations: Sequence[int] = (0,),
    mean: float | Sequence[float] | None = None,
    std: float | Sequence[float] | None = None,
    augment: str = "none",
) -> Benchmark:
    made: dict[str, EpisodeSampler | None] = {}
    for part in ClassSplits._fields:
        data = getattr(splits, part)
        if data is None:
            made[part] = None
            continue
        try:
            made[part] = EpisodeSampler(
                data, ways=c.ways, shots=c.shots, queries=c.queries,
                rotations=rotations if part == "train" else eval_rotations,
                mean=mean, std=std, device=c.device, dtype=c.dtype,
                augment=augment if part == "train" else "none",
            )  # fmt: skip
        except ValueError as err:
            raise ValueError(f"get_benchmark({c.name!r}): the {part} split: {err}") from err
    train, validation, test = made["train"], made["validation"], made["test"]
    assert train is not None and test is not None  # every ClassSplits has train and test
    return Benchmark(train, validation, test)


def _sinusoid(
    root: Path | None,
    c: _Common,
    *,
    amplitude: tuple[float, float] = (0.1, 5.0),
    phase: tuple[float, float] = (0.0, math.pi),
    x_range: tuple[float, float] = (-5.0, 5.0),
) -> Benchmark:
    tasks = SinusoidTasks(
        shots=c.shots, queries=c.queries, amplitude=amplitude, phase=phase, x_range=x_range,
        device=c.device, dtype=c.dtype,
    )  # fmt: skip
    return Benchmark(tasks, tasks, tasks)


def _omniglot(split: str) -> Callable[..., Benchmark]:
    def build(
        root: Path | None,
        c: _Common,
        *,
        image_size: int | tuple[int, int] = 28,
        resample: str = "lanczos",
        rotations: Sequence[int] = (0, 90, 180, 270),
        eval_rotations: Sequence[int] = (0,),
        num_validation: int | None = None,
        validation_alphabets: int = 0,
        split_seed: int = 0,
        protocol: str = "random",
        train_protocol: str = "random",
        augment: str = "none",
        mirror: bool = False,
        cache_dir: str | os.PathLike[str] | None = None,
        cache: bool = True,
        download: bool = False,
        base_url: str = OMNIGLOT_URL,
        workers: int | None = None,
    ) -> Benchmark:
        for arg, value in (("protocol", protocol), ("train_protocol", train_protocol)):
            if value not in PROTOCOLS:
                raise ValueError(
                    f"get_benchmark({c.name!r}): {arg}={value!r}; use one of {PROTOCOLS}."
                )
        splits = omniglot_splits(
            _data_root(root, c), split, num_validation=num_validation,
            validation_alphabets=validation_alphabets, split_seed=split_seed,
            image_size=image_size, resample=resample, cache_dir=cache_dir, cache=cache,
            download=download, base_url=base_url, workers=workers,
        )  # fmt: skip
        if mirror:
            splits = splits._replace(train=mirrored_alphabets(splits.train))
        made = _samplers(
            splits, c, rotations=rotations, eval_rotations=eval_rotations, augment=augment
        )

        def runs(part: str, data: ClassImages) -> WithinAlphabetRuns:
            train = part == "train"
            try:
                return WithinAlphabetRuns(
                    data, ways=c.ways, shots=c.shots, queries=c.queries, device=c.device,
                    dtype=c.dtype, rotations=rotations if train else (0,),
                    augment=augment if train else "none",
                )  # fmt: skip
            except ValueError as err:
                raise ValueError(f"get_benchmark({c.name!r}): the {part} split: {err}") from err

        train: TaskSampler = made.train
        if train_protocol != "random":
            train = runs("train", splits.train)
        if protocol == "random":
            return Benchmark(train, made.validation, made.test)
        validation = None if splits.validation is None else runs("validation", splits.validation)
        return Benchmark(train, validation, runs("test", splits.test))

    return build


def _decoded(load_splits: Callable[..., ClassSplits]) -> Callable[..., Benchmark]:
    """The builder of a benchmark decoded from image files at ``image_size`` (mini-ImageNet,
    tiered-ImageNet)."""

    def build(
        root: Path | None,
        c: _Common,
        *,
        image_size: int = 84,
        resample: str = "lanczos",
        mean: float | Sequence[float] | None = None,
        std: float | Sequence[float] | None = None,
        cache_dir: str | os.PathLike[str] | None = None,
        cache: bool = True,
        workers: int | None = None,
    ) -> Benchmark:
        splits = load_splits(
            _data_root(root, c), image_size=image_size, resample=resample, cache_dir=cache_dir,
            cache=cache, workers=workers,
        )  # fmt: skip
        return _samplers(splits, c, mean=mean, std=std)

    return build


def _cifar_fs(
    root: Path | None,
    c: _Common,
    *,
    mean: float | Sequence[float] | None = None,
    std: float | Sequence[float] | None = None,
) -> Benchmark:
    return _samplers(cifar_fs_splits(_data_root(root, c)), c, mean=mean, std=std)


def _cub(
    root: Path | None,
    c: _Common,
    *,
    image_size: int = 84,
    resample: str = "lanczos",
    crop: str = "none",
    mean: float | Sequence[float] | None = None,
    std: float | Sequence[float] | None = None,
    cache_dir: str | os.PathLike[str] | None = None,
    cache: bool = True,
    workers: int | None = None,
) -> Benchmark:
    splits = cub_splits(
        _data_root(root, c), image_size=image_size, resample=resample, crop=crop,
        cache_dir=cache_dir, cache=cache, workers=workers,
    )  # fmt: skip
    return _samplers(splits, c, mean=mean, std=std)


def _fc100(
    root: Path | None,
    c: _Common,
    *,
    mean: float | Sequence[float] | None = None,
    std: float | Sequence[float] | None = None,
    download: bool = False,
) -> Benchmark:
    splits = fc100_splits(_data_root(root, c), download=download)
    return _samplers(splits, c, mean=mean, std=std)


def _folder(
    root: Path | None,
    c: _Common,
    *,
    split: Mapping[str, Sequence[str]] | None = None,
    image_size: int | tuple[int, int] = 84,
    channels: int = 3,
    resample: str = "lanczos",
    mean: float | Sequence[float] | None = None,
    std: float | Sequence[float] | None = None,
    rotations: Sequence[int] = (0,),
    extensions: Sequence[str] = IMAGE_EXTENSIONS,
    cache_dir: str | os.PathLike[str] | None = None,
    cache: bool = True,
    workers: int | None = None,
) -> Benchmark:
    if root is None or split is None:
        raise ValueError(
            f"get_benchmark({c.name!r}): pass root=<folder with one subfolder per class> and "
            "split={'train': [...], 'validation': [...], 'test': [...]} (class folder names)."
        )
    splits = folder_splits(
        root, split, image_size=image_size, channels=channels, resample=resample,
        extensions=extensions, cache_dir=cache_dir, cache=cache, workers=workers,
    )  # fmt: skip
    return _samplers(splits, c, rotations=rotations, mean=mean, std=std)


_BUILDERS: dict[str, Callable[..., Benchmark]] = {
    "sinusoid": _sinusoid,
    "omniglot": _omniglot("vinyals"),
    "omniglot-lake": _omniglot("lake"),
    "omniglot-small1": _omniglot("small1"),
    "omniglot-small2": _omniglot("small2"),
    "mini-imagenet": _decoded(mini_imagenet_splits),
    "cifar-fs": _cifar_fs,
    "tiered-imagenet": _decoded(tiered_imagenet_splits),
    "cub": _cub,
    "fc100": _fc100,
    "folder": _folder,
}


def benchmark_names() -> tuple[str, ...]:
    """The names :func:`get_benchmark` accepts."""
    return tuple(_BUILDERS)


def _data_root(root: Path | None, c: _Common) -> Path:
    if root is not None:
        return root
    env = os.environ.get("METAFUNC_DATA")
    if not env:
        raise ValueError(
            f"get_benchmark({c.name!r}): no data folder; pass root=<folder holding the dataset> "
            "or set the METAFUNC_DATA environment variable."
        )
    return Path(env)


def get_benchmark(
    name: str,
    root: str | os.PathLike[str] | None = None,
    *,
    ways: int | None = None,
    shots: int = 1,
    queries: int | None = None,
    device: torch.device | str | None = None,
    dtype: torch.dtype = torch.float32,
    **options: Any,
) -> Benchmark:
    """Train / validation / test task samplers of a named benchmark.

    Args:
        name: one of :func:`benchmark_names`: ``"sinusoid"`` (MAML's regression tasks; the three
            samplers are the same distribution, so use different seeds), ``"omniglot"`` (Vinyals
            split: 1100 / 100 / 423 characters), ``"omniglot-lake"`` (background / evaluation,
            no validation unless ``num_validation`` > 0), ``"omniglot-small1"``,
            ``"omniglot-small2"``, ``"mini-imagenet"`` (64 / 16 / 20), ``"cifar-fs"``
            (64 / 16 / 20), ``"tiered-imagenet"`` (351 / 97 / 160), ``"cub"`` (CUB-200-2011,
            100 / 50 / 50), ``"fc100"`` (CIFAR-100 by superclass, 60 / 20 / 20), ``"folder"``
            (your ``root/<class>/`` images with ``split=``).
        root: the folder holding the dataset (e.g. ``omniglot-py/``); default
            ``$METAFUNC_DATA``. Unused by ``"sinusoid"``.
        ways: N (default 5); sinusoid tasks have no classes and take none.
        shots: K support examples per class (sinusoid: support points).
        queries: Q query examples per class (default 15; sinusoid: ``shots``).
        device, dtype: where the images live and the float dtype of the batches.
        options: per-benchmark keyword arguments. Omniglot: ``image_size=28``, ``resample``,
            ``rotations=(0, 90, 180, 270)`` (training classes only), ``eval_rotations=(0,)``,
            ``num_validation``, ``validation_alphabets=0``, ``split_seed=0``, ``protocol="random"``
            (or ``"within-alphabet"``: Lake et al.'s runs for validation and test,
            :data:`PROTOCOLS`), ``train_protocol="random"`` (or within-alphabet training episodes,
            rotations and augmentation included), ``augment="none"`` (``"affine"``: training images
            distorted, :class:`~metafunc.data.EpisodeSampler`), ``mirror=False`` (training
            characters mirrored as new ones, :func:`~metafunc.data.lake.mirrored_alphabets`),
            ``cache_dir``, ``cache``, ``download``, ``base_url``, ``workers``. mini-ImageNet:
            ``image_size=84``, ``resample``, ``mean``, ``std``, ``cache_dir``, ``cache``,
            ``workers``. CIFAR-FS: ``mean``, ``std``.
            tiered-ImageNet: ``image_size=84``, ``resample``, ``mean``, ``std``, ``cache_dir``,
            ``cache``, ``workers``. CUB: the same and ``crop="none"`` (or ``"bbox"``). FC100:
            ``mean``, ``std``, ``download``. Folder: ``split`` (required), ``image_size=84``,
            ``channels=3``, ``resample``, ``mean``, ``std``, ``rotations``, ``extensions``,
            ``cache_dir``, ``cache``, ``workers``. Sinusoid: ``amplitude``, ``phase``, ``x_range``.

    Raises:
        ValueError: unknown name (the message lists the valid ones), or a split too small for
            ``ways``/``shots``/``queries``. TypeError: an option the benchmark does not take.
    """
    if name not in _BUILDERS:
        raise ValueError(
            f"get_benchmark: unknown benchmark {name!r}; valid names are {benchmark_names()}."
        )
    builder = _BUILDERS[name]
    accepted = [
        p.name for p in inspect.signature(builder).parameters.values() if p.kind == p.KEYWORD_ONLY
    ]
    unknown = sorted(set(options) - set(accepted))
    if unknown:
        raise TypeError(
            f"get_benchmark({name!r}): unknown option(s) {unknown}; {name!r} accepts {accepted}."
        )
    if name == "sinusoid":
        if ways is not None:
            raise ValueError(
                "get_benchmark('sinusoid'): sinusoid regression has no classes; leave ways out."
            )
        ways, queries = 1, shots if queries is None else queries
    common = _Common(
        name, 5 if ways is None else ways, shots, 15 if queries is None else queries, device, dtype
    )
    return builder(None if root is None else Path(root).expanduser(), common, **options)
