"""Tasks and datasets: sinusoid regression, N-way K-shot episodes, image benchmarks.

- :class:`TaskBatch`: support and query sets, with a leading task axis for a meta-batch.
- :class:`SinusoidTasks`: MAML's sinusoid regression tasks.
- :class:`EpisodeSampler`: N-way K-shot Q-query episodes from a class-indexed uint8 tensor, drawn a
  whole meta-batch at a time with tensor ops on the target device.
- Loaders returning :class:`ClassImages`: Omniglot, mini-ImageNet, CIFAR-FS, folder-per-class.
- :func:`get_benchmark`: a named benchmark's train / validation / test samplers.
- :mod:`keys`: counter-based random numbers on tensors, for sampling inside a compiled step
  (the samplers' ``sample_keyed``).
"""

from metafunc.data import keys
from metafunc.data.batch import TaskBatch
from metafunc.data.cache import default_cache_dir
from metafunc.data.cifarfs import CIFAR_FS_CLASSES, cifar_fs_splits, load_cifar_fs
from metafunc.data.dataset import ClassImages, ClassSplits, concat_classes, stack_classes
from metafunc.data.download import ChecksumError, check_md5, download_file, md5sum
from metafunc.data.folder import folder_splits, load_folder
from metafunc.data.miniimagenet import load_mini_imagenet, mini_imagenet_splits
from metafunc.data.omniglot import (
    OMNIGLOT_SOURCES,
    OMNIGLOT_SPLITS,
    OMNIGLOT_URL,
    load_omniglot,
    omniglot_splits,
)
from metafunc.data.registry import Benchmark, benchmark_names, get_benchmark
from metafunc.data.sampler import EpisodeSampler, TaskSampler
from metafunc.data.sinusoid import SinusoidParams, SinusoidTasks, sinusoid

__all__ = [
    "CIFAR_FS_CLASSES",
    "OMNIGLOT_SOURCES",
    "OMNIGLOT_SPLITS",
    "OMNIGLOT_URL",
    "Benchmark",
    "ChecksumError",
    "ClassImages",
    "ClassSplits",
    "EpisodeSampler",
    "SinusoidParams",
    "SinusoidTasks",
    "TaskBatch",
    "TaskSampler",
    "benchmark_names",
    "check_md5",
    "cifar_fs_splits",
    "concat_classes",
    "default_cache_dir",
    "download_file",
    "folder_splits",
    "get_benchmark",
    "keys",
    "load_cifar_fs",
    "load_folder",
    "load_mini_imagenet",
    "load_omniglot",
    "md5sum",
    "mini_imagenet_splits",
    "omniglot_splits",
    "sinusoid",
    "stack_classes",
]
