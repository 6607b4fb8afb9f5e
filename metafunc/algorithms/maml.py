"""MAML and the algorithms that differ from it only in what is meta-learned and which leaves adapt:
first-order MAML, ANIL and Meta-SGD."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from metafunc import tree as mt
from metafunc.algorithms import checkpointed, shared_step
from metafunc.algorithms._common import task_means
from metafunc.algorithms.base import Algorithm, loss_fn_of
from metafunc.algorithms.checks import Loss, check_lr, check_steps
from metafunc.data.batch import TaskBatch
from metafunc.inner import adapt
from metafunc.models.base import Model
from metafunc.optim import GradientTransformation, sgd

__all__ = ["ANIL", "MAML", "FirstOrderMAML", "MetaSGD"]


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

    model: Model
    inner_lr: float = 0.4
    inner_steps: int = 1
    first_order: bool = False
    loss: Loss = "cross_entropy"
    trainable: mt.PathFilter | None = None
    strategy: str = "auto"
    chunk_size: int | None = None
    randomness: str = "different"
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


@dataclass(frozen=True)
class ANIL(MAML):
    """Almost No Inner Loop (Raghu et al., 2019): only the linear head adapts.

    The body runs once per task on support and query; the inner loop adapts the head on those
    fixed features, so each inner step costs one linear layer. Needs a model with ``features``
    and ``head`` (conv4, resnet12, mlp). ``trainable`` is the head.
    """

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.model.features is None or self.model.head is None:
            raise ValueError(
                f"ANIL(model): {self.model.name} has no separate features/head; use conv4, "
                "resnet12 or mlp with num_classes set."
            )
        object.__setattr__(self, "trainable", self.model.head)

    def _head_task(self, params: dict[str, Any], task: TaskBatch) -> tuple[Any, TaskBatch]:
        assert self.model.features is not None
        head, _, _ = mt.partition(params, self.model.head)  # type: ignore[arg-type]
        feats = TaskBatch(
            self.model.features(params, task.support_x),
            task.support_y,
            self.model.features(params, task.query_x),
            task.query_y,
        )
        return head, feats

    def _head_apply(self, head: dict[str, Any], x: torch.Tensor) -> torch.Tensor:
        name = self.model.head
        return F.linear(x, head[f"{name}.weight"], head[f"{name}.bias"])

    def inner_loop(
        self, meta_params: dict[str, Any], steps: int, *, first_order: bool, observe: Any = None
    ) -> Any:
        def loss(head: Any, feats: TaskBatch) -> torch.Tensor:
            return loss_fn_of(self.loss)(self._head_apply(head, feats.support_x), feats.support_y)

        return adapt(
            loss, self.inner_optimizer(meta_params), steps, first_order=first_order, observe=observe
        )

    def task_loss(
        self, meta_params: dict[str, Any], task: TaskBatch, iteration: int
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        head, feats = self._head_task(meta_params["params"], task)
        inner = self.inner_loop(
            meta_params, self.inner_steps, first_order=self.first_order_at(iteration)
        )
        adapted, _ = inner(head, feats)
        return self.loss_and_metrics(self._head_apply(adapted, feats.query_x), task.query_y)

    def adapt_and_predict(self, meta_params: Any, batch: TaskBatch, steps: int) -> torch.Tensor:
        check_steps("ANIL.adapt_and_predict", "steps", steps, minimum=0)

        def one(mp: dict[str, Any], task: TaskBatch) -> torch.Tensor:
            head, feats = self._head_task(mp["params"], task)
            inner = self.inner_loop(
                mp, steps, first_order=True, observe=lambda h, f: self._head_apply(h, f.query_x)
            )
            return inner(head, feats)[1]["observed"]

        return self.map_tasks(one)(meta_params, batch)
