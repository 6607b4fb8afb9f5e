"""MAML++ (Antoniou, Edwards & Storkey, "How to train your MAML", ICLR 2019)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from metafunc.algorithms import checkpointed
from metafunc.algorithms.base import loss_fn_of, task_metrics
from metafunc.algorithms.checks import check_steps
from metafunc.algorithms.maml import MAML
from metafunc.data.batch import TaskBatch
from metafunc.inner import adapt
from metafunc.optim import GradientTransformation, adam, schedules, sgd

__all__ = ["MAMLPlusPlus", "is_batch_norm", "msl_weights"]


def is_batch_norm(path: str) -> bool:
    """Whether ``path`` names a batch-norm weight or bias (``bn0.weight``, ``layer1.bn2.bias``)."""
    return any(part.startswith("bn") for part in path.split(".")[:-1])


def msl_weights(steps: int, iteration: int, msl_iterations: int) -> torch.Tensor:
    """Multi-step loss weights of MAML++ for the query losses after steps 1..``steps``.

    Uniform at iteration 0; every non-final weight decays linearly to ``0.03 / steps`` and the
    final one grows, over ``msl_iterations`` (the reference code's epochs, counted in
    iterations); from then on only the final step counts.
    """
    # plain Python arithmetic (no tensor -> float round trip), so torch.compile traces it
    if msl_iterations <= 0 or iteration >= msl_iterations:
        w = [0.0] * (steps - 1) + [1.0]
    else:
        decay = 1.0 / steps / msl_iterations
        floor = 0.03 / steps
        early = max(1.0 / steps - iteration * decay, floor)
        last = min(1.0 / steps + iteration * (steps - 1) * decay, 1.0 - (steps - 1) * floor)
        w = [early] * (steps - 1) + [last]
    return torch.tensor(w, dtype=torch.float64)


@dataclass(frozen=True)
class MAMLPlusPlus(MAML):
    """MAML with the five fixes of MAML++:

    - **LSLR**: a learned learning rate per layer (parameter tensor) and per inner step,
      ``meta_params['lr'][path]`` of shape ``[inner_steps]``, initialised to ``inner_lr``;
    - **MSL**: the meta-loss is a weighted sum of the query losses after every inner step, with
      weights annealed to the final step over ``msl_iterations`` (:func:`msl_weights`);
    - **per-step batch norm**: batch-norm weights and biases per inner step,
      ``meta_params['bn'][path]`` of shape ``[inner_steps + 1, channels]``, not adapted in the
      inner loop; normalisation uses batch statistics (as the reference implementation does
      in both training and evaluation);
    - **derivative-order annealing**: first order for the first ``first_order_iterations``
      iterations, then second order;
    - **cosine annealing** of the outer learning rate down to ``min_outer_lr``
      (:meth:`outer_optimizer`).

    ``checkpoint=True`` recomputes the inner steps in the backward pass, as MAML's
    (:meth:`unrolled`): memory flat in ``inner_steps``.
    """

    inner_lr: float = 0.1
    inner_steps: int = 5
    msl_iterations: int = 5000
    first_order_iterations: int = 0
    min_outer_lr: float = 1e-5

    def __post_init__(self) -> None:
        super().__post_init__()
        for name in ("msl_iterations", "first_order_iterations"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise ValueError(f"MAMLPlusPlus({name}): must be an int >= 0, got {value!r}.")
        if self.trainable is not None:
            raise ValueError(
                "MAMLPlusPlus(trainable): every non-batch-norm leaf adapts in MAML++; leave "
                "trainable unset (use ANIL to adapt only the head)."
            )

    def init(
        self,
        generator: torch.Generator | None = None,
        *,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str | None = None,
    ) -> dict[str, Any]:
        params = self.model.init(generator, dtype=dtype, device=device)
        steps = self.inner_steps
        bn = {
            k: v.expand(steps + 1, *v.shape).clone() for k, v in params.items() if is_batch_norm(k)
        }
        rest = {k: v for k, v in params.items() if not is_batch_norm(k)}
        lr = {k: torch.full((steps,), self.inner_lr, dtype=dtype, device=device) for k in rest}
        # no "bn" entry without batch norm: an empty subtree breaks torch.compile's tracing
        return {"params": rest, "lr": lr, **({"bn": bn} if bn else {})}

    def inner_optimizer(self, meta_params: dict[str, Any]) -> GradientTransformation:
        return sgd(meta_params["lr"], per_step=True)

    def first_order_at(self, iteration: int) -> bool:
        return self.first_order or iteration < self.first_order_iterations

    def outer_optimizer(self, lr: float, iterations: int) -> GradientTransformation:
        """Adam with the learning rate cosine-annealed from ``lr`` to ``min_outer_lr``."""
        return adam(self.outer_schedule(lr, iterations))

    def outer_schedule(self, lr: float, iterations: int) -> schedules.Schedule:
        return schedules.cosine_decay(lr, max(iterations, 1), alpha=self.min_outer_lr / lr)

    # -- one task, with the inner step index threaded through (for per-step BN) -------------

    def _with_bn(self, params: Any, bn: dict[str, torch.Tensor], step: int) -> dict[str, Any]:
        return {**params, **{k: v[step] for k, v in bn.items()}}

    def _inner(
        self, meta_params: dict[str, Any], steps: int, first_order: bool, observe: Any
    ) -> Any:
        bn = meta_params.get("bn", {})
        if steps > self.inner_steps:
            raise ValueError(
                f"MAMLPlusPlus.adapt_and_predict(steps): {steps} steps asked but the per-step "
                f"learning rates and batch norms cover {self.inner_steps}; use steps <= "
                f"{self.inner_steps}."
            )
        loss = loss_fn_of(self.loss)

        def support(p: Any, task: TaskBatch, state: Any, step: int) -> tuple[torch.Tensor, Any]:
            logits = self.model.apply(self._with_bn(p, bn, step), task.support_x)
            return loss(logits, task.support_y), state

        def look(p: Any, task: TaskBatch, state: Any, step: int) -> torch.Tensor:
            return observe(self.model.apply(self._with_bn(p, bn, step), task.query_x), task)

        return adapt(
            support,
            self.inner_optimizer(meta_params),
            steps,
            first_order=first_order,
            stateful=True,
            observe=look,
        )

    def task_loss(
        self, meta_params: dict[str, Any], task: TaskBatch, iteration: int
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        loss = loss_fn_of(self.loss)
        inner = self._inner(
            meta_params,
            self.inner_steps,
            self.first_order_at(iteration),
            observe=lambda preds, t: loss(preds, t.query_y),
        )
        adapted, _, metrics = inner(meta_params["params"], task, {})
        query_losses = metrics["observed"][1:]
        weights = msl_weights(self.inner_steps, iteration, self.msl_iterations)
        total = (weights.to(query_losses) * query_losses).sum()
        preds = self.model.apply(
            self._with_bn(adapted, meta_params.get("bn", {}), self.inner_steps), task.query_x
        )
        return total, task_metrics(self.loss, preds, task.query_y)

    def unrolled(self, task: TaskBatch, iteration: int) -> checkpointed.Unrolled:
        """This task's inner loop, as ``checkpoint=True`` replays it: step ``k`` with the batch
        norms of step ``k``, and the meta-loss the MSL-weighted sum of the query losses."""
        loss = loss_fn_of(self.loss)

        def apply(k: int, params: Any, mp: dict[str, Any], x: torch.Tensor) -> torch.Tensor:
            return self.model.apply(self._with_bn(params, mp.get("bn", {}), k), x)

        weights = msl_weights(self.inner_steps, iteration, self.msl_iterations)
        return checkpointed.unroll(
            self.inner_steps,
            lambda k, p, mp: loss(apply(k, p, mp, task.support_x), task.support_y),
            self.inner_optimizer,
            lambda k, p, mp: apply(k, p, mp, task.query_x),
            lambda preds: loss(preds, task.query_y),
            first_order=self.first_order_at(iteration),
            weights=[0.0, *weights.tolist()],
        )

    def adapt_and_predict(self, meta_params: Any, batch: TaskBatch, steps: int) -> torch.Tensor:
        check_steps("MAMLPlusPlus.adapt_and_predict", "steps", steps, minimum=0)

        def one(mp: dict[str, Any], task: TaskBatch) -> torch.Tensor:
            inner = self._inner(mp, steps, True, observe=lambda preds, t: preds)
            return inner(mp["params"], task, {})[2]["observed"]

        return self.map_tasks(one)(meta_params, batch)
