"""One meta-training step as one program: the tasks (optionally), the meta-gradient, the outer
update and the metrics, compiled by ``torch.compile`` into one graph with no graph break and no
host synchronisation inside, as ``jax.jit`` compiles a JAX step.

The step is a pure function of a :class:`StepState` (the meta-parameters, the outer optimizer's
state and the in-step sampler's key, one tree, so a checkpoint saves one object)::

    step = metafunc.compile_step(MAML(mlp(), inner_lr=0.01, loss="mse"), optim.adam(1e-3),
                                 sampler=SinusoidTasks(shots=10), meta_batch=25)
    state = step.init(meta, key=metafunc.data.keys.key(0))
    for it in range(70_000):
        state, metrics = step(state, iteration=it)   # tasks drawn inside, from state.key

Without a sampler, pass each batch: ``state, metrics = step(state, batch, iteration=it)``.
"""

from __future__ import annotations

import time
import types
import warnings
from collections.abc import Callable
from typing import Any, NamedTuple

import torch

from metafunc import tree as mt
from metafunc.algorithms.base import COMPILE_MODES, Algorithm
from metafunc.data import keys
from metafunc.data.batch import TaskBatch
from metafunc.optim import GradientTransformation, apply_updates

__all__ = ["CompileError", "Step", "StepState", "compile_step"]


class StepState(NamedTuple):
    """Everything a step changes: ``meta`` (meta-parameters), ``opt_state`` (the outer
    optimizer's) and ``key`` (a 0-d int64 tensor the in-step sampler draws from and advances;
    carried unchanged when batches are passed in)."""

    meta: Any
    opt_state: Any
    key: torch.Tensor


class CompileError(RuntimeError):
    """The step could not be compiled as one graph (a graph break, a data-dependent branch)."""


def _finite(loss: torch.Tensor, grads: Any) -> torch.Tensor:
    """Whether the loss and every gradient entry are finite, as a tensor (no host sync)."""
    flags = [torch.isfinite(loss).all()] + [torch.isfinite(g).all() for g in mt.leaves(grads)]
    return torch.stack(flags).all()


