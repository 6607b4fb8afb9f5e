"""What every meta-learning algorithm shares: losses, metrics, the meta-gradient and evaluation.

An algorithm is a frozen dataclass built from a model, a loss and hyper-parameters, with

- ``init(generator, *, dtype, device) -> meta_params``: a tree of tensors (what is meta-learned);
- ``meta_loss(meta_params, batch, *, iteration=0) -> (loss, metrics)``: pure and differentiable,
  a mean over the batch's tasks (``meta_grad`` may differentiate it a piece of tasks at a time:
  see ``Algorithm.tasks_per_graph``);
- ``meta_grad(meta_params, batch, *, iteration=0) -> (grads, loss, metrics)``: what the outer
  loop applies (by default the gradient of ``meta_loss``; Reptile and iMAML give their own);
- ``adapt_and_predict(meta_params, batch, steps) -> [tasks, steps + 1, query, ...]``:
  query predictions after 0, 1, ..., ``steps`` inner steps, from one adaptation pass;
- ``outer_optimizer(lr, iterations)``: the outer optimizer the paper used.

Tasks always go through :func:`metafunc.task_map` (and the gradient through pieces of the size
the strategy maps at once); no algorithm loops over single tasks in its own code.
"""

from __future__ import annotations

import dataclasses
import functools
import statistics
import time
from collections.abc import Callable, Iterable, Sequence
from typing import Any, ClassVar, TypeVar, cast

import torch
import torch.nn.functional as F

from metafunc import tree as mt
from metafunc.data.batch import TaskBatch
from metafunc.inner import (
    STRATEGIES,
    _device,
    grad_with_aux,
    run_tasks,
    strategy_candidates,
    strategy_label,
    task_workers,
    tasks_at_once,
)
from metafunc.models.base import Model
from metafunc.optim import GradientTransformation, adam, schedules
from metafunc.optim.schedules import Schedule

__all__ = [
    "COMPILE_MODES",
    "LOSSES",
    "Algorithm",
    "check_common",
    "evaluate_predictions",
    "loss_fn_of",
    "tune_strategy",
]

LOSSES = ("cross_entropy", "mse")
COMPILE_MODES = ("default", "reduce-overhead", "max-autotune")


def loss_fn_of(kind: str) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    """The task loss: ``'cross_entropy'`` (classification) or ``'mse'`` (regression)."""
    if kind == "cross_entropy":
        return F.cross_entropy
    if kind == "mse":
        return F.mse_loss
    raise ValueError(f"loss must be one of {LOSSES}, got {kind!r}.")


def task_metrics(kind: str, preds: torch.Tensor, targets: torch.Tensor) -> dict[str, torch.Tensor]:
    """Loss (and accuracy for classification) of one task's predictions, detached."""
    out = {"loss": loss_fn_of(kind)(preds, targets).detach()}
    if kind == "cross_entropy":
        out["accuracy"] = (preds.argmax(-1) == targets).to(preds.dtype).mean().detach()
    return out


def evaluate_predictions(
    kind: str, preds: torch.Tensor, targets: torch.Tensor
) -> dict[str, torch.Tensor]:
    """Per-task, per-step metrics from ``adapt_and_predict`` output.

    ``preds``: ``[tasks, steps + 1, query, ...]``; ``targets``: ``[tasks, query, ...]``.
    Returns ``{'loss': [tasks, steps + 1], 'accuracy': ...}`` (accuracy for classification).
    """
    t, s = preds.shape[:2]
    flat_p = preds.flatten(0, 1)
    flat_y = targets[:, None].expand(t, s, *targets.shape[1:]).flatten(0, 1)
    if kind == "cross_entropy":
        loss = F.cross_entropy(flat_p.transpose(1, -1), flat_y, reduction="none")
        loss = loss.reshape(t, s, -1).mean(-1)
        acc = (flat_p.argmax(-1) == flat_y).to(preds.dtype).reshape(t, s, -1).mean(-1)
        return {"loss": loss, "accuracy": acc}
    loss = F.mse_loss(flat_p, flat_y, reduction="none").reshape(t, s, -1).mean(-1)
    return {"loss": loss}


