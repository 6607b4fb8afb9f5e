"""Prototypical Networks (Snell, Swersky & Zemel, 2017): classify by the nearest class mean."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from metafunc.algorithms._common import class_one_hot, task_means, ways_of
from metafunc.algorithms.base import Algorithm, task_metrics
from metafunc.algorithms.checks import check_lr, check_steps, check_ways_shots
from metafunc.data.batch import TaskBatch
from metafunc.optim import GradientTransformation, adam, schedules

__all__ = ["ProtoNet", "prototype_logits"]


def prototype_logits(
    support: torch.Tensor, support_y: torch.Tensor, query: torch.Tensor, ways: int
) -> torch.Tensor:
    """``-||f(x_q) − c_k||²`` for embeddings ``support: [S, D]``, ``query: [Q, D]`` and labels
    ``support_y: [S]`` in ``0..ways-1``; ``c_k`` is the mean of class ``k``'s support embeddings.
    Returns ``[Q, ways]``. Shapes depend on ``ways`` only, so it runs under ``vmap``."""
    one_hot = class_one_hot(support_y, ways, support.dtype)  # [S, N]
    counts = one_hot.sum(0).clamp(min=1.0)
    prototypes = (one_hot.T @ support) / counts[:, None]  # [N, D]
    return -((query[:, None, :] - prototypes[None, :, :]) ** 2).sum(-1)


@dataclass(frozen=True)
class ProtoNet(Algorithm):
    """Prototypical Networks: embed, average each class's support embeddings into a prototype,
    score queries by negative squared Euclidean distance; no inner loop.

    ``meta_params = {'params': embedding params}``; the embedding is ``model.apply`` of a
    model without a head (``conv4(None)``, ``resnet12(None)``). Support and query images go
    through the network in one call, as in the authors' code (one set of batch-norm
    statistics per task). The number of classes of a task comes from static shapes: with
    ``shots`` it is ``support size / shots``, so nothing ties training ways to test ways (the
    paper trains 60-way and tests 5-way at the same shot); a fixed ``ways`` also works
    (``dataclasses.replace(alg, ways=5)`` for another way count). Labels are ``0..ways-1``.

    ``adapt_and_predict`` returns the same logits for every step count. Omniglot (paper):
    ``ProtoNet(conv4(None), shots=5)``, 60-way training episodes, Adam 1e-3 halved every 2,000
    episodes (:meth:`outer_optimizer`, ``halve_every``; ``None`` keeps it constant).
    """

    shots: int | None = None
    ways: int | None = None
    halve_every: int | None = 2000

    def __post_init__(self) -> None:
        super().__post_init__()
        name = type(self).__name__
        if self.loss != "cross_entropy":
            raise ValueError(
                f"{name}(loss): Prototypical Networks classify; loss must be 'cross_entropy', "
                f"got {self.loss!r}."
            )
        if self.model.head is not None:
            raise ValueError(
                f"{name}(model): {self.model.name} ends in a linear head {self.model.head!r}; "
                "prototypes live in the embedding. Build the network without one, e.g. "
                "conv4(None) or resnet12(None)."
            )
        check_ways_shots(name, self.ways, self.shots)
        if self.halve_every is not None:
            check_steps(name, "halve_every", self.halve_every)

    def num_classes(self, meta_params: Any, batch: TaskBatch) -> int | None:
        """``ways``, or the support size over ``shots``."""
        support = batch.support_x.shape[1]
        return ways_of(f"{type(self).__name__}(shots, ways)", self.ways, self.shots, support)

    def task_logits(self, meta_params: dict[str, Any], task: TaskBatch) -> torch.Tensor:
        """``[Q, ways]`` logits of one task."""
        n_support = task.support_x.shape[0]
        ways = ways_of(f"{type(self).__name__}(shots, ways)", self.ways, self.shots, n_support)
        x = torch.cat([task.support_x, task.query_x])
        emb = self.model.apply(meta_params["params"], x).flatten(1)
        return prototype_logits(emb[:n_support], task.support_y, emb[n_support:], ways)

    def task_loss(
        self, meta_params: dict[str, Any], task: TaskBatch
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        logits = self.task_logits(meta_params, task)
        return F.cross_entropy(logits, task.query_y), task_metrics(self.loss, logits, task.query_y)

    def meta_loss(
        self, meta_params: Any, batch: TaskBatch, *, iteration: int = 0
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        losses, metrics = self.map_tasks(self.task_loss)(meta_params, batch)
        return task_means(losses, metrics)

    def adapt_and_predict(self, meta_params: Any, batch: TaskBatch, steps: int) -> torch.Tensor:
        check_steps(f"{type(self).__name__}.adapt_and_predict", "steps", steps, minimum=0)
        logits = self.map_tasks(self.task_logits)(meta_params, batch)  # [T, Q, N]
        return logits[:, None].expand(-1, steps + 1, *logits.shape[1:])

    def outer_optimizer(self, lr: float, iterations: int) -> GradientTransformation:
        """Adam at ``lr``, halved every ``halve_every`` iterations (the paper's schedule)."""
        check_lr(f"{type(self).__name__}.outer_optimizer", "lr", lr)
        if self.halve_every is None or iterations <= self.halve_every:
            return adam(lr)
        return adam(self.outer_schedule(lr, iterations))

    def outer_schedule(self, lr: float, iterations: int) -> schedules.Schedule:
        if self.halve_every is None or iterations <= self.halve_every:
            return schedules.constant(lr)
        halvings = range(self.halve_every, iterations, self.halve_every)
        return schedules.piecewise_constant(lr, dict.fromkeys(halvings, 0.5))
