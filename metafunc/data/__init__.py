"""Tasks and datasets: sinusoid regression, N-way K-shot episodes, image benchmarks."""

from metafunc.data.batch import TaskBatch
from metafunc.data.dataset import ClassImages, ClassSplits, stack_classes
from metafunc.data.download import ChecksumError
from metafunc.data.omniglot import load_omniglot, omniglot_splits
from metafunc.data.sampler import EpisodeSampler, TaskSampler
from metafunc.data.sinusoid import SinusoidParams, SinusoidTasks, sinusoid

__all__ = [
    "ChecksumError",
    "ClassImages",
    "ClassSplits",
    "EpisodeSampler",
    "SinusoidParams",
    "SinusoidTasks",
    "TaskBatch",
    "TaskSampler",
    "load_omniglot",
    "omniglot_splits",
    "sinusoid",
    "stack_classes",
]
