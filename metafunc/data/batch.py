"""The task batch: one type for a single task and for a meta-batch with a leading task axis."""

from __future__ import annotations

from typing import NamedTuple

import torch

__all__ = ["TaskBatch"]


class TaskBatch(NamedTuple):
    """Support and query sets of one task, or of many tasks stacked on a leading task axis.

    A single task holds ``support_x: [S, ...]``, ``support_y: [S, ...]``, ``query_x: [Q, ...]``,
    ``query_y: [Q, ...]``. A meta-batch holds the same fields with a leading task axis
    ``[T, S, ...]``; ``metafunc.task_map`` slices it into single tasks (by ``vmap`` or a loop).
    Being a NamedTuple, it is a pytree node for both optree and ``torch.func``.
    """

    support_x: torch.Tensor
    support_y: torch.Tensor
    query_x: torch.Tensor
    query_y: torch.Tensor

    @property
    def num_tasks(self) -> int:
        """Size of the leading task axis (only meaningful for a meta-batch)."""
        return int(self.support_x.shape[0])

    def to(
        self, device: torch.device | str | None = None, dtype: torch.dtype | None = None
    ) -> TaskBatch:
        """Move every field to ``device``; cast floating fields (not labels) to ``dtype``."""

        def move(t: torch.Tensor) -> torch.Tensor:
            if dtype is not None and t.is_floating_point():
                return t.to(device=device, dtype=dtype)
            return t.to(device=device)

        return TaskBatch(*(move(t) for t in self))
