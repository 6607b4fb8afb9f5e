"""Reptile (Nichol, Achiam & Schulman, 2018): move the initialisation towards adapted weights."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from metafunc import tree as mt
from metafunc.algorithms._common import INNER_OPTIMIZERS, make_inner_optimizer, task_means
from metafunc.algorithms.base import Algorithm, task_metrics
from metafunc.algorithms.checks import check_choice, check_lr, check_steps
from metafunc.data.batch import TaskBatch
from metafunc.inner import adapt
from metafunc.optim import GradientTransformation, schedules, sgd

__all__ = ["Reptile"]


@dataclass(frozen=True)
class Reptile(Algorithm):
    """Reptile: ``k`` first-order steps per task, then ``θ ← θ + ε · mean_tasks(φ_task − θ)``.

    ``meta_params = {'params': model params}``. Each task takes ``inner_steps`` steps of
    ``inner_optimizer`` (``'sgd'``, or ``'adam'`` with ``b1 = inner_b1``) on its support set,
    batched across tasks by :func:`metafunc.task_map`, with no second-order graph.
    :meth:`meta_grad` returns the pseudo-gradient ``θ − mean(φ)``, so the outer step
    ``optim.apply_updates(θ, sgd(ε).update(g))`` is exactly Reptile's; :meth:`outer_optimizer`
    gives that ``sgd``, linearly annealed from ``ε`` to 0 over ``iterations`` with ``anneal``
    (the paper's schedule). :meth:`meta_loss` is the adapted query loss, detached (for logs).

    The paper's inner loop draws mini-batches from the task; here each step uses the whole
    support set (pass more support points to mimic several mini-batches). Adam's moments start
    fresh for every task (the authors' TensorFlow code carried them across tasks).

    Omniglot 5-way (paper, Table 3): ``Reptile(conv4(5), inner_optimizer='adam',
    inner_lr=1e-3, inner_steps=5, anneal=True)``, ``outer_optimizer(1.0, 100_000)``,
    meta-batch 5, 10 training shots per class.
    """

    inner_lr: float = 0.01
    inner_steps: int = 5
    inner_optimizer: str = "sgd"
    inner_b1: float = 0.0
    anneal: bool = False

    def __post_init__(self) -> None:
        super().__post_init__()
        name = type(self).__name__
        check_lr(name, "inner_lr", self.inner_lr)
        check_steps(name, "inner_steps", self.inner_steps)
        check_choice(name, "inner_optimizer", self.inner_optimizer, INNER_OPTIMIZERS)
        if not isinstance(self.inner_b1, int | float) or not 0.0 <= self.inner_b1 < 1.0:
            raise ValueError(f"{name}(inner_b1): must be in [0, 1), got {self.inner_b1!r}.")

    # -- one task ----------------------------------------------------------------------------

    def inner_loop(self, steps: int, observe: Any = None) -> Any:
        optimizer = make_inner_optimizer(
            self.inner_optimizer, self.inner_lr, b1=self.inner_b1, momentum=0.0
        )
        return adapt(self.support_loss, optimizer, steps, first_order=True, observe=observe)

    def task_step(
        self, params: Any, task: TaskBatch
    ) -> tuple[Any, torch.Tensor, dict[str, torch.Tensor]]:
        """``(φ − θ, query loss of φ, metrics)`` for one task."""
        adapted, inner_metrics = self.inner_loop(self.inner_steps)(params, task)
        preds = self.predict(adapted, task)
        metrics = task_metrics(self.loss, preds, task.query_y)
        metrics["support_loss"] = inner_metrics["loss"][0]
        return mt.sub(adapted, params), metrics["loss"], metrics

    # -- the meta-batch ----------------------------------------------------------------------

    def _run(self, meta_params: Any, batch: TaskBatch) -> tuple[Any, torch.Tensor, Any]:
        with torch.no_grad():  # first order: nothing to differentiate outside the inner loop
            params = mt.detach(meta_params["params"])
            deltas, losses, metrics = self.map_tasks(self.task_step)(params, batch)
        mean_delta = mt.map(lambda d: d.mean(0), deltas)
        return mean_delta, *task_means(losses, metrics)

    def meta_grad(
        self, meta_params: Any, batch: TaskBatch, *, iteration: int = 0
    ) -> tuple[Any, torch.Tensor, dict[str, torch.Tensor]]:
        """The pseudo-gradient ``{'params': θ − mean_tasks(φ)}``, the adapted query loss and
        metrics. ``sgd(ε)`` applied to it is the Reptile step."""
        mean_delta, loss, metrics = self._run(meta_params, batch)
        return {"params": mt.scale(-1.0, mean_delta)}, loss, metrics

    def meta_loss(
        self, meta_params: Any, batch: TaskBatch, *, iteration: int = 0
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """The adapted query loss, detached: Reptile's update is not its gradient."""
        _, loss, metrics = self._run(meta_params, batch)
        return loss, metrics

    def adapt_and_predict(self, meta_params: Any, batch: TaskBatch, steps: int) -> torch.Tensor:
        check_steps(f"{type(self).__name__}.adapt_and_predict", "steps", steps, minimum=0)

        def one(mp: dict[str, Any], task: TaskBatch) -> torch.Tensor:
            return self.inner_loop(steps, observe=self.predict)(mp["params"], task)[1]["observed"]

        return self.map_tasks(one)(meta_params, batch)

    def outer_optimizer(self, lr: float, iterations: int) -> GradientTransformation:
        """``sgd(ε)`` on the pseudo-gradient; with ``anneal``, ``ε`` falls linearly to 0 over
        ``iterations`` (``schedules.linear(ε, 0, iterations)``)."""
        check_lr(f"{type(self).__name__}.outer_optimizer", "lr", lr)
        if self.anneal:
            check_steps(f"{type(self).__name__}.outer_optimizer", "iterations", iterations)
            return sgd(self.outer_schedule(lr, iterations))
        return sgd(lr)

    def outer_schedule(self, lr: float, iterations: int) -> schedules.Schedule:
        if self.anneal:
            return schedules.linear(lr, 0.0, max(iterations, 1))
        return schedules.constant(lr)