class Step:
    """A training step built by :func:`compile_step`; call it as ``step(state, batch=None, *,
    iteration=0) -> (state, metrics)``. ``metrics`` holds 0-d tensors: the algorithm's
    (``'loss'``, ``'accuracy'``...) and ``'finite'`` (whether the loss and the gradient were
    finite; the update is applied either way, so check it before trusting the new state).

    Attributes:
        mode: the ``torch.compile`` mode, or ``None`` for the eager step.
        whole: whether one graph covers the whole step (``strategy`` maps all tasks at once, as
            ``'vmap'`` does); otherwise the meta-gradient is compiled per piece of tasks
            (:meth:`Algorithm.compiled_meta_grad`) and the update as a graph of its own.
        compile_seconds: wall time of each compilation so far (the first call compiles).
    """

    def __init__(
        self,
        algorithm: Algorithm,
        optimizer: GradientTransformation,
        *,
        sampler: Any = None,
        meta_batch: int | None = None,
        mode: str | None = "default",
        backend: str = "inductor",
    ) -> None:
        self.algorithm, self.optimizer = algorithm, optimizer
        self.sampler, self.meta_batch = sampler, meta_batch
        self.mode, self.backend = mode, backend
        self.whole: bool | None = None
        self.compile_seconds: list[float] = []
        self._signatures: set[Any] = set()
        self._compiled: Callable[..., Any] | None = None
        self._update: Callable[..., Any] | None = None
        self._pieces: Callable[..., Any] | None = None

    # -- the step, eagerly ----------------------------------------------------------------

    def draw(self, key: torch.Tensor) -> tuple[torch.Tensor, TaskBatch]:
        """``(next key, batch)``: the in-step sampler's meta-batch from ``key``."""
        key, sub = keys.split(key, 2)
        return key, self.sampler.sample_keyed(self.meta_batch, sub)

    def update(
        self, state: StepState, grads: Any, loss: torch.Tensor, metrics: dict[str, torch.Tensor]
    ) -> tuple[Any, Any, dict[str, torch.Tensor]]:
        """``(meta, opt_state, metrics)`` after the outer update with ``grads``."""
        updates, opt_state = self.optimizer.update(grads, state.opt_state, state.meta)
        meta = apply_updates(state.meta, updates)
        return meta, opt_state, {**metrics, "loss": loss, "finite": _finite(loss, grads)}

    def eager(
        self, state: StepState, batch: TaskBatch | None = None, *, iteration: int = 0
    ) -> tuple[StepState, dict[str, torch.Tensor]]:
        """The step, uncompiled: what the compiled step computes."""
        key = state.key
        if batch is None:
            key, batch = self.draw(key)
        grads, loss, metrics = self.algorithm.meta_grad(state.meta, batch, iteration=iteration)
        meta, opt_state, metrics = self.update(state, grads, loss, metrics)
        return StepState(meta, opt_state, key), metrics

    # -- the compiled step -----------------------------------------------------------------

    def init(self, meta: Any, key: torch.Tensor | None = None) -> StepState:
        """The state at iteration 0: ``meta``, a fresh optimizer state, and ``key`` (default
        ``keys.key(0)``; needed with a sampler) on the meta-parameters' device."""
        mt.validate(meta, call="Step.init(meta)", name="meta")
        device = mt.device_of(meta)
        key = keys.key(0, device) if key is None else key.to(device)
        return StepState(meta, self.optimizer.init(meta), key)

    def __call__(
        self, state: StepState, batch: TaskBatch | None = None, *, iteration: int = 0
    ) -> tuple[StepState, dict[str, torch.Tensor]]:
        call = f"compile_step({type(self.algorithm).__name__}, ...)(state, batch)"
        if batch is None and self.sampler is None:
            raise ValueError(
                f"{call}: no batch and no sampler; pass a batch, or build the step with "
                "sampler=... and meta_batch=... to draw tasks inside it."
            )
        if self.mode is None:
            return self.eager(state, batch, iteration=iteration)
        if batch is not None:
            self.algorithm.check_inputs(call, state.meta, batch)
        if self.whole is None:
            probe = batch if batch is not None else self.draw(state.key)[1]
            device = mt.device_of(state.meta)
            self.whole = self.algorithm.tasks_per_graph(probe, device) >= probe.num_tasks
        self._note_signature(call, state, batch)
        start = time.perf_counter()
        try:
            if self.whole:
                out = self._whole()(state, _static(batch), iteration)
            else:
                out = self._by_pieces(state, batch, iteration)
        except (torch._dynamo.exc.Unsupported, torch._dynamo.exc.UserError) as error:
            # a graph break, or a branch on a tensor's value, under fullgraph
            raise CompileError(
                f"{call}: {type(self.algorithm).__name__}'s step does not compile as one graph "
                f"({_reason(error)}). Run it eagerly: compile_step(..., mode=None) (metafunc "
                "train --compile off)."
            ) from error
        if len(self.compile_seconds) < len(self._signatures):
            self.compile_seconds.append(time.perf_counter() - start)
        return out

    def _note_signature(self, call: str, state: StepState, batch: TaskBatch | None) -> None:
        """A new shape, dtype or device compiles again: once, said with a warning."""
        fields = () if batch is None else tuple((f.shape, f.dtype, f.device) for f in batch)
        first = mt.leaves(state.meta)[0]  # the meta-parameters keep their shapes between steps
        signature = (fields, first.dtype, first.device)
        if signature in self._signatures:
            return
        if self._signatures:
            warnings.warn(
                f"{call}: called with other shapes, dtypes or devices than before "
                f"(batch {[tuple(f[0]) for f in fields]}); compiling the step again for them.",
                stacklevel=3,
            )
        self._signatures.add(signature)

    def _whole(self) -> Callable[..., Any]:
        if self._compiled is None:

            def step(state: StepState, batch: TaskBatch | None, iteration: int) -> Any:
                return self.eager(state, batch, iteration=iteration)

            self._compiled = torch.compile(
                _own_code(step), fullgraph=True, backend=self.backend,
                mode=self.mode if self.backend == "inductor" else None,
            )  # fmt: skip
        return self._compiled

    def _by_pieces(
        self, state: StepState, batch: TaskBatch | None, iteration: int
    ) -> tuple[StepState, dict[str, torch.Tensor]]:
        """The meta-gradient compiled per piece of tasks (the strategy's), the update as its own
        graph: a per-task strategy's graph covers one task, so compile time does not grow with
        the meta-batch."""
        if self._pieces is None:
            self._pieces = self.algorithm.compiled_meta_grad(
                self.mode or "default", backend=self.backend
            )
            self._update = torch.compile(
                _own_code(self.update), fullgraph=True, backend=self.backend,
                mode=self.mode if self.backend == "inductor" else None,
            )  # fmt: skip
        assert self._update is not None
        key = state.key
        if batch is None:
            key, batch = self.draw(key)
        grads, loss, metrics = self._pieces(state.meta, batch, iteration=iteration)
        meta, opt_state, metrics = self._update(state, grads, loss, metrics)
        return StepState(meta, opt_state, key), metrics


