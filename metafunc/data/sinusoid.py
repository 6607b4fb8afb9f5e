"""Sinusoid regression tasks, as in MAML (Finn, Abbeel & Levine 2017, section 5.1).

A task is ``y = A sin(x - phi)`` with amplitude ``A ~ U[0.1, 5.0]`` and phase ``phi ~ U[0, pi]``;
its ``K`` support and ``K`` query inputs are drawn from ``x ~ U[-5, 5]``.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from typing import NamedTuple

import torch

from metafunc.data import keys
from metafunc.data.batch import TaskBatch
from metafunc.data.sampler import check_episodes_args, check_generator, check_num_tasks

__all__ = ["SinusoidParams", "SinusoidTasks", "sinusoid"]


def sinusoid(x: torch.Tensor, amplitude: torch.Tensor, phase: torch.Tensor) -> torch.Tensor:
    """``amplitude * sin(x - phase)``, with ``amplitude``/``phase`` ``[T]`` broadcast over ``x``.

    ``x`` is ``[T, M, 1]`` (per task) or ``[M]`` / ``[M, 1]`` (shared by all tasks); the result is
    ``[T, M, 1]``.
    """
    if x.ndim == 1:
        x = x.unsqueeze(-1)
    if x.ndim == 2:
        x = x.unsqueeze(0)
    shape = (-1, 1, 1)
    return amplitude.reshape(shape) * torch.sin(x - phase.reshape(shape))


class SinusoidParams(NamedTuple):
    """The hidden parameters of a meta-batch of sinusoid tasks, each ``[T]``."""

    amplitude: torch.Tensor
    phase: torch.Tensor

    def evaluate(self, x: torch.Tensor) -> torch.Tensor:
        """The true functions at ``x`` (``[M]`` shared, or ``[T, M, 1]``), as ``[T, M, 1]``.

        Example (plot the true curve of task 0):
            >>> grid = torch.linspace(-5, 5, 200)
            >>> plt.plot(grid, params.evaluate(grid)[0, :, 0])
        """
        return sinusoid(x.to(self.amplitude), self.amplitude, self.phase)


class SinusoidTasks:
    """Sampler of sinusoid regression tasks (MAML's setting by default).

    Args:
        shots: support points per task (K).
        queries: query points per task (default: ``shots``, as in MAML).
        amplitude: ``(low, high)`` of the uniform amplitude.
        phase: ``(low, high)`` of the uniform phase.
        x_range: ``(low, high)`` of the uniform inputs.
        device: where the batches live. Random draws happen on the generator's device, so a CPU
            generator gives the same tasks whatever ``device`` is.
        dtype: floating dtype of ``x`` and ``y`` (and of the draws).

    :meth:`sample` returns a ``TaskBatch`` with ``x`` and ``y`` shaped ``[T, K, 1]`` (support) and
    ``[T, Q, 1]`` (query).

    Example:
        >>> tasks = SinusoidTasks(shots=10)
        >>> batch, params = tasks.sample_with_params(25, torch.Generator().manual_seed(0))
    """

    def __init__(
        self,
        *,
        shots: int = 10,
        queries: int | None = None,
        amplitude: tuple[float, float] = (0.1, 5.0),
        phase: tuple[float, float] = (0.0, math.pi),
        x_range: tuple[float, float] = (-5.0, 5.0),
        device: torch.device | str | None = None,
        dtype: torch.dtype = torch.float32,
    ) -> None:
        call = "SinusoidTasks(...)"
        queries = shots if queries is None else queries
        for arg, value, least in (("shots", shots, 1), ("queries", queries, 0)):
            if isinstance(value, bool) or not isinstance(value, int) or value < least:
                raise ValueError(f"{call}: {arg}={value!r}; pass an int >= {least}.")
        for arg, bounds in (("amplitude", amplitude), ("phase", phase), ("x_range", x_range)):
            if len(bounds) != 2 or not bounds[0] <= bounds[1]:
                raise ValueError(f"{call}: {arg}={bounds!r}; pass (low, high) with low <= high.")
        if not dtype.is_floating_point:
            raise TypeError(f"{call}: dtype={dtype} is not floating; use e.g. torch.float32.")
        self.shots, self.queries = shots, queries
        self.amplitude, self.phase, self.x_range = tuple(amplitude), tuple(phase), tuple(x_range)
        self.device = torch.device(device) if device is not None else torch.device("cpu")
        self.dtype = dtype

    def sample(self, num_tasks: int, generator: torch.Generator) -> TaskBatch:
        """A meta-batch of ``num_tasks`` tasks drawn with ``generator``."""
        return self.sample_with_params(num_tasks, generator)[0]

    def sample_with_params(
        self, num_tasks: int, generator: torch.Generator
    ) -> tuple[TaskBatch, SinusoidParams]:
        """A meta-batch and the amplitude and phase of each task (to draw the true function)."""
        call = "SinusoidTasks.sample"
        check_num_tasks(num_tasks, call=call)
        check_generator(generator, call=call)
        return self._draw(num_tasks, generator)

    def sample_keyed(self, num_tasks: int, key: torch.Tensor) -> TaskBatch:
        """A meta-batch of ``num_tasks`` tasks drawn from ``key`` (:mod:`metafunc.data.keys`):
        pure tensor operations on the sampler's device, so it runs inside a compiled training
        step (:func:`metafunc.compile_step`). Not the tasks :meth:`sample` draws from a
        generator, but the same distribution."""
        amplitude_key, phase_key, x_key = keys.split(key, 3)
        amplitude = keys.uniform(amplitude_key, (num_tasks,), self.dtype, *self.amplitude)
        phase = keys.uniform(phase_key, (num_tasks,), self.dtype, *self.phase)
        shape = (num_tasks, self.shots + self.queries, 1)
        x = keys.uniform(x_key, shape, self.dtype, *self.x_range)
        y = sinusoid(x, amplitude, phase)
        k = self.shots
        return TaskBatch(x[:, :k], y[:, :k], x[:, k:], y[:, k:])

    def episodes(self, count: int, seed: int, batch_size: int = 32) -> Iterator[TaskBatch]:
        """A fixed evaluation set: ``count`` tasks from ``seed`` in batches of ``batch_size``.

        Identical on every call and independent of ``batch_size``.
        """
        check_episodes_args(count, batch_size, call="SinusoidTasks.episodes")
        batch, _ = self._draw(count, torch.Generator().manual_seed(seed))
        return (
            TaskBatch(*(t[i : i + batch_size] for t in batch)) for i in range(0, count, batch_size)
        )

    def _draw(self, tasks: int, generator: torch.Generator) -> tuple[TaskBatch, SinusoidParams]:
        def uniform(shape: tuple[int, ...], bounds: tuple[float, ...]) -> torch.Tensor:
            u = torch.rand(shape, generator=generator, device=generator.device, dtype=self.dtype)
            return bounds[0] + (bounds[1] - bounds[0]) * u

        amplitude = uniform((tasks,), self.amplitude)
        phase = uniform((tasks,), self.phase)
        x = uniform((tasks, self.shots + self.queries, 1), self.x_range)
        params = SinusoidParams(amplitude.to(self.device), phase.to(self.device))
        x = x.to(self.device)
        y = params.evaluate(x)
        k = self.shots
        parts = (x[:, :k], y[:, :k], x[:, k:], y[:, k:])
        return TaskBatch(*(t.contiguous() for t in parts)), params
