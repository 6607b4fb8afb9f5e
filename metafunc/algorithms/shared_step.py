"""MAML's meta-gradient with the tasks' first inner step shared (``MAML(shared_first_step=...)``).

Every task's first inner step starts from the same parameters, the meta-parameters, so all the
tasks' first support gradients come from one ``torch.func.vmap`` with the meta-parameters
unmapped, where the task axis folds into the batch of each convolution (dense kernels, not the
grouped ones of a mapped model). The rest of each task's inner loop and its query loss then run
per task, as the per-task strategies (``'loop'``, ``'threads'``) run them. The second-order term
of the first step is a batched vector-Jacobian product, taken :data:`SHARED_STEP_TASKS` tasks at
a time. The gradients are those of the generic path (tested in float64).

It pays for a one-step inner loop on small support sets; with larger support sets or more steps
the tasks' own steps are as fast, for a fraction of the memory (the chunk's vmapped second-order
graph), so the default shares only there, and only under ``'threads'``, the strategy that
already trades memory for speed (:func:`shares_first_step`).
"""

from __future__ import annotations

import functools
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any, cast

import optree
import torch

from metafunc import tree as mt
from metafunc._transforms import any_transform
from metafunc.algorithms.base import Result, gradient, weighted_sum
from metafunc.data.batch import TaskBatch
from metafunc.strategies import resolved_strategy, seeded, task_workers
from metafunc.threads import run_tasks

if TYPE_CHECKING:
    from metafunc.algorithms.maml import MAML

__all__ = [
    "SHARED_STEP_MAX_SUPPORT",
    "SHARED_STEP_TASKS",
    "shared_first_step_grad",
    "shares_first_step",
]

# tasks per shared first step (and first-step graphs held at once): speed vs memory, see
# HISTORY "The shared first step 16 tasks at a time"
SHARED_STEP_TASKS = 16
# most support examples a task for which shared_first_step=None shares: speed vs memory, see
# HISTORY "When the shared first step pays"
SHARED_STEP_MAX_SUPPORT = 8


def shares_first_step(alg: MAML, meta_params: Any, batch: TaskBatch) -> bool:
    """Whether ``alg.meta_grad`` takes the tasks' first inner step at once.

    ``shared_first_step=None`` (the default) shares where it pays and memory was already
    traded for speed: under ``'threads'``, for a one-step inner loop on support sets of at
    most :data:`SHARED_STEP_MAX_SUPPORT` examples per task, for a model exact under ``vmap``
    (:meth:`~metafunc.algorithms.Algorithm.exact_under_vmap`: no ``F.batch_norm``,
    ``F.layer_norm`` or random draw, as in metafunc's own models; a
    :func:`~metafunc.models.from_module` model with dropout, or with a custom layer that calls
    torch's batch or layer norm itself, runs its tasks' steps alone). Not under ``'loop'``
    (the CPU's ``'auto'`` for convolutional work), which holds one task's graph at a time:
    the shared step would hold a chunk's second-order support graph beside it (HISTORY "One
    task's graph at a time").
    ``True`` shares on both per-task strategies for any model; ``False`` never. ``'vmap'`` and
    ``'chunked'`` share the first step anyway.

    Only for the algorithms whose inner loop is MAML's over the whole task (MAML, first-order
    MAML, Meta-SGD), without ``checkpoint``, and at the top level: not inside a ``torch.func``
    transform, under ``torch.compile`` or with leaves already requiring grad, where the generic
    path composes.
    """
    if alg.shared_first_step is False or alg.checkpoint:
        return False
    from metafunc.algorithms.maml import MAML  # here, not above: maml imports this module

    own = type(alg)
    if own.task_loss is not MAML.task_loss or own.inner_loop is not MAML.inner_loop:
        return False
    if any_transform() or torch.compiler.is_compiling():
        return False
    leaves = mt.leaves(meta_params)
    if torch.is_grad_enabled() and any(x.requires_grad for x in leaves):
        return False
    rest = resolved_strategy(
        alg.strategy, mt.device_of(meta_params), convolutional=alg.convolutional(batch)
    )
    if alg.shared_first_step is None:
        support = batch.support_x.shape[1] if batch.support_x.dim() > 1 else 0
        return (
            rest == "threads"
            and alg.inner_steps == 1
            and support <= SHARED_STEP_MAX_SUPPORT
            and alg.exact_under_vmap(batch)
        )
    return rest in ("loop", "threads")


