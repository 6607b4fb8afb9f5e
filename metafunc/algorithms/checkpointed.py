"""MAML's meta-gradient checkpointed across inner steps (``MAML(checkpoint=True)``).

Differentiating through ``inner_steps`` steps holds every step's graph until the backward pass,
so memory grows with the number of steps. Here a forward sweep keeps only each step's parameters
and optimizer state, without a graph, and a reverse sweep rebuilds one step's graph at a time
under ``torch.func.vjp`` and pulls the cotangent through it: the same gradient, for one step's
graph and one copy of the parameters per step, at the cost of computing each step twice.

It applies to the algorithms whose task loss is :meth:`MAML.task_loss`, an inner optimizer over
the trainable leaves of the whole network on the support set (MAML, first-order MAML, Meta-SGD);
:func:`check_checkpoint` refuses the others.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch

from metafunc import tree as mt
from metafunc._transforms import under_grad
from metafunc.algorithms._common import task_means
from metafunc.algorithms.base import loss_fn_of, task_metrics
from metafunc.data.batch import TaskBatch
from metafunc.optim import apply_updates

if TYPE_CHECKING:
    from metafunc.algorithms.maml import MAML

__all__ = ["check_checkpoint", "checkpointed_meta_grad", "checkpointed_task_grad"]


def check_checkpoint(alg: MAML) -> None:
    """Raise ``ValueError`` unless ``alg`` (built with ``checkpoint=True``) keeps MAML's task
    loss, the only one whose inner steps this module knows how to recompute."""
    from metafunc.algorithms.maml import MAML  # here, not above: maml imports this module

    if type(alg).task_loss is not MAML.task_loss:
        name = type(alg).__name__
        raise ValueError(
            f"{name}(checkpoint): checkpointing across inner steps is implemented for MAML, "
            "FirstOrderMAML and MetaSGD, whose inner loop is the whole network; "
            f"{name} builds its own, so leave checkpoint=False."
        )


def checkpointed_meta_grad(
    alg: MAML, meta_params: Any, batch: TaskBatch, iteration: int
) -> tuple[Any, torch.Tensor, dict[str, torch.Tensor]]:
    """``alg.meta_grad``: :func:`checkpointed_task_grad` on every task, as ``alg.strategy``
    maps tasks, averaged over the tasks."""
    grads, losses, metrics = alg.map_tasks(
        lambda mp, t: checkpointed_task_grad(alg, mp, t, iteration)
    )(meta_params, batch)
    mean = mt.map(lambda g: g.mean(0), grads)
    return mean, *task_means(losses, metrics)


def checkpointed_task_grad(
    alg: MAML, meta_params: dict[str, Any], task: TaskBatch, iteration: int = 0
) -> tuple[Any, torch.Tensor, dict[str, torch.Tensor]]:
    """One task's ``(gradient of the query loss w.r.t. meta_params, loss, metrics)`` by a
    forward sweep that stores only each step's parameters and optimizer state, and a
    reverse sweep that recomputes one inner step at a time under ``torch.func.vjp``."""
    first_order = alg.first_order_at(iteration)
    where = alg.trainable

    def fast_of(mp: dict[str, Any]) -> Any:
        return mp["params"] if where is None else mt.partition(mp["params"], where)[0]

    def full(fast: Any, mp: dict[str, Any]) -> Any:
        if where is None:
            return fast
        _, frozen, spec = mt.partition(mp["params"], where)
        return mt.combine(fast, frozen, spec)

    def step(fast: Any, state: Any, mp: dict[str, Any]) -> tuple[Any, Any]:
        grads = torch.func.grad(lambda f: alg.support_loss(full(f, mp), task))(fast)
        if first_order:
            grads = mt.detach(grads)
        updates, state = alg.inner_optimizer(mp).update(grads, state, fast)
        return apply_updates(fast, updates), state

    # Optimizer states may hold integer leaves (step counters): they are carried as
    # constants; the floating leaves go through the vjp.
    fast = fast_of(meta_params)
    state = alg.inner_optimizer(meta_params).init(fast)
    spec = mt.structure(state)
    mask = [torch.is_floating_point(x) for x in mt.leaves(state)]

    def floats(st: Any) -> list[torch.Tensor]:
        return [x for x, m in zip(mt.leaves(st), mask, strict=True) if m]

    def merged(fl: list[torch.Tensor], st: Any) -> Any:
        it = iter(fl)
        return spec.unflatten(
            [next(it) if m else x for x, m in zip(mt.leaves(st), mask, strict=True)]
        )

    saved = []
    with torch.no_grad():  # values only: the reverse sweep rebuilds each step's graph
        for _ in range(alg.inner_steps):
            saved.append((fast, state))
            fast, state = step(fast, state, meta_params)

    def query(f: Any, mp: dict[str, Any]) -> tuple[torch.Tensor, torch.Tensor]:
        preds = alg.predict(full(f, mp), task)
        return loss_fn_of(alg.loss)(preds, task.query_y), preds.detach()

    # Nothing differentiates this sweep from outside: keep no graph between steps.
    outside = under_grad() or any(x.requires_grad for x in mt.leaves(meta_params))
    cut = (lambda t: t) if outside else mt.detach
    loss, pull, preds = torch.func.vjp(query, fast, meta_params, has_aux=True)  # type: ignore[misc]
    g_fast, g_meta = cut(pull(torch.ones_like(loss)))
    g_state = [torch.zeros_like(x) for x in floats(state)]
    for fast_k, state_k in reversed(saved):

        def one_step(f: Any, fl: list[torch.Tensor], mp: Any, st: Any = state_k) -> Any:
            new_fast, new_state = step(f, merged(fl, st), mp)
            return new_fast, floats(new_state)

        _, pull = torch.func.vjp(one_step, fast_k, floats(state_k), meta_params)  # type: ignore[misc]
        g_fast, g_state, g_mp = cut(pull((g_fast, g_state)))
        g_meta = mt.add(g_meta, g_mp)
    # the inner loop starts at the trainable leaves of meta_params['params']
    if where is None:
        g_params = mt.add(g_meta["params"], g_fast)
    else:
        sel, rest, pspec = mt.partition(g_meta["params"], where)
        g_params = mt.combine(mt.add(sel, g_fast), rest, pspec)
    g_meta = {**g_meta, "params": g_params}
    return g_meta, loss.detach(), task_metrics(alg.loss, preds, task.query_y)
