"""What every meta-learning algorithm shares: the contract, input checks, losses, metrics, the
meta-gradient and evaluation (the contract is :class:`Algorithm`'s docstring)."""

from __future__ import annotations

import dataclasses
import functools
import statistics
import threading
import time
import types
from collections.abc import Callable, Iterable, Sequence
from typing import Any, Literal, TypeVar, cast

import torch
import torch.nn.functional as F

from metafunc import tree as mt
from metafunc.algorithms.checks import LOSSES, Loss, check_common
from metafunc.data.batch import TaskBatch, check_batch, checked_scope
from metafunc.inner import grad_with_aux
from metafunc.models.base import Model
from metafunc.optim import GradientTransformation, adam, schedules
from metafunc.optim.schedules import Schedule
from metafunc.strategies import (
    STRATEGIES,
    Randomness,
    Strategy,
    exact_under_vmap,
    mapper,
    seeded,
    strategy_candidates,
    strategy_label,
    task_map,
    task_workers,
    tasks_at_once,
    uses_convolutions,
)
from metafunc.threads import on_worker, run_tasks

__all__ = [
    "COMPILE_MODES",
    "Algorithm",
    "evaluate_predictions",
    "loss_fn_of",
    "tune_strategy",
]

_TARGETS: dict[str, Literal["classes", "values"]] = {"cross_entropy": "classes", "mse": "values"}
COMPILE_MODES = ("default", "reduce-overhead", "max-autotune")


def loss_fn_of(kind: Loss) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    """The task loss: ``'cross_entropy'`` (classification), ``'mse'`` (regression), or the
    callable itself."""
    if callable(kind):
        return kind
    if kind == "cross_entropy":
        return F.cross_entropy
    if kind == "mse":
        return F.mse_loss
    raise ValueError(f"loss must be one of {LOSSES}, got {kind!r}.")


def scores_classes(kind: Loss, preds: torch.Tensor, targets: torch.Tensor) -> bool:
    """Whether ``preds`` are class scores for ``targets`` (so accuracy is a metric):
    ``'cross_entropy'``, or a callable loss given integer labels and one more axis of scores."""
    if callable(kind):
        return not targets.is_floating_point() and preds.dim() == targets.dim() + 1
    return kind == "cross_entropy"


def task_metrics(kind: Loss, preds: torch.Tensor, targets: torch.Tensor) -> dict[str, torch.Tensor]:
    """Loss (and accuracy for classification) of one task's predictions, detached."""
    out = {"loss": loss_fn_of(kind)(preds, targets).detach()}
    if scores_classes(kind, preds, targets):
        out["accuracy"] = (preds.argmax(-1) == targets).to(preds.dtype).mean().detach()
    return out


def evaluate_predictions(
    kind: Loss, preds: torch.Tensor, targets: torch.Tensor
) -> dict[str, torch.Tensor]:
    """Per-task, per-step metrics from ``adapt_and_predict`` output.

    ``preds``: ``[tasks, steps + 1, query, ...]``; ``targets``: ``[tasks, query, ...]``.
    Returns ``{'loss': [tasks, steps + 1], 'accuracy': ...}`` (accuracy for classification).
    """
    t, s = preds.shape[:2]
    flat_p = preds.flatten(0, 1)
    flat_y = targets[:, None].expand(t, s, *targets.shape[1:]).flatten(0, 1)
    if callable(kind):  # one value per task and step, mapped as the loss is written (per task)
        out = {"loss": torch.func.vmap(kind)(flat_p, flat_y).reshape(t, s)}
        if scores_classes(kind, preds[0, 0], targets[0]):
            acc = (flat_p.argmax(-1) == flat_y).to(preds.dtype).reshape(t, s, -1).mean(-1)
            out["accuracy"] = acc
        return out
    if kind == "cross_entropy":
        loss = F.cross_entropy(flat_p.transpose(1, -1), flat_y, reduction="none")
        loss = loss.reshape(t, s, -1).mean(-1)
        acc = (flat_p.argmax(-1) == flat_y).to(preds.dtype).reshape(t, s, -1).mean(-1)
        return {"loss": loss, "accuracy": acc}
    loss = F.mse_loss(flat_p, flat_y, reduction="none").reshape(t, s, -1).mean(-1)
    return {"loss": loss}


