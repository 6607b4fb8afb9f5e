"""MAML and the algorithms that differ from it only in what is meta-learned and which leaves adapt:
first-order MAML, ANIL and Meta-SGD."""

from __future__ import annotations

import functools
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any, ClassVar, cast

import optree
import torch
import torch.nn.functional as F

from metafunc import tree as mt
from metafunc._threads import run_tasks
from metafunc._transforms import any_transform, under_grad
from metafunc.algorithms.base import (
    Algorithm,
    Result,
    check_lr,
    check_steps,
    gradient,
    loss_fn_of,
    task_metrics,
    weighted_sum,
)
from metafunc.data.batch import TaskBatch
from metafunc.inner import adapt
from metafunc.models.base import Model
from metafunc.optim import GradientTransformation, apply_updates, sgd
from metafunc.strategies import resolved_strategy, seeded, task_workers

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

    ``shared_first_step``: every task's first inner step starts from the same parameters, so
    :meth:`meta_grad` can compute all the tasks' first support gradients in one
    ``torch.func.vmap`` with the meta-parameters unmapped, where the task axis folds into the
    batch of each convolution (dense kernels, not the grouped ones of a mapped model), then
    run the rest of each task's inner loop and its query loss per task; the second-order term
    of the first step is a batched vector-Jacobian product, taken :attr:`SHARED_STEP_TASKS`
    tasks at a time: a chunk's first step is computed once with its graph, its tasks' query
    passes run, and the product is taken before the next chunk. The same gradients (tested in
    float64). ``True`` does so on the per-task strategies (``'loop'``, ``'threads'``);
    ``None`` (the default) where it measured faster on a 2-core CPU: a one-step inner loop
    on support sets of at most :attr:`SHARED_STEP_MAX_SUPPORT` examples per task (larger ones
    were as fast or slower without it, for a fraction of the memory) whose tasks then run per
    task, under ``'loop'``, ``'threads'`` or ``'auto'`` on the CPU
    (which runs the query passes as ``'threads'``; Omniglot 5-way 1-shot, mb 32, 2-core EPYC,
    one process: 0.476 s against 0.534 s with ``shared_first_step=False``, and 0.510 s with
    the query passes as ``'loop'``). With more inner steps it was slower (20-way, 5 steps,
    ``'threads'``: 1.625 s against 1.512 s without it), so ``'auto'`` keeps ``'threads'``
    without it there. ``None`` shares only for a model known to be exact under
    ``vmap`` (``Model.vmap_exact``: metafunc's own models, not
    :func:`~metafunc.models.from_module`'s, whose custom layers may not be, so that ``'loop'``
    stays the safe reference for them); ``True`` asserts it for any model. ``False`` never.
    ``'vmap'`` and ``'chunked'`` share the first step anyway.
    """

    model: Model
    inner_lr: float = 0.4
    inner_steps: int = 1
    first_order: bool = False
    loss: str = "cross_entropy"
    trainable: mt.PathFilter | None = None
    strategy: str = "auto"
    chunk_size: int | None = None
    randomness: str = "different"
    checkpoint: bool = False
    shared_first_step: bool | None = None
    # tasks whose first step the shared first step computes at once (and, second order, whose
    # first-step graph it holds while their query passes run). Omniglot 5-way 1-shot mb 32 on a
    # 2-core EPYC, second order, one process: 16 ran 1.07x faster than 8 (14 rounds) for 49 MiB
    # more peak RSS; 32 another 1.02x for 109 MiB more; 4 0.93x.
    SHARED_STEP_TASKS: ClassVar[int] = 16
    # the most support examples per task for which shared_first_step=None shares the step.
    # Omniglot conv4, 15 queries per class, one step, 'threads', 2-core EPYC, shared against
    # not: 5 examples (5-way 1-shot) 1.13x faster, 8 1.02-1.08x, 10 1.00-1.03x, 20 and 25
    # 0.83-0.93x; its memory 2-5x (the chunk's vmapped second-order graph: 476 against 186 MiB
    # at 5, 1014 against 196 at 25).
    SHARED_STEP_MAX_SUPPORT: ClassVar[int] = 8

    def __post_init__(self) -> None:
        super().__post_init__()
        name = type(self).__name__
        check_lr(name, "inner_lr", self.inner_lr)
        check_steps(name, "inner_steps", self.inner_steps)
        if self.checkpoint and type(self).task_loss is not MAML.task_loss:
            raise ValueError(
                f"{name}(checkpoint): checkpointing across inner steps is implemented for MAML, "
                "FirstOrderMAML and MetaSGD, whose inner loop is the whole network; "
                f"{name} builds its own, so leave checkpoint=False."
            )

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
        return self._query_loss(meta_params, task, iteration, None)

    def _query_loss(
        self, meta_params: dict[str, Any], task: TaskBatch, iteration: int, first: Any
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """:meth:`task_loss`, the first inner step taken with ``first = (grads, loss)`` when
        given (see :func:`metafunc.inner.adapt`)."""
        inner = self.inner_loop(
            meta_params, self.inner_steps, first_order=self.first_order_at(iteration)
        )
        adapted, _ = inner(meta_params["params"], task, first=first)
        return self._scored(adapted, task)

    def _scored(
        self, adapted: Any, task: TaskBatch
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """The query loss and metrics of adapted parameters."""
        preds = self.predict(adapted, task)
        return loss_fn_of(self.loss)(preds, task.query_y), task_metrics(
            self.loss, preds, task.query_y
        )

    def checkpointed_task_grad(
        self, meta_params: dict[str, Any], task: TaskBatch, iteration: int = 0
    ) -> tuple[Any, torch.Tensor, dict[str, torch.Tensor]]:
        """One task's ``(gradient of the query loss w.r.t. meta_params, loss, metrics)`` by a
        forward sweep that stores only each step's parameters and optimizer state, and a
        reverse sweep that recomputes one inner step at a time under ``torch.func.vjp``."""
        first_order = self.first_order_at(iteration)
        where = self.trainable

        def fast_of(mp: dict[str, Any]) -> Any:
            return mp["params"] if where is None else mt.partition(mp["params"], where)[0]

        def full(fast: Any, mp: dict[str, Any]) -> Any:
            if where is None:
                return fast
            _, frozen, spec = mt.partition(mp["params"], where)
            return mt.combine(fast, frozen, spec)

        def step(fast: Any, state: Any, mp: dict[str, Any]) -> tuple[Any, Any]:
            grads = torch.func.grad(lambda f: self.support_loss(full(f, mp), task))(fast)
            if first_order:
                grads = mt.detach(grads)
            updates, state = self.inner_optimizer(mp).update(grads, state, fast)
            return apply_updates(fast, updates), state

        # Optimizer states may hold integer leaves (step counters): they are carried as
        # constants; the floating leaves go through the vjp.
        fast = fast_of(meta_params)
        state = self.inner_optimizer(meta_params).init(fast)
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
            for _ in range(self.inner_steps):
                saved.append((fast, state))
                fast, state = step(fast, state, meta_params)

        def query(f: Any, mp: dict[str, Any]) -> tuple[torch.Tensor, torch.Tensor]:
            preds = self.predict(full(f, mp), task)
            return loss_fn_of(self.loss)(preds, task.query_y), preds.detach()

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
        return g_meta, loss.detach(), task_metrics(self.loss, preds, task.query_y)

    # -- the meta-batch ----------------------------------------------------------------------

    def meta_grad(
        self, meta_params: Any, batch: TaskBatch, *, iteration: int = 0
    ) -> tuple[Any, torch.Tensor, dict[str, torch.Tensor]]:
        """The gradient of :meth:`meta_loss`; with ``checkpoint=True`` by
        :meth:`checkpointed_task_grad` per task (same value, memory flat in ``inner_steps``)."""
        if not self.checkpoint:
            if self._shares_first_step(meta_params, batch):
                return self._meta_grad_shared_first(meta_params, batch, iteration)
            return super().meta_grad(meta_params, batch, iteration=iteration)
        grads, losses, metrics = self.map_tasks(
            lambda mp, t: self.checkpointed_task_grad(mp, t, iteration)
        )(meta_params, batch)
        mean = mt.map(lambda g: g.mean(0), grads)
        return mean, losses.mean(), {k: v.mean() for k, v in metrics.items()}

    def _shares_first_step(self, meta_params: Any, batch: TaskBatch) -> bool:
        """Whether :meth:`meta_grad` takes the tasks' first inner step at once (the class
        docstring's ``shared_first_step``), for the algorithms whose inner loop is
        :meth:`inner_loop` over the whole task (MAML, first-order MAML, Meta-SGD), called at the
        top level (not inside a ``torch.func`` transform, under ``torch.compile`` or with leaves
        already requiring grad, where the generic path composes)."""
        if self.shared_first_step is False or self.checkpoint:
            return False
        own = type(self)
        if own.task_loss is not MAML.task_loss or own.inner_loop is not MAML.inner_loop:
            return False
        if any_transform() or torch.compiler.is_compiling():
            return False
        leaves = mt.leaves(meta_params)
        if torch.is_grad_enabled() and any(x.requires_grad for x in leaves):
            return False
        rest = resolved_strategy(
            self.strategy, mt.device_of(meta_params), convolutional=self.convolutional(batch)
        )
        if self.shared_first_step is None:
            support = batch.support_x.shape[1] if batch.support_x.dim() > 1 else 0
            return (
                rest in ("loop", "threads")
                and self.inner_steps == 1
                and self.model.vmap_exact
                and support <= self.SHARED_STEP_MAX_SUPPORT
            )
        return rest in ("loop", "threads")

    def _meta_grad_shared_first(
        self, meta_params: Any, batch: TaskBatch, iteration: int
    ) -> tuple[Any, torch.Tensor, dict[str, torch.Tensor]]:
        """:meth:`meta_grad` with the tasks' first support gradients from one ``vmap`` per
        chunk of :attr:`SHARED_STEP_TASKS` tasks.

        The meta-loss is ``mean_t L_t(theta, g_t(theta))`` with ``g_t`` task t's first support
        gradient. Each chunk's ``g`` is computed once, with its graph (second order), its
        tasks' query passes run (one graph per task, as the strategy runs them), and a
        vector-Jacobian product through the first step is taken before the next chunk starts:
        the support passes of all tasks are never in memory at once, and none is computed twice.

        With one inner step, the chunk's first update is batched too (``adapt`` with ``first``,
        under ``vmap``): each task's query pass differentiates its adapted parameters as leaves
        of their own, and one product through the batched update and first step carries the
        stacked query gradients to the meta-parameters (the update's own operations run once
        per chunk instead of once per task, forward and backward: a 5-way 1-shot meta-batch of
        32 tasks on a 2-core EPYC, two threads, in one process, 0.526 s against 0.570 s at
        second order, 1.09x by round, 1.03x at first order, the same peak memory). With more
        steps each task holds ``g`` as an input of its own inner loop, and the product takes
        the stacked partials with respect to it. The partials are written into one buffer per
        leaf as they come: held as separate tensors, they fragmented the heap between the
        tasks' activations (40-50 MiB more peak RSS at 5-way)."""
        first_order = self.first_order_at(iteration)
        one_step = self.inner_steps == 1
        where = self.trainable
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
                return self.support_loss(full, task)

            grad = torch.func.grad_and_value(support)
            return torch.func.vmap(grad, in_dims=(None, 0))(fast, tasks)

        def first_update(leaves: list[torch.Tensor], g0: Any, loss0: torch.Tensor) -> Any:
            # every task's parameters after the first step, stacked on a leading task axis (one
            # step whose gradient is given: adapt reads no batch, hence None)
            mp: Any = spec.unflatten(leaves)
            inner = self.inner_loop(mp, 1, first_order=first_order)
            return torch.func.vmap(lambda g, l: inner(mp["params"], None, first=(g, l))[0])(
                g0, loss0
            )

        def chunk(start: int, stop: int) -> TaskBatch:
            return TaskBatch(*(f[start:stop] for f in batch))

        tasks = batch.num_tasks
        workers = task_workers(
            self.strategy, inputs[0].device, convolutional=self.convolutional(batch)
        )
        call = f"{type(self).__name__}.meta_grad(meta_params, batch)"

        def task_grad(t: int, held: Any, loss0: torch.Tensor) -> Any:
            # task t alone (the strategies that share the step run one graph per task); held:
            # its adapted parameters (one step) or its first gradient (more steps)
            task = TaskBatch(*(f[t] for f in batch))

            def objective(tree: Any) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
                if one_step:
                    return self._scored(tree, task)
                m, g = tree if not first_order else (tree, held)
                return self._query_loss(m, task, iteration, (g, loss0))

            tree = held if one_step else meta_params if first_order else (meta_params, held)
            return gradient(objective, mt.detach(tree))

        through: list[torch.Tensor | None] = [None] * len(inputs)

        def weighted() -> Iterator[tuple[float, Any]]:
            for c_start in range(0, tasks, self.SHARED_STEP_TASKS):
                c_stop = min(c_start + self.SHARED_STEP_TASKS, tasks)
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
                tasks_run = run_tasks(seeded(calls, self.randomness, call), workers)
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
                    pulled = torch.autograd.grad(
                        mt.leaves(start), inputs, stacked, allow_unused=True
                    )
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

    def meta_loss(
        self, meta_params: Any, batch: TaskBatch, *, iteration: int = 0
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        losses, metrics = self.map_tasks(lambda mp, t: self.task_loss(mp, t, iteration))(
            meta_params, batch
        )
        return losses.mean(), {k: v.mean() for k, v in metrics.items()}

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
        preds = self._head_apply(adapted, feats.query_x)
        return loss_fn_of(self.loss)(preds, task.query_y), task_metrics(
            self.loss, preds, task.query_y
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
