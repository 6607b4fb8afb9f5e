"""Learning-rate schedules: ``schedule(count) -> lr`` for a 0-d integer step counter.

Each is a pure function of the step, written with tensor ops so it works on a counter tensor
(and on a plain ``int``). The formulas follow ``torch.optim.lr_scheduler`` where one exists.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import torch

__all__ = [
    "Schedule",
    "constant",
    "cosine_decay",
    "exponential_decay",
    "linear",
    "piecewise_constant",
    "warmup_cosine_decay",
]

Schedule = Callable[[torch.Tensor], torch.Tensor]


def _t(count: torch.Tensor | int) -> torch.Tensor:
    return torch.as_tensor(count, dtype=torch.float64)


def _check_steps(call: str, name: str, value: int) -> None:
    if not isinstance(value, int) or value <= 0:
        raise ValueError(f"{call}: {name} must be a positive int, got {value!r}.")


def constant(value: float) -> Schedule:
    """``lr = value`` at every step."""
    return lambda count: torch.full((), float(value), dtype=torch.float64)


def linear(init_value: float, end_value: float, transition_steps: int) -> Schedule:
    """Linear from ``init_value`` to ``end_value`` over ``transition_steps``, then constant.

    Reptile's outer step-size annealing is ``linear(eps, 0.0, iterations)``.
    """
    _check_steps("linear(...)", "transition_steps", transition_steps)

    def schedule(count: torch.Tensor) -> torch.Tensor:
        frac = torch.clamp(_t(count) / transition_steps, 0.0, 1.0)
        return init_value + (end_value - init_value) * frac

    return schedule


def cosine_decay(init_value: float, decay_steps: int, alpha: float = 0.0) -> Schedule:
    """``eta_min + (init - eta_min)(1 + cos(pi t / T)) / 2`` with ``eta_min = alpha * init``,
    constant after ``decay_steps`` (``torch.optim.lr_scheduler.CosineAnnealingLR``'s closed form).
    MAML++ anneals its outer learning rate this way."""
    _check_steps("cosine_decay(...)", "decay_steps", decay_steps)
    eta_min = alpha * init_value

    def schedule(count: torch.Tensor) -> torch.Tensor:
        t = torch.clamp(_t(count), max=decay_steps)
        return eta_min + (init_value - eta_min) * (1 + torch.cos(math.pi * t / decay_steps)) / 2

    return schedule


def exponential_decay(init_value: float, decay_rate: float, transition_steps: int = 1) -> Schedule:
    """``init * decay_rate ** (t / transition_steps)`` (``ExponentialLR`` when steps is 1)."""
    _check_steps("exponential_decay(...)", "transition_steps", transition_steps)
    return lambda count: (
        init_value
        * torch.pow(torch.tensor(decay_rate, dtype=torch.float64), _t(count) / transition_steps)
    )


def piecewise_constant(init_value: float, boundaries_and_scales: dict[int, float]) -> Schedule:
    """Multiply by ``scale`` once ``t >= boundary`` for each pair (``MultiStepLR`` with gamma)."""
    items: Sequence[tuple[int, float]] = sorted(boundaries_and_scales.items())

    def schedule(count: torch.Tensor) -> torch.Tensor:
        t = _t(count)
        lr = torch.full((), float(init_value), dtype=torch.float64)
        for boundary, factor in items:
            lr = torch.where(t >= boundary, lr * factor, lr)
        return lr

    return schedule


def warmup_cosine_decay(
    init_value: float,
    peak_value: float,
    warmup_steps: int,
    decay_steps: int,
    end_value: float = 0.0,
) -> Schedule:
    """Linear warm-up from ``init_value`` to ``peak_value``, then cosine decay to ``end_value``
    at ``decay_steps`` (counted from the start, warm-up included)."""
    _check_steps("warmup_cosine_decay(...)", "warmup_steps", warmup_steps)
    if decay_steps <= warmup_steps:
        raise ValueError(
            f"warmup_cosine_decay(...): decay_steps ({decay_steps}) must exceed warmup_steps "
            f"({warmup_steps})."
        )

    def schedule(count: torch.Tensor) -> torch.Tensor:
        t = _t(count)
        warm = init_value + (peak_value - init_value) * torch.clamp(t / warmup_steps, max=1.0)
        frac = torch.clamp((t - warmup_steps) / (decay_steps - warmup_steps), 0.0, 1.0)
        cos = end_value + (peak_value - end_value) * (1 + torch.cos(math.pi * frac)) / 2
        return torch.where(t < warmup_steps, warm, cos)

    return schedule