def _reason(error: Exception) -> str:
    """The line of a dynamo error that says what broke the graph, and where."""
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    caused = [line for line in lines if line.startswith("Caused by:")]
    return (caused or lines or [type(error).__name__])[0]


def _own_code(fn: Callable[..., Any]) -> Callable[..., Any]:
    """``fn`` with a code object of its own: dynamo keeps compiled graphs, and counts recompiles
    against its limit, per code object, so two steps must not share one."""
    _COUNT[0] += 1
    if isinstance(fn, types.MethodType):
        return types.MethodType(_own_code(fn.__func__), fn.__self__)
    code = fn.__code__.replace(co_name=f"{fn.__code__.co_name}_{_COUNT[0]}")
    return types.FunctionType(code, fn.__globals__, code.co_name, fn.__defaults__, fn.__closure__)


_COUNT = [0]


def _static(batch: TaskBatch | None) -> TaskBatch | None:
    """Every dim of ``batch`` static: a new meta-batch size compiles a graph of its own rather
    than a dynamic one (which runs slower)."""
    if batch is not None:
        for field in batch:
            for d in range(field.dim()):
                torch._dynamo.mark_static(field, d)
    return batch


def compile_step(
    algorithm: Algorithm,
    optimizer: GradientTransformation,
    *,
    sampler: Any = None,
    meta_batch: int | None = None,
    mode: str | None = "default",
    backend: str = "inductor",
) -> Step:
    """A meta-training step of ``algorithm`` with the outer ``optimizer``, compiled whole.

    ``step(state, batch=None, *, iteration=0) -> (state, metrics)`` computes the meta-gradient,
    the outer update and the metrics (and, with ``sampler``, draws the meta-batch from
    ``state.key`` first) in one ``torch.compile(fullgraph=True)`` graph: one call of generated
    code per step instead of hundreds of small ops issued from Python. The result equals the
    eager step (:meth:`Step.eager`; tested in float64). Works for any :class:`Algorithm`,
    including users' own subclasses, whose ``meta_loss`` has no graph break.

    Where the algorithm's strategy maps one task (or a chunk) at a time (the CPU's ``'auto'``
    on convolutional work), the meta-gradient is compiled per piece and the update separately
    (:attr:`Step.whole` is then false). The first call compiles (seconds; inductor's cache,
    which ``metafunc train`` keeps under the user cache directory, makes later runs quicker); a
    call with other shapes compiles again, once, with a warning.

    Args:
        algorithm: what computes the meta-gradient.
        optimizer: the outer optimizer, e.g. ``algorithm.outer_optimizer(lr, iterations)``.
        sampler: a sampler with ``sample_keyed(num_tasks, key)`` (``SinusoidTasks``,
            ``EpisodeSampler``) to draw tasks inside the step, from :attr:`StepState.key`.
        meta_batch: tasks per step, with ``sampler``.
        mode: ``torch.compile``'s mode (``'default'``, ``'reduce-overhead'``: CUDA graphs on
            CUDA, ``'max-autotune'``), or ``None`` for the eager step.
        backend: ``torch.compile``'s backend (``'aot_eager'`` traces without code generation).

    Raises:
        CompileError: at the first call, when the step breaks the graph (named, with the fix).
    """
    call = f"compile_step({type(algorithm).__name__}, optimizer)"
    if not isinstance(algorithm, Algorithm):
        raise TypeError(f"{call}: algorithm is a {type(algorithm).__qualname__}, not an Algorithm.")
    if not isinstance(optimizer, GradientTransformation):
        raise TypeError(
            f"{call}: optimizer is a {type(optimizer).__qualname__}; pass a "
            "GradientTransformation, e.g. algorithm.outer_optimizer(1e-3, iterations)."
        )
    if mode is not None and mode not in COMPILE_MODES:
        raise ValueError(f"{call}: mode={mode!r} is not one of {COMPILE_MODES} or None.")
    if sampler is not None:
        if not callable(getattr(sampler, "sample_keyed", None)):
            raise TypeError(
                f"{call}: sampler is a {type(sampler).__qualname__} without "
                "sample_keyed(num_tasks, key); use SinusoidTasks or EpisodeSampler, or pass "
                "batches to the step."
            )
        if isinstance(meta_batch, bool) or not isinstance(meta_batch, int) or meta_batch < 1:
            raise ValueError(f"{call}: with a sampler, meta_batch must be an int >= 1.")
    if mode is not None and algorithm.not_compilable():
        raise ValueError(
            f"{call}: {type(algorithm).__name__} cannot be compiled whole yet "
            f"({algorithm.not_compilable()}); pass mode=None for the eager step."
        )
    return Step(
        algorithm, optimizer, sampler=sampler, meta_batch=meta_batch, mode=mode, backend=backend
    )
