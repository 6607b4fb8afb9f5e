"""metafunc: functional, JAX-style meta-learning for PyTorch.

Models are pure functions over parameter pytrees, inner loops are differentiable
``torch.func.grad`` loops through out-of-place optimizers, and many tasks adapt at once through
one task-parallel switch (``vmap``, chunked ``vmap``, a loop, or the loop on CPU threads).
"""

from metafunc import models, optim, tree
from metafunc.cpu import tune_cpu_allocator
from metafunc.data.batch import TaskBatch, check_batch
from metafunc.inner import adapt
from metafunc.models import Model, conv4, from_module, mlp, resnet12
from metafunc.strategies import (
    RANDOMNESS,
    STRATEGIES,
    check_strategies,
    default_strategy,
    task_map,
)

__version__ = "0.1.0"

__all__ = [
    "RANDOMNESS",
    "STRATEGIES",
    "Model",
    "TaskBatch",
    "__version__",
    "adapt",
    "algorithms",
    "check_batch",
    "check_strategies",
    "compile_step",
    "conv4",
    "data",
    "default_strategy",
    "distributed",
    "from_module",
    "harness",
    "mlp",
    "models",
    "optim",
    "resnet12",
    "task_map",
    "tree",
    "tune_cpu_allocator",
]

_LAZY = ("algorithms", "data", "distributed", "harness")


def __getattr__(name: str) -> object:
    # Submodules with heavier imports load on first use, keeping `import metafunc` light.
    import importlib

    if name in _LAZY:
        return importlib.import_module(f"metafunc.{name}")
    if name == "compile_step":
        return importlib.import_module("metafunc.step").compile_step
    raise AttributeError(f"module 'metafunc' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(__all__)
