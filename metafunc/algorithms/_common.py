"""Helpers shared by the algorithms: the named inner optimizers, the number of ways of a task
from static shapes, and the mean of per-task losses and metrics."""

from __future__ import annotations

import torch

from metafunc.optim import GradientTransformation, adam, sgd

__all__ = [
    "INNER_OPTIMIZERS",
    "class_one_hot",
    "make_inner_optimizer",
    "task_means",
    "ways_of",
]

INNER_OPTIMIZERS = ("sgd", "adam")


def task_means(
    losses: torch.Tensor, metrics: dict[str, torch.Tensor]
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The meta-batch's loss and metrics: each per-task tensor averaged over the tasks."""
    return losses.mean(), {k: v.mean() for k, v in metrics.items()}


def make_inner_optimizer(
    kind: str, lr: float, *, momentum: float = 0.0, b1: float = 0.9
) -> GradientTransformation:
    """``'sgd'`` (with ``momentum``) or ``'adam'`` (with ``b1``) at ``lr``; fresh per task."""
    if kind == "sgd":
        return sgd(lr, momentum)
    return adam(lr, b1)


def ways_of(call: str, ways: int | None, shots: int | None, support_size: int) -> int:
    """The number of classes of a task with ``support_size`` support examples."""
    if shots is None:
        assert ways is not None
        return ways
    if support_size % shots:
        raise ValueError(
            f"{call}: the support set has {support_size} examples, not a multiple of "
            f"shots={shots}. Give every class {shots} support examples, or set ways instead."
        )
    n = support_size // shots
    if ways is not None and n != ways:
        raise ValueError(
            f"{call}: the support set has {support_size} examples = {n} classes x {shots} "
            f"shots, but ways={ways}. Set only one of ways and shots."
        )
    return n


def class_one_hot(labels: torch.Tensor, ways: int, dtype: torch.dtype) -> torch.Tensor:
    """``[n] -> [n, ways]`` one-hot of labels in ``0..ways-1`` (vmap-safe: no value checks)."""
    classes = torch.arange(ways, device=labels.device)
    return (labels[..., None] == classes).to(dtype)
