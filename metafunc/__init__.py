"""metafunc: functional, JAX-style meta-learning for PyTorch.

Models are pure functions over parameter pytrees, inner loops are differentiable
``torch.func.grad`` loops through out-of-place optimizers, and many tasks adapt at once through
one task-parallel switch (``vmap``, chunked ``vmap``, a loop, or the loop on CPU threads).
"""

from __future__ import annotations

import importlib
from typing import Any

from metafunc import models, optim, tree
from metafunc.cpu import tune_cpu_allocator
from metafunc.data.batch import TaskBatch
from metafunc.inner import STRATEGIES, adapt, check_strategies, default_strategy, task_map
from metafunc.models import Model, conv4, from_module, mlp, resnet12

__version__ = "0.1.0"

__all__ = [
    "STRATEGIES",
    "Model",
    "TaskBatch",
    "__version__",
    "adapt",
    "algorithms",
    "check_strategies",
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


def __getattr__(name: str) -> Any:
    # Submodules with heavier imports load on first use, keeping `import metafunc` light.
    if name in ("algorithms", "data", "distributed", "harness"):
        return importlib.import_module(f"metafunc.{name}")
    raise AttributeError(f"module 'metafunc' has no attribute {name!r}")