def gradient(
    objective: Callable[[Any], tuple[torch.Tensor, dict[str, torch.Tensor]]], tree: Any
) -> tuple[Any, torch.Tensor, dict[str, torch.Tensor]]:
    """``(gradient of objective's loss w.r.t. tree, loss, metrics)`` for ``objective(tree) ->
    (loss, metrics)``, by :func:`metafunc.inner.grad_with_aux`: inside a ``torch.func``
    transform by ``torch.func.grad``, so it composes; at the top level by ``torch.autograd.grad``,
    the same gradient with one autograd level fewer, so less time and memory (measurements:
    HISTORY "gradient() at the top level").
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
    fn: Callable[[TaskBatch], Result],
    batch: TaskBatch,
    size: int,
    workers: int = 1,
    *,
    randomness: str = "different",
    call: str = "meta_grad",
) -> Result:
    """``fn(batch)`` for ``fn(batch) -> (grads, loss, metrics)`` that averages over tasks,
    computed on pieces of ``size`` tasks and averaged by task count (:func:`weighted_sum`): the
    same value, with one piece's graph alive at a time, or ``workers`` pieces at once on CPU
    threads (:func:`metafunc.threads.run_tasks`). Each piece draws from a random stream of its
    own (:func:`metafunc.strategies.seeded`), so the result does not depend on which thread ran
    it."""
    tasks = batch.num_tasks
    if size >= tasks:
        return fn(batch)
    pieces = [
        TaskBatch(*(f[start : start + size] for f in batch)) for start in range(0, tasks, size)
    ]
    calls = seeded([functools.partial(fn, piece) for piece in pieces], randomness, call)
    results = run_tasks(calls, workers)
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


_ENTRY = threading.local()  # .depth: public entry points open on this thread
_MODEL_FACTS: dict[Any, bool] = {}  # Algorithm.convolutional, .exact_under_vmap, by input shape
_ENTRY_POINTS = ("meta_loss", "meta_grad", "adapt_and_predict", "evaluate")


def _entry_point(method: Callable[..., Any]) -> Callable[..., Any]:
    """``method(self, meta_params, batch, ...)`` with :meth:`Algorithm.check_inputs` run first
    when it is the outermost entry point on this thread (not when one entry point calls another,
    on a worker thread running a piece of a checked batch, or while ``torch.compile`` traces)."""
    if getattr(method, "_entry_point", False):
        return method

    @functools.wraps(method)
    def checked(self: Algorithm, meta_params: Any, batch: Any, *args: Any, **kwargs: Any) -> Any:
        if getattr(_ENTRY, "depth", 0) or on_worker() or torch.compiler.is_compiling():
            return method(self, meta_params, batch, *args, **kwargs)
        self.check_inputs(f"{type(self).__name__}.{method.__name__}", meta_params, batch)
        _ENTRY.depth = 1
        try:
            with checked_scope():
                return method(self, meta_params, batch, *args, **kwargs)
        finally:
            _ENTRY.depth = 0

    checked._entry_point = True  # type: ignore[attr-defined]
    return checked


@dataclasses.dataclass(frozen=True)
class Algorithm:
    """The base of every algorithm: what a subclass defines, and what it gets.

    An algorithm is a frozen dataclass (this class is one) built from a model, a loss and
    hyper-parameters; the README's CAVIA example (``tests/test_readme.py`` runs it) is a complete
    one in 30 lines.

    **Its fields** (a subclass adds its hyper-parameters after ``model``; all but ``model`` are
    keyword-only here, and a subclass may redeclare one to change its default)

    - ``model: metafunc.Model`` (an ``nn.Module`` is refused with the fix,
      :func:`metafunc.from_module`);
    - ``loss``: ``'cross_entropy'`` (class labels, int64 in ``[0, ways)``), ``'mse'`` (floating
      targets) or your own ``loss(preds, targets) -> scalar`` for one task (accuracy is reported
      too when its targets are integer labels and its predictions class scores);
    - the task-parallel switch: ``strategy`` (:data:`metafunc.strategies.Strategy`, ``'auto'``:
      :func:`metafunc.default_strategy`), ``chunk_size`` and ``randomness`` (``'different'``).

    **A subclass defines**

    - ``meta_loss(meta_params, batch, *, iteration=0) -> (loss, metrics)``: a scalar loss,
      differentiable with respect to ``meta_params``, the mean over the batch's tasks; ``metrics``
      a dict of detached scalars (``'loss'``; ``'accuracy'`` for classification);
    - ``adapt_and_predict(meta_params, batch, steps) -> Tensor [tasks, steps + 1, query, ...]``:
      each task's query predictions after 0, 1, ..., ``steps`` inner steps (logits for
      classification, values for regression), from one adaptation pass;
    - optionally ``init`` (by default ``{'params': model.init(...)}``), ``meta_grad`` (by
      default the gradient of ``meta_loss``; Reptile and iMAML give their own),
      ``outer_optimizer`` and ``num_classes``.

    **It gets**

    - ``meta_grad(meta_params, batch, *, iteration=0) -> (grads, loss, metrics)``: what the outer
      loop applies, ``grads`` shaped like ``meta_params``;
    - ``evaluate(meta_params, batch, steps, *, training=False) -> {'loss': [tasks, steps + 1],
      'accuracy': ...}``: ``loss`` applied to ``adapt_and_predict``'s predictions against
      ``batch.query_y``, without an outer graph, the model in inference mode (dropout off;
      batch norm with each task's own batch statistics, the transductive protocol of MAML and
      its successors, as no algorithm here carries running statistics);
    - input checks at every entry point (``meta_loss``, ``meta_grad``, ``adapt_and_predict``,
      ``evaluate``, its own overrides included): ``meta_params`` a tree of floating tensors
      (:func:`metafunc.tree.validate`) and ``batch`` a well-formed meta-batch
      (:func:`metafunc.check_batch`: one task count in every field, a task axis, matching shapes,
      int64 labels in ``[0, num_classes)`` for classification, floating targets for regression),
      each error naming the call, the field and the fix;
    - :meth:`map_tasks`: :func:`metafunc.task_map` with the algorithm's ``strategy``,
      ``chunk_size`` and ``randomness``; ``outer_optimizer`` (Adam) and ``outer_schedule``.

    Tasks always go through :func:`metafunc.task_map` (and the gradient through pieces of the
    size the strategy maps at once); no algorithm loops over single tasks in its own code.
    """

    model: Model
    _: dataclasses.KW_ONLY
    loss: Loss = "cross_entropy"
    strategy: Strategy = "auto"
    chunk_size: int | None = None
    randomness: Randomness = "different"

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        for name in _ENTRY_POINTS:
            if name in cls.__dict__:
                setattr(cls, name, _entry_point(cls.__dict__[name]))

    def __post_init__(self) -> None:
        check_common(
            type(self).__name__,
            model=self.model,
            loss=self.loss,
            strategy=self.strategy,
            chunk_size=self.chunk_size,
            randomness=self.randomness,
        )

    def init(
        self,
        generator: torch.Generator | None = None,
        *,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str | None = None,
    ) -> dict[str, Any]:
        """``{'params': model.init(...)}``; algorithms that meta-learn more extend it."""
        return {"params": self.model.init(generator, dtype=dtype, device=device)}

    # -- inputs ------------------------------------------------------------------------------

    def num_classes(self, meta_params: Any, batch: TaskBatch) -> int | None:
        """How many classes a task of ``batch`` has, for the label check (``None``: unknown):
        by default the rows of the model head's weight, ``meta_params['params'][head +
        '.weight']``."""
        head = self.model.head
        params = meta_params.get("params") if isinstance(meta_params, dict) else None
        weight = params.get(f"{head}.weight") if head and isinstance(params, dict) else None
        return int(weight.shape[0]) if isinstance(weight, torch.Tensor) and weight.dim() else None

    def check_inputs(self, call: str, meta_params: Any, batch: Any) -> None:
        """What every entry point checks: ``meta_params`` a tree of floating tensors on one
        device and ``batch`` a meta-batch fit for ``loss`` (:func:`metafunc.check_batch`)."""
        mt.validate(meta_params, call=f"{call}(meta_params, batch)", name="meta_params")
        check_batch(
            batch,
            call=f"{call}(meta_params, batch)",
            targets=None if callable(self.loss) else _TARGETS.get(self.loss),
            ways=lambda: self.num_classes(meta_params, batch),
        )

    # -- one task, and the map over tasks ----------------------------------------------------

    def loss_and_metrics(
        self, preds: torch.Tensor, targets: torch.Tensor
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """``loss`` of one task's predictions (differentiable) and their detached metrics."""
        return loss_fn_of(self.loss)(preds, targets), task_metrics(self.loss, preds, targets)

    def support_loss(self, params: Any, task: TaskBatch) -> torch.Tensor:
        return loss_fn_of(self.loss)(self.model.apply(params, task.support_x), task.support_y)

    def predict(self, params: Any, task: TaskBatch) -> torch.Tensor:
        """The query pass: ``model.apply`` on the query images."""
        return self.model.apply(params, task.query_x)

    def map_tasks(self, fn: Callable[..., Any]) -> Callable[..., Any]:
        """``task_map(fn)`` with this algorithm's ``strategy``, ``chunk_size`` and
        ``randomness``: ``fn(meta_params, task)`` over the tasks of a batch."""
        return mapper(
            fn,
            strategy=self.strategy,
            chunk_size=self.chunk_size,
            in_dims=(None, 0),
            randomness=self.randomness,
            check_batches=False,  # checked at the entry point
        )

    # -- the meta-batch ----------------------------------------------------------------------

    def meta_loss(
        self, meta_params: Any, batch: TaskBatch, *, iteration: int = 0
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        raise NotImplementedError(
            f"{type(self).__name__}.meta_loss: a subclass of Algorithm defines meta_loss "
            "(see the Algorithm docstring)."
        )

    def adapt_and_predict(self, meta_params: Any, batch: TaskBatch, steps: int) -> torch.Tensor:
        raise NotImplementedError(
            f"{type(self).__name__}.adapt_and_predict: a subclass of Algorithm defines "
            "adapt_and_predict (see the Algorithm docstring)."
        )

    @_entry_point
    def meta_grad(
        self, meta_params: Any, batch: TaskBatch, *, iteration: int = 0
    ) -> tuple[Any, torch.Tensor, dict[str, torch.Tensor]]:
        """``(grads of meta_loss, loss, metrics)``.

        Inside a ``torch.func`` transform (or when a leaf already requires grad) by
        ``torch.func.grad``, so it composes; at the top level by ``torch.autograd.grad`` on
        detached copies of the leaves, the same gradient with one autograd level fewer. The
        meta-loss is a mean over tasks, so it is differentiated :meth:`tasks_per_graph` tasks at
        a time and averaged: on the loop strategy one task's graph is alive at a time; on
        ``'threads'`` one per worker thread, the tasks' gradients computed concurrently.
        """
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
        ``'loop'`` (the CPU's ``'auto'`` for convolutions) and ``'threads'``, ``chunk_size`` for
        ``'chunked'``, the whole meta-batch for ``'vmap'`` (CUDA's ``'auto'``). A larger
        meta-batch is split into such pieces, each run in turn through the same compiled graph
        (on the calling thread, also under ``'threads'``), and the results averaged by task
        count (every algorithm's meta-loss is a mean over tasks), so compile time does not grow
        with the meta-batch and one task's graph is in memory at a time.

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
        if self.not_compilable():
            raise ValueError(
                f"{call}: {type(self).__name__} cannot be compiled whole "
                f"({self.not_compilable()}); use meta_grad."
            )
        # the method itself, not its input-checking wrapper (whose one code object every class
        # shares, so its compiled variants would pile up against dynamo's recompile limit)
        method = type(self).meta_grad
        compiled = torch.compile(
            types.MethodType(getattr(method, "__wrapped__", method), self), backend=backend,
            fullgraph=True, mode=mode if backend == "inductor" else None,
        )  # fmt: skip

        def meta_grad(
            meta_params: Any, batch: TaskBatch, *, iteration: int = 0
        ) -> tuple[Any, torch.Tensor, dict[str, torch.Tensor]]:
            self.check_inputs(call.replace("(mode)", "()"), meta_params, batch)
            return self._by_pieces(
                lambda piece: compiled(meta_params, _static(piece), iteration=iteration),
                meta_params,
                batch,
                concurrent=False,  # one compiled graph, called by one thread
            )

        return meta_grad

    def not_compilable(self) -> str:
        """Why :meth:`compiled_meta_grad` (and :func:`metafunc.training_step`'s compiled step)
        cannot trace this algorithm's ``meta_grad`` whole, with the fix; ``''`` where it can."""
        return ""

    def tasks_per_graph(self, batch: TaskBatch, device: torch.device) -> int:
        """How many of ``batch``'s tasks one gradient graph covers: what the strategy maps at
        once (one task for ``'loop'`` and ``'threads'``, ``chunk_size`` for ``'chunked'``, all
        for ``'vmap'``; ``'auto'`` by the device and the tasks' size). An algorithm whose
        meta-loss is not a mean of per-task terms (one that couples tasks) overrides this to
        return ``batch.num_tasks``."""
        return tasks_at_once(
            self.strategy,
            self.chunk_size,
            batch.num_tasks,
            device,
            convolutional=self.convolutional(batch),
        )

    def convolutional(self, batch: TaskBatch) -> bool:
        """Whether this algorithm's work on tasks like ``batch``'s convolves (what ``'auto'``
        decides by on the CPU, :func:`metafunc.default_strategy`): found once per algorithm,
        model and input shape by running :meth:`adapt_and_predict` without inner steps on one
        task, from :meth:`init`'s parameters; only asked for ``strategy='auto'`` on the CPU."""
        x = batch.support_x
        if self.strategy != "auto" or x.device.type != "cpu":
            return True
        one = TaskBatch(*(field[:1] for field in batch))
        return self._fact(
            "convolves",
            x,
            lambda: self.init(dtype=x.dtype, device=x.device),
            lambda mp: uses_convolutions(self.adapt_and_predict, mp, one, 0),
            failed=True,
        )

    def exact_under_vmap(self, batch: TaskBatch) -> bool:
        """Whether the model, mapped over ``batch``'s tasks by ``vmap``, computes what the
        per-task loop does (:func:`metafunc.strategies.exact_under_vmap`): what lets an
        algorithm batch work under ``vmap`` that its strategy would have run per task
        (``MAML.shared_first_step``). Found once per model and input shape, on two tasks'
        support inputs."""
        x = batch.support_x[:2]
        return self._fact(
            "exact",
            x,
            lambda: mt.map(lambda t: t.to(x.device), self.model.init(dtype=x.dtype)),
            lambda p: exact_under_vmap(self.model.apply, p, x),
            failed=False,
        )

    def _fact(
        self,
        what: str,
        x: torch.Tensor,
        make: Callable[[], Any],
        find: Callable[[Any], bool],
        *,
        failed: bool,
    ) -> bool:
        """``find(make())``, cached by algorithm class, model (its ``init`` and ``apply``) and
        input shape; ``failed`` where ``make`` cannot make the parameters."""
        model = self.model
        key = (what, type(self), model.init, model.apply, tuple(x.shape[2:]), x.dtype, x.device)
        found = _MODEL_FACTS.get(key)
        if found is None:
            if len(_MODEL_FACTS) > 256:
                _MODEL_FACTS.clear()
            try:
                made = make()
            except Exception:
                return failed
            found = _MODEL_FACTS[key] = find(made)
        return found

    def _by_pieces(
        self,
        fn: Callable[[TaskBatch], Result],
        meta_params: Any,
        batch: TaskBatch,
        *,
        concurrent: bool = True,
    ) -> Result:
        """:func:`mean_over_pieces` in pieces of :meth:`tasks_per_graph` tasks, as many at once
        as the strategy runs (:func:`metafunc.strategies.task_workers`) when ``concurrent``."""
        device = mt.device_of(meta_params)
        size = self.tasks_per_graph(batch, device)
        convolutional = self.convolutional(batch)
        workers = task_workers(self.strategy, device, convolutional=convolutional)
        workers = workers if concurrent else 1
        call = f"{type(self).__name__}.meta_grad(meta_params, batch)"
        return mean_over_pieces(fn, batch, size, workers, randomness=self.randomness, call=call)

    @_entry_point
    def evaluate(
        self, meta_params: Any, batch: TaskBatch, steps: int, *, training: bool = False
    ) -> dict[str, torch.Tensor]:
        """Per-task metrics after 0..``steps`` inner steps: ``{'loss': [tasks, steps + 1], ...}``
        (``'accuracy'`` too for classification), ``loss`` applied to :meth:`adapt_and_predict`'s
        predictions against ``batch.query_y``.

        Runs without building a graph for the outer loop (inner gradients still flow), with the
        model in inference mode (:meth:`metafunc.Model.inference`: dropout off; batch norm with
        each task's batch statistics, the transductive protocol of MAML and its successors).
        ``training=True`` evaluates with the model as it trains instead (dropout on).
        """
        alg = self if training else self.for_inference()
        with torch.no_grad():
            preds = alg.adapt_and_predict(meta_params, batch, steps)
        return evaluate_predictions(self.loss, preds, batch.query_y)

    def for_inference(self) -> Algorithm:
        """This algorithm with its model in inference mode (:meth:`metafunc.Model.inference`)."""
        return dataclasses.replace(self, model=self.model.inference())

    def outer_optimizer(self, lr: float, iterations: int) -> GradientTransformation:
        """The paper's outer optimizer: Adam at ``lr`` unless the algorithm says otherwise."""
        return adam(lr)

    def outer_schedule(self, lr: float, iterations: int) -> Schedule:
        """The outer learning rate at each iteration, as :meth:`outer_optimizer` applies it
        (constant unless the algorithm anneals it); the harness logs it."""
        return schedules.constant(lr)


A = TypeVar("A", bound=Algorithm)


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
    timer: Callable[[], float] = time.perf_counter,
) -> tuple[A, dict[str, float | str]]:
    """``algorithm`` with the task-parallel strategy that runs ``step`` fastest on this machine,
    and what each candidate measured; or, for a per-task function, its fastest
    :func:`metafunc.task_map`.

    ``strategy='auto'`` is a rule by device (:func:`metafunc.default_strategy`); which strategy
    wins depends on the machine, the model and the task size (HISTORY "The `-evening` run"),
    so this times them on your own work: every candidate runs ``step`` once to warm up (and
    compile, where ``step`` compiles), then ``repeats`` rounds time each candidate once, in
    turn, each round starting one
    candidate later (so a host whose speed drifts, or a candidate that leaves the allocator in
    a state the next one pays for, shifts them all alike), and the median of its rounds
    counts. A candidate that runs out of memory (``torch.OutOfMemoryError``, or the CPU
    allocator's error) in any round is recorded as ``'out of memory'`` and dropped. Strategies
    change how tasks are scheduled, not what is computed: every candidate gives the same
    meta-gradient up to rounding. ``metafunc train --strategy auto`` calls this on one
    meta-batch of the run's own configuration.

    Args:
        algorithm: an :class:`Algorithm` instance, or a per-task function
            ``fn(meta_params, task)`` as :func:`metafunc.task_map` takes it.
        meta_params, batch: the work to time, e.g. ``algorithm.init(...)`` and one meta-batch
            (a :class:`metafunc.TaskBatch`) already on the device.
        candidates: ``(strategy, chunk_size)`` pairs, the chunk size an int for ``'chunked'``
            and ``None`` otherwise; by default :func:`metafunc.strategies.strategy_candidates` for
            the device of ``meta_params``, ``torch.get_num_threads()`` and the number of tasks.
        repeats: timed rounds, after the warm-up.
        step: ``step(candidate, meta_params, batch)``, the work timed (its result is dropped);
            by default ``candidate.meta_grad(meta_params, batch)``, and for a function the
            gradient of the sum of ``candidate(meta_params, batch)`` with respect to
            ``meta_params`` (``candidate`` is then the function mapped by ``task_map``).
        timer: the clock, in seconds (as ``timeit.Timer``'s ``timer``).

    Returns:
        ``(dataclasses.replace(algorithm, strategy=..., chunk_size=...), timings)`` (for a
        function, ``(task_map(fn, strategy=..., chunk_size=...), timings)``) with
        ``timings`` ``{'loop': seconds per step, 'chunked:8': ..., 'vmap': 'out of memory'}``
        (labels by :func:`metafunc.strategies.strategy_label`).

    Raises:
        torch.OutOfMemoryError: no candidate fits in memory (its ``timings`` attribute holds
            what was recorded).
    """
    call = "tune_strategy(algorithm, meta_params, batch)"
    per_task = callable(algorithm) and not isinstance(algorithm, type | Algorithm)
    if not per_task and not isinstance(algorithm, Algorithm):
        what = (
            f"the class {algorithm.__qualname__}"
            if isinstance(algorithm, type)
            else (f"a {type(algorithm).__qualname__}")
        )
        raise TypeError(
            f"{call}: algorithm is {what}, not an Algorithm instance; pass an algorithm, e.g. "
            "MAML(model, ...), or a per-task function fn(meta_params, task)."
        )
    if isinstance(repeats, bool) or not isinstance(repeats, int) or repeats < 1:
        raise ValueError(f"{call}: repeats must be an int >= 1, got {repeats!r}.")
    device = mt.device_of(meta_params)
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
    if step is None and per_task:

        def step(candidate: Any, meta: Any, work: Any) -> Any:
            leaves = [x.detach().requires_grad_() for x in mt.leaves(meta)]
            out = candidate(mt.structure(meta).unflatten(leaves), work)
            total = sum(x.sum() for x in mt.leaves(out) if x.requires_grad)
            return torch.autograd.grad(total, leaves, allow_unused=True)

    elif step is None:

        def step(candidate: A, meta: Any, work: Any) -> Any:
            return candidate.meta_grad(meta, work)

    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    alive: dict[str, A] = {}
    for strategy, size in candidates:
        if per_task:
            candidate: Any = task_map(algorithm, strategy=strategy, chunk_size=size)  # type: ignore[arg-type]
        else:
            chunk = size if strategy == "chunked" else algorithm.chunk_size
            candidate = dataclasses.replace(
                algorithm, strategy=cast(Strategy, strategy), chunk_size=chunk
            )
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
                start = timer()
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
                seconds[label].append(timer() - start)
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
