"""MAML and the algorithms that differ from it only in what is meta-learned: first-order MAML
and Meta-SGD."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from metafunc import tree as mt
from metafunc.algorithms import checkpointed, shared_step
from metafunc.algorithms._common import task_means
from metafunc.algorithms.base import Algorithm, loss_fn_of
from metafunc.algorithms.checks import check_lr, check_steps
from metafunc.data.batch import TaskBatch
from metafunc.inner import adapt
from metafunc.optim import GradientTransformation, sgd

__all__ = ["MAML", "FirstOrderMAML", "MetaSGD"]


@dataclass(frozen=True)
class MAML(Algorithm):
    """Model-Agnostic Meta-Learning (Finn et al., 2017).

    ``meta_params = {'params': model params}``; each task takes ``inner_steps`` SGD steps at
    ``inner_lr`` on its support set, and the meta-loss is the adapted model's query loss,
    averaged over tasks, differentiated through the inner loop (second order unless
    ``first_order``). ``trainable`` restricts which leaves adapt (all by default).

    Omniglot 5-way 1-shot: ``MAML(conv4(5), inner_lr=0.4, inner_steps=1)``, meta-batch 32, Adam
    1e-3; sinusoid: ``MAML(mlp(), inner_lr=0.01, loss='mse')``.

    Two engines take the same gradient another way: ``checkpoint=True`` recomputes the inner
    steps in the backward pass, for memory flat in ``inner_steps`` (:mod:`.checkpointed`);
    ``shared_first_step`` takes the tasks' first inner step in one ``vmap`` (:mod:`.shared_step`):
    ``None`` (the default) where it pays, ``True`` wherever it applies, ``False`` never.
    """

    inner_lr: float = 0.4
    inner_steps: int = 1
    first_order: bool = False
    trainable: mt.PathFilter | None = None
    checkpoint: bool = False
    shared_first_step: bool | None = None

    def __post_init__(self) -> None:
        super().__post_init__()
        name = type(self).__name__
        check_lr(name, "inner_lr", self.inner_lr)
        check_steps(name, "inner_steps", self.inner_steps)
        if self.checkpoint:
            checkpointed.check_checkpoint(self)

    # -- what is meta-learned, and how the inner update is built from it --------------------

    def init(
        self,
        generator: torch.Generator | None = None,
        *,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str | None = None,
    ) -> dict[str, Any]:
        params = self.model.init(generator, dtype=dtype, device=device)
        if self.trainable is not None:
            mt.select(params, self.trainable, call=f"{type(self).__name__}(trainable)")
        return {"params": params}

    def inner_optimizer(self, meta_params: dict[str, Any]) -> GradientTransformation:
        return sgd(self.inner_lr)

    def first_order_at(self, iteration: int) -> bool:
        return self.first_order

    def not_compilable(self) -> str:
        return checkpointed.NOT_COMPILABLE if self.checkpoint else ""

    # -- one task ----------------------------------------------------------------------------

    def inner_loop(
        self, meta_params: dict[str, Any], steps: int, *, first_order: bool, observe: Any = None
    ) -> Any:
        return adapt(
            self.support_loss,
            self.inner_optimizer(meta_params),
            steps,
            first_order=first_order,
            trainable=self.trainable,
            observe=observe,
        )

    def task_loss(
        self, meta_params: dict[str, Any], task: TaskBatch, iteration: int
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        return self.task_loss_given_first(meta_params, task, iteration, first=None)

    def task_loss_given_first(
        self, meta_params: dict[str, Any], task: TaskBatch, iteration: int, *, first: Any
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """:meth:`task_loss`, the first inner step taken with ``first = (grads, loss)`` when
        given (see :func:`metafunc.inner.adapt`)."""
        inner = self.inner_loop(
            meta_params, self.inner_steps, first_order=self.first_order_at(iteration)
        )
        adapted, _ = inner(meta_params["params"], task, first=first)
        return self.query_loss(adapted, task)

    def query_loss(
        self, adapted: Any, task: TaskBatch
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """The query loss and metrics of adapted parameters."""
        return self.loss_and_metrics(self.predict(adapted, task), task.query_y)

    def unrolled(self, task: TaskBatch, iteration: int) -> checkpointed.Unrolled:
        """This task's inner loop, as ``checkpoint=True`` replays it (:mod:`.checkpointed`)."""
        return checkpointed.unroll(
            self.inner_steps,
            lambda k, params, mp: self.support_loss(params, task),
            self.inner_optimizer,
            lambda k, params, mp: self.predict(params, task),
            lambda preds: loss_fn_of(self.loss)(preds, task.query_y),
            first_order=self.first_order_at(iteration),
            trainable=self.trainable,
        )

    # -- the meta-batch ----------------------------------------------------------------------

    def meta_grad(
        self, meta_params: Any, batch: TaskBatch, *, iteration: int = 0
    ) -> tuple[Any, torch.Tensor, dict[str, torch.Tensor]]:
        """The gradient of :meth:`meta_loss`, by the engine ``checkpoint`` and
        ``shared_first_step`` choose (the class docstring)."""
        if self.checkpoint:
            return checkpointed.checkpointed_meta_grad(self, meta_params, batch, iteration)
        if shared_step.shares_first_step(self, meta_params, batch):
            return shared_step.shared_first_step_grad(self, meta_params, batch, iteration)
        return super().meta_grad(meta_params, batch, iteration=iteration)

    def meta_loss(
        self, meta_params: Any, batch: TaskBatch, *, iteration: int = 0
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        losses, metrics = self.map_tasks(lambda mp, t: self.task_loss(mp, t, iteration))(
            meta_params, batch
        )
        return task_means(losses, metrics)

    def adapt_and_predict(self, meta_params: Any, batch: TaskBatch, steps: int) -> torch.Tensor:
        check_steps(f"{type(self).__name__}.adapt_and_predict", "steps", steps, minimum=0)

        def one(mp: dict[str, Any], task: TaskBatch) -> torch.Tensor:
            inner = self.inner_loop(mp, steps, first_order=True, observe=self.predict)
            return inner(mp["params"], task)[1]["observed"]

        return self.map_tasks(one)(meta_params, batch)


@dataclass(frozen=True)
class FirstOrderMAML(MAML):
    """First-order MAML (Finn et al., 2017; Nichol et al., 2018): inner gradients detached."""

    first_order: bool = True


@dataclass(frozen=True)
class MetaSGD(MAML):
    """Meta-SGD (Li et al., 2017): a learning rate per parameter entry, meta-learned with the
    weights. ``meta_params = {'params': ..., 'lr': tree shaped like params, init inner_lr}``;
    the inner step is ``p - lr * grad`` elementwise."""

    inner_lr: float = 0.01

    def init(
        self,
        generator: torch.Generator | None = None,
        *,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str | None = None,
    ) -> dict[str, Any]:
        meta = super().init(generator, dtype=dtype, device=device)
        params = meta["params"]
        if self.trainable is not None:
            params, _, _ = mt.partition(params, self.trainable)
        meta["lr"] = {k: torch.full_like(v, self.inner_lr) for k, v in params.items()}
        return meta

    def inner_optimizer(self, meta_params: dict[str, Any]) -> GradientTransformation:
        return sgd(meta_params["lr"])