def shared_first_step_grad(
    alg: MAML, meta_params: Any, batch: TaskBatch, iteration: int
) -> tuple[Any, torch.Tensor, dict[str, torch.Tensor]]:
    """``alg.meta_grad`` with the tasks' first support gradients from one ``vmap`` per chunk
    of :data:`SHARED_STEP_TASKS` tasks.

    The meta-loss is ``mean_t L_t(theta, g_t(theta))`` with ``g_t`` task t's first support
    gradient. Each chunk's ``g`` is computed once, with its graph (second order), its
    tasks' query passes run (one graph per task, as the strategy runs them), and a
    vector-Jacobian product through the first step is taken before the next chunk starts:
    the support passes of all tasks are never in memory at once, and none is computed twice.

    With one inner step, the chunk's first update is batched too (``adapt`` with ``first``,
    under ``vmap``): each task's query pass differentiates its adapted parameters as leaves
    of their own, and one product through the batched update and first step carries the
    stacked query gradients to the meta-parameters, so the update's own operations run once
    per chunk instead of once per task, forward and backward. With more steps each task holds
    ``g`` as an input of its own inner loop, and the product takes the stacked partials with
    respect to it. The partials are written into one buffer per leaf as they come: held as
    separate tensors, they would fragment the heap between the tasks' activations.
    """
    first_order = alg.first_order_at(iteration)
    one_step = alg.inner_steps == 1
    where = alg.trainable
    flat, spec = optree.tree_flatten(meta_params)
    # one step: the batched update is differentiated (theta enters it directly) whatever
    # the order; the first step's own graph only at second order
    inputs = [x.detach().requires_grad_(one_step or not first_order) for x in flat]

    def first_step(leaves: list[torch.Tensor], tasks: TaskBatch) -> tuple[Any, torch.Tensor]:
        params: Any = spec.unflatten(leaves)["params"]
        if where is None:
            fast, frozen, pspec = params, None, None
        else:
            fast, frozen, pspec = mt.partition(params, where)

        def support(f: Any, task: TaskBatch) -> torch.Tensor:
            full = f if pspec is None else mt.combine(f, frozen, pspec)
            return alg.support_loss(full, task)

        grad = torch.func.grad_and_value(support)
        return torch.func.vmap(grad, in_dims=(None, 0))(fast, tasks)

    def first_update(leaves: list[torch.Tensor], g0: Any, loss0: torch.Tensor) -> Any:
        # every task's parameters after the first step, stacked on a leading task axis (one
        # step whose gradient is given: adapt reads no batch, hence None)
        mp: Any = spec.unflatten(leaves)
        inner = alg.inner_loop(mp, 1, first_order=first_order)
        return torch.func.vmap(lambda g, l: inner(mp["params"], None, first=(g, l))[0])(g0, loss0)

    def chunk(start: int, stop: int) -> TaskBatch:
        return TaskBatch(*(f[start:stop] for f in batch))

    tasks = batch.num_tasks
    workers = task_workers(alg.strategy, inputs[0].device, convolutional=alg.convolutional(batch))
    call = f"{type(alg).__name__}.meta_grad(meta_params, batch)"

    def task_grad(t: int, held: Any, loss0: torch.Tensor) -> Any:
        # task t alone (the strategies that share the step run one graph per task); held:
        # its adapted parameters (one step) or its first gradient (more steps)
        task = TaskBatch(*(f[t] for f in batch))

        def objective(tree: Any) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
            if one_step:
                return alg.query_loss(tree, task)
            m, g = tree if not first_order else (tree, held)
            return alg.task_loss_given_first(m, task, iteration, first=(g, loss0))

        tree = held if one_step else meta_params if first_order else (meta_params, held)
        return gradient(objective, mt.detach(tree))

    through: list[torch.Tensor | None] = [None] * len(inputs)

    def weighted() -> Iterator[tuple[float, Any]]:
        for c_start in range(0, tasks, SHARED_STEP_TASKS):
            c_stop = min(c_start + SHARED_STEP_TASKS, tasks)
            with torch.set_grad_enabled(not first_order):
                g0, loss0 = first_step(inputs, chunk(c_start, c_stop))
            loss0 = loss0.detach()
            # what the chunk's product starts from: its adapted parameters (one step) or
            # its first gradients (second order, more steps); nothing (first order, more
            # steps: the tasks' own gradients are the whole of it)
            start = first_update(inputs, g0, loss0) if one_step else g0
            calls = [
                functools.partial(task_grad, t, mt.map(lambda x, i=i: x[i], start), loss0[i])
                for i, t in enumerate(range(c_start, c_stop))
            ]
            # each task's partials with respect to `start`, written into one buffer per
            # leaf as they come (not held as separate tensors between the tasks' passes)
            product = one_step or not first_order
            stacked = [torch.empty_like(x) for x in mt.leaves(start)] if product else []
            tasks_run = run_tasks(seeded(calls, alg.randomness, call), workers)
            for i, (grads, loss, metrics) in enumerate(tasks_run):
                if one_step:  # the meta-parameters' gradient is all in the product
                    part, grads = grads, None
                elif not first_order:
                    grads, part = grads
                else:
                    part = None
                if part is not None:
                    for buf, x in zip(stacked, mt.leaves(part), strict=True):
                        buf[i].copy_(x)
                yield 1 / tasks, (grads, loss, metrics)
            if product:
                torch._foreach_div_(stacked, float(tasks))
                pulled = torch.autograd.grad(mt.leaves(start), inputs, stacked, allow_unused=True)
                for j, (prev, t) in enumerate(zip(through, pulled, strict=True)):
                    if t is not None:
                        through[j] = t if prev is None else prev + t
            del g0, start, stacked

    def total(x: torch.Tensor, g: torch.Tensor | None, t: torch.Tensor | None) -> torch.Tensor:
        # a leaf's direct gradient plus what the products pulled back to it
        if g is None:
            return torch.zeros_like(x) if t is None else t
        return g if t is None else g + t

    grads, loss, metrics = cast(Result, weighted_sum(weighted()))
    direct = [None] * len(inputs) if one_step else mt.leaves(grads)
    out = [total(*xs) for xs in zip(inputs, direct, through, strict=True)]
    return cast(Any, spec.unflatten(out)), loss, metrics
