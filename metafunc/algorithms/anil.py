"""ANIL (Raghu et al., 2019): MAML whose inner loop adapts only the linear head."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from metafunc import tree as mt
from metafunc.algorithms import checkpointed
from metafunc.algorithms.base import loss_fn_of
from metafunc.algorithms.checks import check_steps
from metafunc.algorithms.maml import MAML
from metafunc.data.batch import TaskBatch
from metafunc.inner import adapt

__all__ = ["ANIL"]


@dataclass(frozen=True)
class ANIL(MAML):
    """Almost No Inner Loop (Raghu et al., 2019): only the linear head adapts.

    The body runs once per task on support and query; the inner loop adapts the head on those
    fixed features, so each inner step costs one linear layer. Needs a model with ``features``
    and ``head`` (conv4, resnet12, mlp). ``trainable`` is the head. ``checkpoint=True``
    recomputes the head's steps in the backward pass, as MAML's (:meth:`unrolled`).
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

    def unrolled(self, task: TaskBatch, iteration: int) -> checkpointed.Unrolled:
        """The head's inner loop on features computed once, as ``checkpoint=True`` replays it
        (the features' graph is kept, the steps' are recomputed)."""

        def context(mp: dict[str, Any]) -> dict[str, Any]:
            head, feats = self._head_task(mp["params"], task)
            return {"meta": mp, "head": head, "support": feats.support_x, "query": feats.query_x}

        loss = loss_fn_of(self.loss)
        return checkpointed.unroll(
            self.inner_steps,
            lambda k, h, c: loss(self._head_apply(h, c["support"]), task.support_y),
            lambda c: self.inner_optimizer(c["meta"]),
            lambda k, h, c: self._head_apply(h, c["query"]),
            lambda preds: loss(preds, task.query_y),
            first_order=self.first_order_at(iteration),
            context=context,
            params=lambda c: c["head"],
        )

    def adapt_and_predict(self, meta_params: Any, batch: TaskBatch, steps: int) -> torch.Tensor:
        check_steps("ANIL.adapt_and_predict", "steps", steps, minimum=0)

        def one(mp: dict[str, Any], task: TaskBatch) -> torch.Tensor:
            head, feats = self._head_task(mp["params"], task)
            inner = self.inner_loop(
                mp, steps, first_order=True, observe=lambda h, f: self._head_apply(h, f.query_x)
            )
            return inner(head, feats)[1]["observed"]

        return self.map_tasks(one)(meta_params, batch)
