"""The MAML family's meta-gradient checkpointed across inner steps (``checkpoint=True``).

Differentiating through ``inner_steps`` steps holds every step's graph until the backward pass,
so memory grows with the number of steps. Here a forward sweep keeps only each step's parameters
and optimizer state, without a graph, and a reverse sweep rebuilds one step's graph at a time
under ``torch.func.vjp`` and pulls the cotangent through it: the same gradient, for one step's
graph and one copy of the parameters per step, at the cost of computing each step twice.

An algorithm describes its inner loop to the sweep as an :class:`Unrolled` (``unrolled``, a
method of MAML, ANIL and MAML++): what its steps read from the meta-parameters, where the fast
weights start, one step, and the query losses the meta-loss sums.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch

from metafunc import tree as mt
from metafunc._transforms import under_grad
from metafunc.algorithms._common import task_means
from metafunc.algorithms.base import task_metrics
from metafunc.data.batch import TaskBatch
from metafunc.optim import GradientTransformation, apply_updates

if TYPE_CHECKING:
    from metafunc.algorithms.maml import MAML

__all__ = [
    "NOT_COMPILABLE",
    "Unrolled",
    "check_checkpoint",
    "checkpointed_meta_grad",
    "checkpointed_task_grad",
    "unroll",
]

NOT_COMPILABLE = (
    "checkpoint=True recomputes the inner steps in a Python sweep that a compiled graph would "
    "keep whole: use one or the other, checkpoint=False to compile"
)


@dataclass(frozen=True)
class Unrolled:
    """One task's inner loop of ``steps`` steps, in the pieces the checkpointed sweep replays.

    Attributes:
        steps: the number of inner steps.
        context: ``context(meta_params) -> ctx``, what the steps and losses read (the
            meta-parameters themselves, or with features computed once from them, as ANIL's);
            differentiated once.
        start: ``start(ctx) -> fast``, the fast weights before the first step.
        init_state: ``init_state(ctx, fast) -> state``, the inner optimizer's state (not
            differentiated: zeros and step counters).
        step: ``step(k, fast, state, ctx) -> (fast, state)``, inner step ``k`` (0-based), its
            gradient already detached where the algorithm is first order at this iteration.
        query: ``query(k, fast, ctx) -> (loss, preds)``, the query loss and predictions of the
            fast weights after ``k`` steps.
        weights: the meta-loss is ``sum(weights[k] * query(k)[0])`` over ``k = 0..steps``; a
            zero weight's query is not computed. The metrics are ``query(steps)``'s.
    """

    steps: int
    context: Callable[[Any], Any]
    start: Callable[[Any], Any]
    init_state: Callable[[Any, Any], Any]
    step: Callable[[int, Any, Any, Any], tuple[Any, Any]]
    query: Callable[[int, Any, Any], tuple[torch.Tensor, torch.Tensor]]
    weights: list[float]


def unroll(
    steps: int,
    support_loss: Callable[[int, Any, Any], torch.Tensor],
    optimizer: Callable[[Any], GradientTransformation],
    predict: Callable[[int, Any, Any], torch.Tensor],
    query_loss: Callable[[torch.Tensor], torch.Tensor],
    *,
    first_order: bool,
    weights: list[float] | None = None,
    context: Callable[[Any], Any] = lambda meta_params: meta_params,
    params: Callable[[Any], Any] = lambda ctx: ctx["params"],
    trainable: mt.PathFilter | None = None,
) -> Unrolled:
    """The :class:`Unrolled` of an inner loop as :func:`metafunc.adapt` runs it: ``steps``
    steps of ``optimizer(ctx)`` on ``support_loss(k, params, ctx)``, from ``params(ctx)`` with
    only the ``trainable`` leaves adapting, the gradient detached when ``first_order``; the
    meta-loss sums ``query_loss(predict(k, params, ctx))`` weighted by ``weights`` (by default
    the last step's alone)."""

    def full(fast: Any, ctx: Any) -> Any:
        if trainable is None:
            return fast
        _, frozen, spec = mt.partition(params(ctx), trainable)
        return mt.combine(fast, frozen, spec)

    def start(ctx: Any) -> Any:
        p = params(ctx)
        return p if trainable is None else mt.partition(p, trainable)[0]

    def step(k: int, fast: Any, state: Any, ctx: Any) -> tuple[Any, Any]:
        grads = torch.func.grad(lambda f: support_loss(k, full(f, ctx), ctx))(fast)
        if first_order:
            grads = mt.detach(grads)
        updates, state = optimizer(ctx).update(grads, state, fast)
        return apply_updates(fast, updates), state

    def query(k: int, fast: Any, ctx: Any) -> tuple[torch.Tensor, torch.Tensor]:
        preds = predict(k, full(fast, ctx), ctx)
        return query_loss(preds), preds

    return Unrolled(
        steps=steps,
        context=context,
        start=start,
        init_state=lambda ctx, fast: optimizer(ctx).init(fast),
        step=step,
        query=query,
        weights=[0.0] * steps + [1.0] if weights is None else weights,
    )


def check_checkpoint(alg: MAML) -> None:
    """Raise ``ValueError`` unless ``alg``'s ``unrolled`` describes its ``task_loss``: the class
    that defines ``unrolled`` must be the one that defines ``task_loss``, or derive from it (a
    subclass that writes its own task loss and not its ``unrolled`` would be checkpointed as its
    parent's)."""

    def owner(name: str) -> type:
        return next(c for c in type(alg).__mro__ if name in c.__dict__)

    if not issubclass(owner("unrolled"), owner("task_loss")):
        name = type(alg).__name__
        raise ValueError(
            f"{name}(checkpoint): {name} defines its own task_loss, and checkpointing replays the "
            f"inner loop its unrolled() describes; define {name}.unrolled (see "
            "metafunc.algorithms.checkpointed.Unrolled), or leave checkpoint=False."
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
    """One task's ``(gradient of the meta-loss w.r.t. meta_params, loss, metrics)`` by a
    forward sweep that stores only each step's fast weights and optimizer state, and a reverse
    sweep that recomputes one inner step at a time under ``torch.func.vjp``."""
    u: Unrolled = alg.unrolled(task, iteration)
    # Nothing differentiates this sweep from outside: keep no graph between steps.
    outside = under_grad() or any(x.requires_grad for x in mt.leaves(meta_params))
    cut = (lambda t: t) if outside else mt.detach
    ctx, pull_ctx = torch.func.vjp(u.context, meta_params)  # type: ignore[misc]
    ctx_value = ctx if outside else mt.detach(ctx)
    fast, pull_start = torch.func.vjp(u.start, ctx_value)  # type: ignore[misc]
    state = u.init_state(ctx_value, fast)
    # Optimizer states may hold integer leaves (step counters): they are carried as constants;
    # the floating leaves go through the vjp.
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
        for k in range(u.steps):
            saved.append((fast, state))
            fast, state = u.step(k, fast, state, ctx_value)

    g_fast = mt.map(torch.zeros_like, fast)
    g_ctx = mt.map(torch.zeros_like, ctx_value)
    total = torch.zeros((), dtype=mt.leaves(fast)[0].dtype, device=mt.leaves(fast)[0].device)
    preds = None

    def add_query(k: int, f: Any) -> None:
        nonlocal g_fast, g_ctx, total, preds
        weight = u.weights[k]
        if weight == 0 and k < u.steps:
            return
        loss, pull, p = torch.func.vjp(  # type: ignore[misc]
            lambda f_, c_: u.query(k, f_, c_), f, ctx_value, has_aux=True
        )
        gf, gc = cut(pull(torch.full_like(loss, weight)))
        g_fast, g_ctx = mt.add(g_fast, gf), mt.add(g_ctx, gc)
        total = total + weight * loss.detach()
        preds = p.detach() if k == u.steps else preds

    add_query(u.steps, fast)
    g_state = [torch.zeros_like(x) for x in floats(state)]
    for k in reversed(range(u.steps)):
        fast_k, state_k = saved[k]

        def one_step(f: Any, fl: list[torch.Tensor], c: Any, k: int = k, st: Any = state_k) -> Any:
            new_fast, new_state = u.step(k, f, merged(fl, st), c)
            return new_fast, floats(new_state)

        _, pull = torch.func.vjp(one_step, fast_k, floats(state_k), ctx_value)  # type: ignore[misc]
        g_fast, g_state, gc = cut(pull((g_fast, g_state)))
        g_ctx = mt.add(g_ctx, gc)
        add_query(k, fast_k)
    (gc,) = cut(pull_start(g_fast))
    (g_meta,) = cut(pull_ctx(mt.add(g_ctx, gc)))
    assert preds is not None
    return g_meta, total, task_metrics(alg.loss, preds, task.query_y)