def check_common(name: str, *, loss: str, strategy: str, chunk_size: int | None) -> None:
    if loss not in LOSSES:
        raise ValueError(f"{name}(loss): {loss!r} is not one of {LOSSES}.")
    if strategy not in STRATEGIES:
        raise ValueError(f"{name}(strategy): {strategy!r} is not one of {STRATEGIES}.")
    if chunk_size is not None and chunk_size < 1:
        raise ValueError(f"{name}(chunk_size): must be >= 1 or None, got {chunk_size!r}.")


def check_lr(name: str, arg: str, value: float) -> None:
    if not isinstance(value, int | float) or value < 0 or value != value:
        raise ValueError(f"{name}({arg}): must be a float >= 0, got {value!r}.")


def check_steps(name: str, arg: str, value: int, minimum: int = 1) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{name}({arg}): must be an int >= {minimum}, got {value!r}.")


def gradient(
    objective: Callable[[Any], tuple[torch.Tensor, dict[str, torch.Tensor]]], tree: Any
) -> tuple[Any, torch.Tensor, dict[str, torch.Tensor]]:
    """``(gradient of objective's loss w.r.t. tree, loss, metrics)`` for ``objective(tree) ->
    (loss, metrics)``, by :func:`metafunc.inner.grad_with_aux`: inside a ``torch.func``
    transform by ``torch.func.grad``, so it composes; at the top level by ``torch.autograd.grad``,
    the same gradient with one autograd level fewer (about 15% faster and a third less memory
    for a conv4 MAML step on the CPU).
    """

    def wrapped(t: Any) -> tuple[torch.Tensor, tuple[torch.Tensor, Any]]:
        loss, metrics = objective(t)
        return loss, (loss.detach(), metrics)

    grads, (loss, metrics) = grad_with_aux(wrapped, tree)
    return grads, loss, {k: v.detach() for k, v in metrics.items()}


Result = tuple[Any, torch.Tensor, dict[str, torch.Tensor]]


def weighted_sum(parts: Iterable[tuple[float, Any]]) -> Any:
    """``sum(w * tree)`` over ``(w, tree)`` pairs of trees of tensors with one structure, added
    in the order given (so the result does not depend on which thread finished first), each
    tree dropped once added. A whole tree is scaled and added with one call each (the calling
    thread holds the GIL for a quarter less time per meta-batch than leaf by leaf)."""
    total: list[torch.Tensor] = []
    spec = None
    for weight, tree in parts:
        part = list(torch._foreach_mul(mt.leaves(tree), weight))
        if spec is None:
            total, spec = part, mt.structure(tree)
        else:
            torch._foreach_add_(total, part)
    if spec is None:
        raise ValueError("weighted_sum(parts): parts is empty.")
    return spec.unflatten(total)


def mean_over_pieces(
    fn: Callable[[TaskBatch], Result], batch: TaskBatch, size: int, workers: int = 1
) -> Result:
    """``fn(batch)`` for ``fn(batch) -> (grads, loss, metrics)`` that averages over tasks,
    computed on pieces of ``size`` tasks and averaged by task count (:func:`weighted_sum`): the
    same value, with one piece's graph alive at a time, or ``workers`` pieces at once on CPU
    threads (:func:`metafunc.inner.run_tasks`)."""
    tasks = batch.num_tasks
    if size >= tasks:
        return fn(batch)
    pieces = [
        TaskBatch(*(f[start : start + size] for f in batch)) for start in range(0, tasks, size)
    ]
    results = run_tasks([functools.partial(fn, piece) for piece in pieces], workers)
    weights = [piece.num_tasks / tasks for piece in pieces]
    return cast(Result, weighted_sum(zip(weights, results, strict=True)))


