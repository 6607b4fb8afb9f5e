"""Tasks and datasets: sinusoid regression, N-way K-shot episodes, image benchmarks.

- :class:`TaskBatch`: support and query sets, with a leading task axis for a meta-batch.
- :class:`SinusoidTasks`: MAML's sinusoid regression tasks.
- :class:`EpisodeSampler`: N-way K-shot Q-query episodes from a class-indexed uint8 tensor, drawn a
  whole meta-batch at a time with tensor ops on the target device.
- Loaders returning :class:`ClassImages`: Omniglot, mini-ImageNet, CIFAR-FS, tiered-ImageNet,
  CUB-200-2011, FC100, folder-per-class.
- :class:`WithinAlphabetRuns`: Lake et al.'s one-shot runs on Omniglot (:mod:`metafunc.data.lake`).
- :func:`get_benchmark`: a named benchmark's train / validation / test samplers.
- :mod:`keys`: counter-based random numbers on tensors, for sampling inside a compiled step
  (the samplers' ``sample_keyed``).
"""

from metafunc.data import keys
from metafunc.data.batch import TaskBatch
from metafunc.data.cache import default_cache_dir
from metafunc.data.cifarfs import CIFAR_FS_CLASSES, cifar_fs_splits, load_cifar_fs
from metafunc.data.cub import cub_splits
from metafunc.data.dataset import ClassImages, ClassSplits, concat_classes, stack_classes
from metafunc.data.download import ChecksumError, check_md5, download_file, md5sum
from metafunc.data.fc100 import FC100_SUPERCLASSES, fc100_splits
from metafunc.data.folder import folder_splits, load_folder
from metafunc.data.lake import WithinAlphabetRuns, mirrored_alphabets
from metafunc.data.miniimagenet import load_mini_imagenet, mini_imagenet_splits
from metafunc.data.omniglot import (
    OMNIGLOT_SOURCES,
    OMNIGLOT_SPLITS,
    OMNIGLOT_URL,
    load_omniglot,
    omniglot_splits,
)
from metafunc.data.registry import PROTOCOLS, Benchmark, benchmark_names, get_benchmark
from metafunc.data.safe_pickle import UnsafePickleError, safe_load
from metafunc.data.sampler import AUGMENTATIONS, EpisodeSampler, TaskSampler
from metafunc.data.sinusoid import SinusoidParams, SinusoidTasks, sinusoid
from metafunc.data.tiered import tiered_imagenet_splits

__all__ = [
    "AUGMENTATIONS",
    "CIFAR_FS_CLASSES",
    "FC100_SUPERCLASSES",
    "OMNIGLOT_SOURCES",
    "OMNIGLOT_SPLITS",
    "OMNIGLOT_URL",
    "PROTOCOLS",
    "Benchmark",
    "ChecksumError",
    "ClassImages",
    "ClassSplits",
    "EpisodeSampler",
    "SinusoidParams",
    "SinusoidTasks",
    "TaskBatch",
    "TaskSampler",
    "UnsafePickleError",
    "WithinAlphabetRuns",
    "benchmark_names",
    "check_md5",
    "cifar_fs_splits",
    "concat_classes",
    "cub_splits",
    "default_cache_dir",
    "download_file",
    "fc100_splits",
    "folder_splits",
    "get_benchmark",
    "keys",
    "load_cifar_fs",
    "load_folder",
    "load_mini_imagenet",
    "load_omniglot",
    "md5sum",
    "mini_imagenet_splits",
    "mirrored_alphabets",
    "omniglot_splits",
    "safe_load",
    "sinusoid",
    "stack_classes",
    "tiered_imagenet_splits",
]
