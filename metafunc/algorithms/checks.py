"""The checks of the algorithms' constructor arguments, each error naming the class, the argument
and the fix: the model, the loss, the task-parallel switch, learning rates, step counts,
choices and the ways and shots a task is built from."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import nn

from metafunc._random import check_randomness
from metafunc.models.base import Model
from metafunc.strategies import STRATEGIES

__all__ = [
    "LOSSES",
    "Loss",
    "check_choice",
    "check_common",
    "check_lr",
    "check_model",
    "check_positive",
    "check_steps",
    "check_ways_shots",
]

LOSSES = ("cross_entropy", "mse")
Loss = str | Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
"""An algorithm's ``loss``: ``'cross_entropy'``, ``'mse'`` or ``loss(preds, targets) -> scalar``."""


def check_model(name: str, model: object) -> None:
    """``model`` is a :class:`metafunc.Model`; an ``nn.Module`` is named with the fix."""
    if isinstance(model, Model):
        return
    if isinstance(model, nn.Module):
        raise TypeError(
            f"{name}(model): got a torch.nn.Module ({type(model).__name__}); algorithms take a "
            "metafunc.Model, a pair of pure functions over a parameter tree. Wrap it: "
            f"{name}(metafunc.from_module(module), ...)."
        )
    raise TypeError(
        f"{name}(model): got a {type(model).__qualname__}; pass a metafunc.Model, e.g. "
        "metafunc.conv4(5), metafunc.mlp() or metafunc.from_module(module)."
    )


def check_common(
    name: str,
    *,
    model: object,
    loss: Loss,
    strategy: str,
    chunk_size: int | None,
    randomness: str,
) -> None:
    """The checks of every algorithm's constructor: the model, the loss and the task-parallel
    switch (``strategy``, ``chunk_size``, ``randomness``)."""
    check_model(name, model)
    if not callable(loss) and loss not in LOSSES:
        raise ValueError(
            f"{name}(loss): {loss!r} is not one of {LOSSES}: 'cross_entropy' for class labels, "
            "'mse' for real-valued targets, or pass your own loss(preds, targets) -> scalar."
        )
    if strategy not in STRATEGIES:
        raise ValueError(f"{name}(strategy): {strategy!r} is not one of {STRATEGIES}.")
    if chunk_size is not None and (isinstance(chunk_size, bool) or chunk_size < 1):
        raise ValueError(f"{name}(chunk_size): must be >= 1 or None, got {chunk_size!r}.")
    check_randomness(f"{name}(randomness)", randomness)


def check_lr(name: str, arg: str, value: float) -> None:
    if not isinstance(value, int | float) or value < 0 or value != value:
        raise ValueError(f"{name}({arg}): must be a float >= 0, got {value!r}.")


def check_steps(name: str, arg: str, value: int, minimum: int = 1) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{name}({arg}): must be an int >= {minimum}, got {value!r}.")


def check_choice(name: str, arg: str, value: object, choices: Sequence[object]) -> None:
    if value not in choices:
        raise ValueError(f"{name}({arg}): {value!r} is not one of {tuple(choices)}.")


def check_positive(name: str, arg: str, value: float, fix: str = "") -> None:
    """``value`` must be a real number > 0 (not a bool, not NaN)."""
    if isinstance(value, bool) or not isinstance(value, int | float) or not value > 0:
        raise ValueError(f"{name}({arg}): must be a float > 0, got {value!r}.{fix}")


def check_ways_shots(name: str, ways: int | None, shots: int | None) -> None:
    """At least one of ``ways`` and ``shots`` is a positive int (the other may be ``None``)."""
    for arg, value in (("ways", ways), ("shots", shots)):
        if value is not None and (isinstance(value, bool) or not isinstance(value, int)):
            raise ValueError(f"{name}({arg}): must be a positive int or None, got {value!r}.")
        if value is not None and value < 1:
            raise ValueError(f"{name}({arg}): must be a positive int or None, got {value!r}.")
    if ways is None and shots is None:
        raise ValueError(
            f"{name}(ways, shots): the number of classes of a task must be known from shapes "
            f"alone (no .unique() under vmap). Pass shots (ways = support size / shots, so one "
            f"instance trains 60-way and tests 5-way), e.g. {name}(model, shots=5), or a fixed "
            f"ways, e.g. {name}(model, ways=5)."
        )