def _static(batch: TaskBatch) -> TaskBatch:
    """Mark every dim of the batch static for ``torch.compile``: a short last piece compiles
    its own static graph rather than turning the task axis dynamic (``iteration`` stays free to
    become dynamic, so a changing iteration does not recompile at every step)."""
    for field in batch:
        for d in range(field.dim()):
            torch._dynamo.mark_static(field, d)
    return batch


class Algorithm:
    """Base class: subclasses define ``init``, ``meta_loss`` and ``adapt_and_predict``."""

    model: Model
    loss: str = "cross_entropy"
    # the task-parallel switch every algorithm of this package has as dataclass fields
    # (annotations only: a subclass without them maps its tasks as 'vmap')
    strategy: str
    chunk_size: int | None
    # why compiled_meta_grad cannot trace meta_grad whole ("" where it can)
    not_compilable: ClassVar[str] = ""

    def init(
        self,
        generator: torch.Generator | None = None,
        *,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str | None = None,
    ) -> dict[str, Any]:
        """``{'params': model.init(...)}``; algorithms that meta-learn more extend it."""
        return {"params": self.model.init(generator, dtype=dtype, device=device)}

    def support_loss(self, params: Any, task: TaskBatch) -> torch.Tensor:
        return loss_fn_of(self.loss)(self.model.apply(params, task.support_x), task.support_y)

    def predict(self, params: Any, task: TaskBatch) -> torch.Tensor:
        """The query pass: ``model.apply`` on the query images."""
        return self.model.apply(params, task.query_x)

    def meta_loss(
        self, meta_params: Any, batch: TaskBatch, *, iteration: int = 0
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        raise NotImplementedError

    def adapt_and_predict(self, meta_params: Any, batch: TaskBatch, steps: int) -> torch.Tensor:
        raise NotImplementedError

    def meta_grad(
        self, meta_params: Any, batch: TaskBatch, *, iteration: int = 0
    ) -> tuple[Any, torch.Tensor, dict[str, torch.Tensor]]:
        """``(grads of meta_loss, loss, metrics)``.

        Inside a ``torch.func`` transform (or when a leaf already requires grad) by
        ``torch.func.grad``, so it composes; at the top level by ``torch.autograd.grad`` on
        detached copies of the leaves, the same gradient with one autograd level fewer (about
        15% faster and a third less memory for a conv4 MAML step on the CPU). The meta-loss
        is a mean over tasks, so it is differentiated :meth:`tasks_per_graph` tasks at a time
        and averaged: on the loop strategy one task's graph is alive at a time (a sixth of the
        memory of a whole-batch backward for conv4 5-way 1-shot at meta-batch 32, same speed);
        on ``'threads'`` one per worker thread, the tasks' gradients computed concurrently.
        """
        mt.validate(
            meta_params,
            call=f"{type(self).__name__}.meta_grad(meta_params, batch)",
            name="meta_params",
        )
        return self._by_pieces(
            lambda piece: gradient(
                lambda mp: self.meta_loss(mp, piece, iteration=iteration), meta_params
            ),
            meta_params,
            batch,
        )

    def compiled_meta_grad(
        self, mode: str = "default", *, backend: str = "inductor"
    ) -> Callable[..., tuple[Any, torch.Tensor, dict[str, torch.Tensor]]]:
        """:meth:`meta_grad` compiled whole by ``torch.compile(fullgraph=True)``: the inner loop,
        the query loss and the (second-order) backward become one graph, fused by inductor. Same
        signature and gradients as :meth:`meta_grad` up to rounding (tested in float64).

        The graph covers as many tasks as the algorithm's strategy handles at once: one task for
        ``'loop'`` and ``'threads'`` (the CPU's ``'auto'``), ``chunk_size`` for ``'chunked'``, the
        whole meta-batch for ``'vmap'`` (CUDA's ``'auto'``). A larger meta-batch is split into
        such pieces, each run in turn through the same compiled graph (on the calling thread,
        also under ``'threads'``), and the results averaged by task count (every algorithm's
        meta-loss is a mean over tasks), so compile time does not grow with the meta-batch and
        one task's graph is in memory at a time.

        The first call traces and compiles (seconds to a minute); a new piece shape, dtype,
        device or, for algorithms that anneal, phase of ``iteration`` compiles again.

        Args:
            mode: ``torch.compile``'s mode: ``'default'``, ``'reduce-overhead'`` (also CUDA
                graphs, for static shapes on CUDA) or ``'max-autotune'``.
            backend: ``torch.compile``'s backend; ``'aot_eager'`` traces the same graph without
                code generation (quick to build, for checking a trace).
        """
        call = f"{type(self).__name__}.compiled_meta_grad(mode)"
        if mode not in COMPILE_MODES:
            raise ValueError(f"{call}: mode={mode!r} is not one of {', '.join(COMPILE_MODES)}.")
        if self.not_compilable:
            raise ValueError(
                f"{call}: {type(self).__name__} cannot be compiled whole yet "
                f"({self.not_compilable}); use meta_grad."
            )
        if getattr(self, "checkpoint", False):
            raise ValueError(
                f"{type(self).__name__}.compiled_meta_grad(): checkpoint=True recomputes inner "
                "steps in a Python sweep that a compiled graph would keep whole; use one or the "
                "other (checkpoint=False to compile)."
            )
        compiled = torch.compile(
            self.meta_grad, backend=backend, fullgraph=True,
            mode=mode if backend == "inductor" else None,
        )  # fmt: skip

        def meta_grad(
            meta_params: Any, batch: TaskBatch, *, iteration: int = 0
        ) -> tuple[Any, torch.Tensor, dict[str, torch.Tensor]]:
            mt.validate(meta_params, call=call.replace("(mode)", "()(meta_params, batch)"),
                        name="meta_params")  # fmt: skip
            return self._by_pieces(
                lambda piece: compiled(meta_params, _static(piece), iteration=iteration),
                meta_params,
                batch,
                concurrent=False,  # one compiled graph, called by one thread
            )

        return meta_grad

    def tasks_per_graph(self, tasks: int, device: torch.device) -> int:
        """How many of ``tasks`` one gradient graph covers: what the strategy maps at once (one
        task for ``'loop'`` and ``'threads'``, ``chunk_size`` for ``'chunked'``, all for
        ``'vmap'``, and all for an algorithm without a ``strategy`` field). An algorithm whose
        meta-loss is not a mean of per-task terms (one that couples tasks) overrides this to
        return ``tasks``."""
        strategy = getattr(self, "strategy", "vmap")
        return tasks_at_once(strategy, getattr(self, "chunk_size", None), tasks, device)

    def _by_pieces(
        self,
        fn: Callable[[TaskBatch], Result],
        meta_params: Any,
        batch: TaskBatch,
        *,
        concurrent: bool = True,
    ) -> Result:
        """:func:`mean_over_pieces` in pieces of :meth:`tasks_per_graph` tasks, as many at once
        as the strategy runs (:func:`metafunc.inner.task_workers`) when ``concurrent``."""
        device = mt.leaves(meta_params)[0].device
        size = self.tasks_per_graph(batch.num_tasks, device)
        workers = task_workers(getattr(self, "strategy", "vmap"), device) if concurrent else 1
        return mean_over_pieces(fn, batch, size, workers)

    def evaluate(self, meta_params: Any, batch: TaskBatch, steps: int) -> dict[str, torch.Tensor]:
        """Per-task metrics after 0..``steps`` inner steps: ``{'loss': [tasks, steps + 1], ...}``.

        Runs without building a graph for the outer loop (inner gradients still flow).
        """
        with torch.no_grad():
            preds = self.adapt_and_predict(meta_params, batch, steps)
        return evaluate_predictions(self.loss, preds, batch.query_y)

    def outer_optimizer(self, lr: float, iterations: int) -> GradientTransformation:
        """The paper's outer optimizer: Adam at ``lr`` unless the algorithm says otherwise."""
        return adam(lr)

    def outer_schedule(self, lr: float, iterations: int) -> Schedule:
        """The outer learning rate at each iteration, as :meth:`outer_optimizer` applies it
        (constant unless the algorithm anneals it); the harness logs it."""
        return schedules.constant(lr)


A = TypeVar("A", bound=Algorithm)
_clock = time.perf_counter  # what tune_strategy times with (tests substitute a fake clock)


def _out_of_memory(error: RuntimeError) -> bool:
    """Whether ``error`` is an allocation failure: ``torch.OutOfMemoryError`` (CUDA, MPS...) or
    the CPU allocator's plain ``RuntimeError``."""
    return isinstance(error, torch.OutOfMemoryError) or "DefaultCPUAllocator" in str(error)


def tune_strategy(
    algorithm: A,
    meta_params: Any,
    batch: Any,
    *,
    candidates: Sequence[tuple[str, int | None]] | None = None,
    repeats: int = 3,
    step: Callable[[A, Any, Any], Any] | None = None,
) -> tuple[A, dict[str, float | str]]:
    """``algorithm`` with the task-parallel strategy that runs ``step`` fastest on this machine,
    and what each candidate measured.

    ``strategy='auto'`` is a rule by device (:func:`metafunc.default_strategy`); which strategy
    wins depends on the machine, the model and the task size (on one 2-core VM the CPU threads
    beat the loop by 1.02x at 5-way 1-shot and 1.31x at 20-way), so this times them on your own
    work: every candidate runs ``step`` once to warm up (and compile, where ``step`` compiles),
    then ``repeats`` rounds time each candidate once, in turn, each round starting one
    candidate later (so a host whose speed drifts, or a candidate that leaves the allocator in
    a state the next one pays for, shifts them all alike), and the median of its rounds
    counts. A candidate that runs out of memory (``torch.OutOfMemoryError``, or the CPU
    allocator's error) in any round is recorded as ``'out of memory'`` and dropped. Strategies
    change how tasks are scheduled, not what is computed: every candidate gives the same
    meta-gradient up to rounding. ``metafunc train --strategy auto`` calls this on one
    meta-batch of the run's own configuration.

    Args:
        algorithm: an algorithm instance with ``strategy`` and ``chunk_size`` fields (all of
            :mod:`metafunc.algorithms`).
        meta_params, batch: the work to time, e.g. ``algorithm.init(...)`` and one meta-batch
            (a :class:`metafunc.TaskBatch`) already on the device.
        candidates: ``(strategy, chunk_size)`` pairs, the chunk size an int for ``'chunked'``
            and ``None`` otherwise; by default :func:`metafunc.inner.strategy_candidates` for
            the device of ``meta_params``, ``torch.get_num_threads()`` and the number of tasks.
        repeats: timed rounds, after the warm-up.
        step: ``step(candidate, meta_params, batch)``, the work timed (its result is dropped);
            by default ``candidate.meta_grad(meta_params, batch)``.

    Returns:
        ``(dataclasses.replace(algorithm, strategy=..., chunk_size=...), timings)`` with
        ``timings`` ``{'loop': seconds per step, 'chunked:8': ..., 'vmap': 'out of memory'}``
        (labels by :func:`metafunc.inner.strategy_label`).

    Raises:
        torch.OutOfMemoryError: no candidate fits in memory (its ``timings`` attribute holds
            what was recorded).
    """
    call = "tune_strategy(algorithm, meta_params, batch)"
    names: set[str] = set()
    if dataclasses.is_dataclass(algorithm) and not isinstance(algorithm, type):
        names = {f.name for f in dataclasses.fields(algorithm)}
    if not {"strategy", "chunk_size"} <= names:
        what = (
            f"the class {algorithm.__qualname__}"
            if isinstance(algorithm, type)
            else (f"a {type(algorithm).__qualname__}")
        )
        raise TypeError(
            f"{call}: algorithm is {what}, not an instance with strategy and chunk_size "
            "fields; pass an algorithm of metafunc.algorithms, e.g. MAML(model, ...)."
        )
    if isinstance(repeats, bool) or not isinstance(repeats, int) or repeats < 1:
        raise ValueError(f"{call}: repeats must be an int >= 1, got {repeats!r}.")
    device = _device(meta_params)
    if candidates is None:
        tasks = getattr(batch, "num_tasks", None)
        if tasks is None:
            tasks = int(mt.leaves(batch)[0].shape[0])
        candidates = strategy_candidates(device, torch.get_num_threads(), tasks)
    candidates = list(candidates)
    if not candidates:
        raise ValueError(f"{call}: candidates is empty; give at least one (strategy, chunk).")
    choices = tuple(s for s in STRATEGIES if s != "auto")
    for c in candidates:
        if not (isinstance(c, tuple | list) and len(c) == 2):
            raise ValueError(
                f"{call}: candidates holds {c!r}; give (strategy, chunk_size) pairs such as "
                "('loop', None) or ('chunked', 8)."
            )
        strategy, size = c
        if strategy not in choices:
            raise ValueError(f"{call}: candidate strategy {strategy!r} is not one of {choices}.")
        if strategy == "chunked" and (
            isinstance(size, bool) or not isinstance(size, int) or size < 1
        ):
            raise ValueError(
                f"{call}: candidate ('chunked', {size!r}) needs a chunk size >= 1, e.g. "
                "('chunked', 8)."
            )
        if strategy != "chunked" and size is not None:
            raise ValueError(
                f"{call}: candidate ({strategy!r}, {size!r}): only 'chunked' takes a chunk "
                f"size; give ({strategy!r}, None)."
            )
    if step is None:

        def step(candidate: A, meta: Any, work: Any) -> Any:
            return candidate.meta_grad(meta, work)

    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    alive: dict[str, A] = {}
    for strategy, size in candidates:
        chunk = size if strategy == "chunked" else algorithm.chunk_size
        candidate = dataclasses.replace(algorithm, strategy=strategy, chunk_size=chunk)  # type: ignore[type-var]
        alive[strategy_label(strategy, size)] = candidate
    order = list(alive)
    failed: dict[str, str] = {}
    seconds: dict[str, list[float]] = {label: [] for label in alive}
    for rnd in range(1 + repeats):  # a warm-up round, then the timed ones
        turn = [label for label in order if label in alive]
        for label in turn[rnd % len(turn) :] + turn[: rnd % len(turn)] if turn else ():
            fits = True
            try:
                sync()
                start = _clock()
                step(alive[label], meta_params, batch)
                sync()
            except RuntimeError as error:
                if not _out_of_memory(error):
                    raise
                fits = False
            if not fits:  # outside the handler: the failed step's tensors are freed by now
                failed[label] = "out of memory"
                del alive[label]
                if device.type == "cuda":
                    torch.cuda.empty_cache()
            elif rnd > 0:
                seconds[label].append(_clock() - start)
    medians = {label: statistics.median(seconds[label]) for label in alive}
    timings: dict[str, float | str] = {
        label: failed[label] if label in failed else round(medians[label], 6) for label in order
    }
    if not medians:
        none_fit = torch.OutOfMemoryError(
            f"{call}: no candidate fits in memory ({timings}); time a smaller batch, or give "
            "candidates=[('chunked', k)] with a small k."
        )
        none_fit.timings = timings  # type: ignore[attr-defined]
        raise none_fit
    return alive[min(medians, key=medians.__getitem__)], timings
