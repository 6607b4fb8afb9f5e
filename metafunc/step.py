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

With ``cache=PATH`` a whole step is compiled ahead of time (dynamo's precompile) and saved: a
later process loads the program instead of tracing the step again, which even inductor's cache
does not spare (``metafunc train`` keys the file by its config).
"""

from __future__ import annotations

import os
import re
import time
import types
import warnings
from collections.abc import Callable
from pathlib import Path
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
        cache: the file of the step compiled ahead of time, or ``None``.
        precompiled: ``'loaded'`` (from :attr:`cache`), ``'saved'`` (compiled and written
            there), or why there is none (the step is not whole, the file was stale...);
            ``None`` before the first call.
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
        cache: str | os.PathLike[str] | None = None,
    ) -> None:
        self.algorithm, self.optimizer = algorithm, optimizer
        self.sampler, self.meta_batch = sampler, meta_batch
        self.mode, self.backend = mode, backend
        self.cache = None if cache is None else Path(cache)
        self.whole: bool | None = None
        self.compile_seconds: list[float] = []
        self.precompiled: str | None = None
        self._signatures: set[Any] = set()
        self._aot: tuple[Any, Callable[..., Any]] | None = None  # (signature, function)
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
            if not self.whole and self.cache is not None:
                self.precompiled = "not whole: compiled per piece of tasks"
        signature = self._note_signature(call, state, batch)
        start = time.perf_counter()
        try:
            if self.whole:
                out = self._call_whole(signature, state, batch, iteration)
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

    def _note_signature(self, call: str, state: StepState, batch: TaskBatch | None) -> Any:
        """A new shape, dtype or device compiles again: once, said with a warning."""
        fields = () if batch is None else tuple((f.shape, f.dtype, f.device) for f in batch)
        first = mt.leaves(state.meta)[0]  # the meta-parameters keep their shapes between steps
        signature = (fields, first.dtype, first.device)
        if signature in self._signatures:
            return signature
        if self._signatures:
            warnings.warn(
                f"{call}: called with other shapes, dtypes or devices than before "
                f"(batch {[tuple(f[0]) for f in fields]}); compiling the step again for them.",
                stacklevel=3,
            )
        self._signatures.add(signature)
        return signature

    def _call_whole(
        self, signature: Any, state: StepState, batch: TaskBatch | None, iteration: int
    ) -> tuple[StepState, dict[str, torch.Tensor]]:
        """The whole step: the precompiled one where there is one for these inputs, else
        ``torch.compile``'s."""
        if self.cache is not None and self.precompiled is None:
            out = self._precompile(signature, state, batch, iteration)
            if out is not None:
                return out
        if self._aot is not None and self._aot[0] == signature:
            try:
                return self._aot[1](state, batch, iteration)
            except RuntimeError as error:  # its guards: an iteration past a branch it took
                if "GuardManager check failed" not in str(error):
                    raise
                self._aot, self.precompiled = None, f"its guards failed at iteration {iteration}"
                warnings.warn(
                    f"compile_step: the step precompiled in {self.cache} does not cover "
                    f"iteration {iteration} (a guard failed: {_guard(error)}); compiling it "
                    "again.",
                    stacklevel=3,
                )
        return self._whole()(state, _static(batch), iteration)

    def _precompile(
        self, signature: Any, state: StepState, batch: TaskBatch | None, iteration: int
    ) -> tuple[StepState, dict[str, torch.Tensor]] | None:
        """Load the step from :attr:`cache` (checked against the eager step on these inputs,
        its outputs returned), or compile it ahead of time and save it there (``None``
        returned: the caller runs it). CUDA graphs (``'reduce-overhead'``) are not saved."""
        assert self.cache is not None
        import torch._dynamo

        if self.mode == "reduce-overhead":
            self.precompiled = "not for CUDA graphs (mode='reduce-overhead')"
            return None
        with torch._dynamo.config.patch(enable_aot_compile=True):
            if self.cache.is_file():
                try:
                    with open(self.cache, "rb") as file:
                        loaded = torch.compiler.load_compiled_function(file, f_globals=globals())
                    out = loaded(state, batch, iteration)
                    why = _disagree(out, self.eager(state, batch, iteration=iteration))
                except Exception as error:  # a file of another build of torch, or corrupt
                    why = f"it does not load ({type(error).__name__}: {error})"
                if not why:
                    self._aot, self.precompiled = (signature, loaded), "loaded"
                    return out
                warnings.warn(
                    f"compile_step: the step precompiled in {self.cache} is stale ({why}); "
                    "compiling it again.",
                    stacklevel=4,
                )

            options: dict[str, Any] = {"guard_filter_fn": _portable_guards}
            if self.backend == "inductor":
                options.update(torch._inductor.list_mode_options(self.mode))
            fn = torch.compile(self._program(), fullgraph=True, backend=self.backend,
                               options=options)  # fmt: skip
            # the iteration a symbol, so one program serves every iteration (its guards keep
            # any branch on it, as MAML++'s annealing takes)
            try:
                with torch.compiler.config.patch(  # type: ignore[attr-defined]
                    dynamic_sources="L['iteration']"
                ):
                    compiled = fn.aot_compile(((state, batch, iteration), {}))  # type: ignore[attr-defined]
            except (torch._dynamo.exc.Unsupported, torch._dynamo.exc.UserError):
                raise  # a graph break: the caller names it
            except Exception as error:  # dynamo's ahead-of-time path is experimental
                self.precompiled = f"not precompiled ({type(error).__name__}: {error})"
                warnings.warn(f"compile_step: the step was {self.precompiled}; compiling it "
                              "without saving.", stacklevel=4)  # fmt: skip
                return None
        try:
            self.cache.parent.mkdir(parents=True, exist_ok=True)
            compiled.save_compiled_function(str(self.cache))  # written atomically
            self.precompiled = "saved"
        except Exception as error:  # e.g. a backend whose artifacts do not serialise
            self.precompiled = f"not saved ({type(error).__name__}: {error})"
            warnings.warn(f"compile_step: the step was not saved to {self.cache} "
                          f"({self.precompiled}).", stacklevel=4)  # fmt: skip
        self._aot = (signature, compiled)
        return None

    def _program(self) -> Callable[..., Any]:
        """What the whole step compiles: :meth:`eager` as a function of the inputs alone, with
        a code object of its own."""

        def step(state: StepState, batch: TaskBatch | None, iteration: int) -> Any:
            return self.eager(state, batch, iteration=iteration)

        return _own_code(step)

    def _whole(self) -> Callable[..., Any]:
        if self._compiled is None:
            self._compiled = torch.compile(
                self._program(), fullgraph=True, backend=self.backend,
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


def _guard(error: Exception) -> str:
    """The guard a precompiled step's call failed, from dynamo's message."""
    text = str(error)
    found = re.search(r"""verbose_code_parts=\[(?:"([^"]*)"|'([^']*)')""", text)
    if found is None:
        return text.splitlines()[0] if text else type(error).__name__
    return (found.group(1) or found.group(2)).split("#")[0].strip()


def _own_code(fn: Callable[..., Any]) -> Callable[..., Any]:
    """``fn`` with a code object of its own: dynamo keeps compiled graphs, and counts recompiles
    against its limit, per code object, so two steps must not share one."""
    _COUNT[0] += 1
    if isinstance(fn, types.MethodType):
        return types.MethodType(_own_code(fn.__func__), fn.__self__)
    code = fn.__code__.replace(co_name=f"{fn.__code__.co_name}_{_COUNT[0]}")
    return types.FunctionType(code, fn.__globals__, code.co_name, fn.__defaults__, fn.__closure__)


_COUNT = [0]


def _portable_guards(entries: Any) -> list[bool]:
    """The guards a saved step keeps: on its tensor inputs, dynamo's global state (grad mode,
    threads...) and symbolic shapes (the iteration's branches); the rest, the algorithm's and
    optimizer's settings, the cache file's name stands for."""
    return torch.compiler.keep_portable_guards_unsafe(entries)


def _disagree(out: Any, ref: Any, rtol: float = 1e-4, atol: float = 1e-6) -> str:
    """Why the outputs of a loaded step are not those of the eager step (``''`` if they are):
    a stale file, compiled for other settings, computes something else."""
    got, want = mt.leaves(out), mt.leaves(ref)
    if len(got) != len(want):
        return f"{len(got)} outputs against the eager step's {len(want)}"
    for a, b in zip(got, want, strict=True):
        if a.shape != b.shape or a.dtype != b.dtype:
            return f"an output of shape {tuple(a.shape)} against the eager step's {tuple(b.shape)}"
        if not torch.allclose(a.double(), b.double(), rtol=rtol, atol=atol, equal_nan=True):
            return "its outputs differ from the eager step's on the first call"
    return ""


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
    cache: str | os.PathLike[str] | None = None,
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
        cache: a file for the step compiled ahead of time, when it is compiled whole: loaded if
            it exists (its first call checked against the eager step; a stale or unreadable
            file is compiled again, with a warning), else written after the first compile. A
            process that loads it skips dynamo's tracing and inductor's code generation. Its
            guards cover the inputs' shapes and dtypes, the iteration's branches and the grad
            and thread state, not the algorithm's or optimizer's settings: name the file after
            everything the step depends on (``metafunc train`` hashes its config, torch's
            version and metafunc's source). The file is a pickle, like inductor's cache: load
            only your own. Where dynamo cannot compile the step ahead of time, or with
            ``mode='reduce-overhead'`` (CUDA graphs), the step compiles as without ``cache``.

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
    if cache is not None and not isinstance(cache, (str, os.PathLike)):
        raise TypeError(
            f"{call}: cache is a {type(cache).__qualname__}; pass a file path (str or "
            "pathlib.Path) for the precompiled step, or None."
        )
    if mode is not None and algorithm.not_compilable():
        raise ValueError(
            f"{call}: {type(algorithm).__name__} cannot be compiled whole yet "
            f"({algorithm.not_compilable()}); pass mode=None for the eager step."
        )
    return Step(
        algorithm, optimizer, sampler=sampler, meta_batch=meta_batch, mode=mode,
        backend=backend, cache=cache,
    )  # fmt: skip
