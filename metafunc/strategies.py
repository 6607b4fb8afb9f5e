"""The one switch for running a per-task function over many tasks.

:func:`task_map` maps any per-task function over a leading task axis with one of four
strategies: ``'vmap'`` (``torch.func.vmap``), ``'chunked'`` (``vmap`` over chunks, bounding
memory), ``'loop'`` (a per-task loop, stacked) and ``'threads'`` (the per-task loop with tasks run
concurrently on CPU threads). All compute the same result; ``'auto'`` picks by device and work.
:func:`check_strategies` checks that a function gives the loop's gradients under the others.
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Callable, Sequence
from typing import Any, Literal, TypeVar, get_args

import optree
import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode

from metafunc import tree as mt
from metafunc._random import RANDOMNESS, Randomness, check_randomness, in_task_stream, task_seeds
from metafunc.data.batch import TaskBatch, check_batch, checked_scope
from metafunc.threads import run_tasks

__all__ = [
    "RANDOMNESS",
    "STRATEGIES",
    "Randomness",
    "Strategy",
    "check_strategies",
    "default_strategy",
    "exact_under_vmap",
    "resolved_strategy",
    "seeded",
    "strategy_candidates",
    "strategy_label",
    "task_map",
    "task_workers",
    "tasks_at_once",
    "uses_convolutions",
]

Strategy = Literal["auto", "vmap", "chunked", "loop", "threads"]
"""How :func:`task_map` runs a function over tasks (its docstring says what each does)."""
STRATEGIES: tuple[str, ...] = get_args(Strategy)
T = TypeVar("T")


def default_strategy(device: torch.device | str, *, convolutional: bool = True) -> str:
    """The task-parallel strategy ``'auto'`` resolves to on ``device`` for per-task work that
    does (or does not) run convolutions.

    On CUDA: ``'vmap'`` (one batched kernel per op across tasks). On the CPU: ``'vmap'`` for work
    without convolutions (an MLP's matrix products batch well, and a per-task loop of small
    tasks is all Python overhead); for convolutional work ``'loop'``, as ``vmap`` turns a
    per-task convolution into a slower grouped one. The loop holds one task's graph at a time,
    which is what learn2learn's and higher's users hold (a backward per task); ``'threads'``
    (``torch.get_num_threads()`` tasks at once, each on one intra-op thread) is faster on a few
    cores but holds that many graphs and more: a speed-for-memory trade made by asking for it,
    or by :func:`metafunc.algorithms.tune_strategy` (which ``metafunc train --strategy auto``
    calls), which times the candidates on your own work. :func:`task_map` and the algorithms
    find out whether the work convolves by running it (:func:`uses_convolutions`).
    Measurements: ``benchmarks/bench_task_map.py``, HISTORY "task_map auto" and "One task's
    graph at a time".
    """
    if torch.device(device).type == "cuda" or not convolutional:
        return "vmap"
    return "loop"


def resolved_strategy(
    strategy: str, device: torch.device | str, *, convolutional: bool = True
) -> str:
    """``strategy``, with ``'auto'`` replaced by :func:`default_strategy` (a name, unlike
    :func:`metafunc.harness.run.resolve_strategy`, which times candidates)."""
    if strategy != "auto":
        return strategy
    return default_strategy(device, convolutional=convolutional)


def strategy_candidates(
    device: torch.device | str, threads: int, tasks: int
) -> list[tuple[str, int | None]]:
    """What is worth timing for ``tasks`` tasks on ``device`` with ``threads`` intra-op threads,
    as ``(strategy, chunk_size)``: the loop and ``vmap`` everywhere; on a CPU with more than one
    thread, ``'threads'``; on CUDA, ``vmap`` over chunks of a half and a quarter of the tasks
    (less memory than all at once). :func:`metafunc.algorithms.tune_strategy` times these."""
    device = torch.device(device)
    candidates: list[tuple[str, int | None]] = [("loop", None), ("vmap", None)]
    if device.type == "cpu" and threads > 1:
        candidates.append(("threads", None))
    if device.type == "cuda":
        sizes = sorted({tasks // 2, tasks // 4} - {0, 1}, reverse=True)
        candidates += [("chunked", size) for size in sizes]
    return candidates


def strategy_label(strategy: str, chunk_size: int | None = None) -> str:
    """``'loop'``, ``'vmap'``..., or ``'chunked:8'``: how timings name a candidate."""
    return strategy if chunk_size is None else f"{strategy}:{chunk_size}"


def tasks_at_once(
    strategy: str,
    chunk_size: int | None,
    tasks: int,
    device: torch.device,
    *,
    convolutional: bool = True,
) -> int:
    """How many of ``tasks`` ``strategy`` maps at once on ``device``: one for ``'loop'`` and
    ``'threads'``, ``chunk_size`` for ``'chunked'``, all for ``'vmap'``; ``'auto'`` as
    :func:`default_strategy`. Algorithms differentiate their meta-loss in pieces of this size
    (under ``'threads'``, :func:`task_workers` pieces at a time)."""
    chosen = resolved_strategy(strategy, device, convolutional=convolutional)
    if chosen in ("loop", "threads"):
        return 1
    return min(tasks, chunk_size) if chosen == "chunked" and chunk_size else tasks


def task_workers(strategy: str, device: torch.device | str, *, convolutional: bool = True) -> int:
    """How many tasks ``strategy`` runs at once on ``device``: ``torch.get_num_threads()`` for
    ``'threads'``, each task on one intra-op thread; 1 for the other
    strategies and on a non-CPU device. :func:`run_tasks` still runs them in turn where the
    calling thread has state the workers would not share. While ``torch.compile`` traces the
    answer is 1: a compiled graph covers one task (or one chunk), and its pieces run in turn."""
    chosen = resolved_strategy(strategy, device, convolutional=convolutional)
    if chosen != "threads" or torch.device(device).type != "cpu":
        return 1
    if torch.compiler.is_compiling():
        return 1
    return max(1, torch.get_num_threads())


def _leaf_name(arg: Any, i: int, j: int) -> str:
    """How leaf ``j`` of argument ``i`` is written in Python: ``args[1].query_x``,
    ``args[0]['head.weight']``."""
    accessors = optree.tree_flatten_with_accessor(arg)[0]
    return accessors[j].codify(f"args[{i}]")


def _task_axis_size(
    call: str, args: Sequence[Any], in_dims: Sequence[int | None], *, check: bool = True
) -> int:
    """The tasks in the mapped arguments, after checking that every mapped leaf has a leading
    task axis of that one size (a :class:`TaskBatch` by :func:`check_batch`, by field name,
    unless ``check`` is off: an algorithm maps a batch it checked)."""
    size: int | None = None
    first = (0, 0)
    for i, (arg, dim) in enumerate(zip(args, in_dims, strict=True)):
        if dim is None:
            continue
        if check and isinstance(arg, TaskBatch):
            check_batch(arg, call=call, name=f"args[{i}]")
        leaves = optree.tree_leaves(arg)
        if not leaves:
            raise ValueError(
                f"{call}: argument {i} is mapped over (in_dims[{i}]=0) but has no tensors."
            )
        for j, leaf in enumerate(leaves):
            if not isinstance(leaf, torch.Tensor) or leaf.dim() == 0:
                where = _leaf_name(arg, i, j)
                raise ValueError(
                    f"{call}: {where} has no task axis (got {type(leaf).__qualname__}"
                    f"{' of shape ()' if isinstance(leaf, torch.Tensor) else ''}); every mapped "
                    "leaf needs a leading task axis."
                )
            n = int(leaf.shape[0])
            if size is None:
                size, first = n, (i, j)
            elif n != size:
                raise ValueError(
                    f"{call}: task axes differ: {_leaf_name(args[first[0]], *first)} has "
                    f"{size} tasks but {_leaf_name(arg, i, j)} has {n}. Every mapped leaf must "
                    "have the same leading size."
                )
    if size is None:
        raise ValueError(f"{call}: in_dims maps no argument; put 0 for the batched one.")
    if size == 0:
        raise ValueError(f"{call}: the task axis is empty (0 tasks).")
    return size


class _Unsuited(Exception):
    """Raised by :class:`_VmapGuard` to fall back from ``vmap`` to a per-task strategy."""


_INEXACT_UNDER_VMAP = {
    F.batch_norm, F.layer_norm, F.instance_norm, torch.batch_norm, torch.layer_norm,
    torch.instance_norm, torch.native_batch_norm, torch.native_layer_norm,
}  # fmt: skip
_CONVOLUTIONS = {
    F.conv1d, F.conv2d, F.conv3d, F.conv_transpose1d, F.conv_transpose2d, F.conv_transpose3d,
}  # fmt: skip


class _VmapGuard(TorchFunctionMode):
    """Stops a ``vmap`` that ``'auto'`` chose at the first call it does not suit: a function
    known to give wrong second-order gradients under ``vmap`` on this torch (functorch#534),
    or, with ``convolutions``, a convolution (slower as a grouped one than per task on the
    CPU). ``'auto'`` then runs the per-task strategy, exact and faster there."""

    def __init__(self, *, convolutions: bool) -> None:
        super().__init__()
        self.refused = _INEXACT_UNDER_VMAP | (_CONVOLUTIONS if convolutions else set())

    def __torch_function__(
        self, func: Any, types: Any, args: tuple[Any, ...] = (), kwargs: Any = None
    ) -> Any:
        if func in self.refused:
            raise _Unsuited(func.__name__)
        return func(*args, **(kwargs or {}))


class _Found(Exception):
    pass


class _SeeConvolutions(TorchFunctionMode):
    def __torch_function__(
        self, func: Any, types: Any, args: tuple[Any, ...] = (), kwargs: Any = None
    ) -> Any:
        if func in _CONVOLUTIONS:
            raise _Found
        return func(*args, **(kwargs or {}))


def uses_convolutions(fn: Callable[..., Any], *args: Any) -> bool:
    """Whether ``fn(*args)`` calls a convolution (run without gradients, stopped at the first
    one): what ``'auto'`` decides by on the CPU (:func:`default_strategy`). ``True`` when ``fn``
    fails on ``args``: the choice that was the rule for every work before."""
    try:
        with torch.no_grad(), _SeeConvolutions():
            fn(*args)
    except _Found:
        return True
    except Exception:
        return True
    return False


def exact_under_vmap(fn: Callable[..., Any], *args: Any) -> bool:
    """Whether ``torch.func.vmap(fn, in_dims=(None, 0, ...))(*args)`` (the first argument shared,
    the others mapped) runs without what makes ``vmap`` differ from the per-task loop here:
    ``F.batch_norm``, ``F.layer_norm`` or ``F.instance_norm`` (wrong second-order gradients on
    this torch, functorch#534) or a random draw (``vmap`` cannot draw from the loop's per-task
    streams). Run once without gradients on a few tasks; ``False`` when ``fn`` fails there."""
    in_dims = (None, *(0 for _ in args[1:]))
    try:
        with torch.no_grad(), _VmapGuard(convolutions=False):
            torch.func.vmap(fn, in_dims=in_dims, randomness="error")(*args)
    except Exception:
        return False
    return True


def seeded(calls: Sequence[Callable[[], T]], randomness: str, call: str) -> list[Callable[[], T]]:
    """``calls`` (one per task, in task order), each drawing its random numbers from a stream of
    its own (:mod:`metafunc._random`): what makes the per-task strategies repeatable, and
    ``'loop'`` and ``'threads'`` draw alike. ``call`` names the public call in errors."""
    seeds = task_seeds(randomness, len(calls))
    return [
        functools.partial(
            in_task_stream, c, None if seeds is None else seeds[i], randomness=randomness, call=call
        )
        for i, c in enumerate(calls)
    ]


def task_map(
    fn: Callable[..., Any],
    *,
    strategy: Strategy | str = "auto",
    chunk_size: int | None = None,
    in_dims: Sequence[int | None] = (None, 0),
    randomness: str = "different",
) -> Callable[..., Any]:
    """Map a per-task function over a leading task axis.

    ``in_dims`` says, per positional argument, ``0`` (sliced along the task axis) or ``None``
    (shared by all tasks); the default fits ``fn(meta_params, task)``. Outputs are stacked along
    a new leading axis. Strategies: ``'vmap'``, ``'chunked'`` (``vmap`` over ``chunk_size`` tasks
    at a time), ``'loop'`` (a per-task Python loop), ``'threads'`` (that loop, tasks run
    :func:`task_workers` at a time on CPU threads; in turn under a ``torch.func`` transform, so
    differentiate with ``Algorithm.meta_grad``, which maps its tasks outside one, to get them
    concurrently), ``'auto'`` (``vmap``, falling back to the per-task strategy of
    :func:`default_strategy` at the first call that ``vmap`` does not suit: a convolution on
    the CPU, or ``F.batch_norm`` / ``F.layer_norm``, whose second-order gradients are wrong
    under ``vmap`` on this torch). All give the same values and gradients.

    ``randomness`` (see :mod:`metafunc._random`): ``'different'`` (each task its own draws, e.g.
    dropout masks), ``'same'`` (every task the same draws) or ``'error'`` (a draw raises), with
    the same meaning under every strategy; per-task draws come from seeds drawn once per call, so
    a fixed ``torch.manual_seed`` repeats a run, and ``'loop'`` and ``'threads'`` draw alike.

    A mapped :class:`metafunc.TaskBatch` is checked first (:func:`metafunc.data.check_batch`):
    one task count in all fields, a task axis, matching shapes, errors by field name.
    """
    return mapper(
        fn,
        strategy=strategy,
        chunk_size=chunk_size,
        in_dims=in_dims,
        randomness=randomness,
        check_batches=True,
    )


def mapper(
    fn: Callable[..., Any],
    *,
    strategy: str,
    chunk_size: int | None,
    in_dims: Sequence[int | None],
    randomness: str,
    check_batches: bool,
) -> Callable[..., Any]:
    """:func:`task_map`, with the :class:`TaskBatch` check of mapped arguments optional: an
    algorithm maps batches its entry point has checked (``Algorithm.map_tasks``)."""
    call = f"task_map(fn, strategy={strategy!r})"
    if strategy not in STRATEGIES:
        raise ValueError(f"{call}: unknown strategy; choose one of {STRATEGIES}.")
    if strategy == "chunked" and (chunk_size is None or chunk_size < 1):
        raise ValueError(f"{call}: 'chunked' needs chunk_size >= 1, got {chunk_size!r}.")
    if chunk_size is not None and (isinstance(chunk_size, bool) or chunk_size < 1):
        raise ValueError(f"{call}: chunk_size must be >= 1 or None, got {chunk_size!r}.")
    check_randomness(call, randomness)
    in_dims = tuple(in_dims)
    if any(d not in (None, 0) for d in in_dims):
        raise ValueError(f"{call}: in_dims entries must be 0 or None, got {in_dims!r}.")

    def mapped(*args: Any) -> Any:
        if len(args) != len(in_dims):
            raise TypeError(
                f"{call}: got {len(args)} arguments but in_dims has {len(in_dims)} entries."
            )
        size = _task_axis_size(call, args, in_dims, check=check_batches)
        batches = any(
            isinstance(a, TaskBatch) for a, d in zip(args, in_dims, strict=True) if d == 0
        )
        with checked_scope() if check_batches and batches else contextlib.nullcontext():
            return run(size, args)

    def run(size: int, args: tuple[Any, ...]) -> Any:
        device = next(
            mt.leaves(a)[0] for a, d in zip(args, in_dims, strict=True) if d is not None
        ).device
        auto = strategy == "auto"
        chosen = "loop" if auto and size == 1 else resolved_strategy(strategy, device)
        if auto and size > 1:  # vmap unless fn turns out to use what vmap does not suit
            chosen = "vmap"
        if chosen in ("vmap", "chunked"):
            vm = torch.func.vmap(fn, in_dims=in_dims, randomness=randomness, chunk_size=chunk_size)
            seeds = task_seeds(randomness, 1)  # one stream: vmap draws for all tasks at once
            guard = auto and not torch.compiler.is_compiling()
            cpu = device.type == "cpu"
            try:
                with _VmapGuard(convolutions=cpu) if guard else contextlib.nullcontext():
                    return in_task_stream(
                        lambda: vm(*args),
                        None if seeds is None else seeds[0],
                        randomness=randomness,
                        call=call,
                    )
            except _Unsuited:
                chosen = resolved_strategy(strategy, device) if cpu else "loop"

        def one(i: int) -> Callable[[], Any]:
            task_args = [
                a if d is None else optree.tree_map(lambda t: t[i], a)
                for a, d in zip(args, in_dims, strict=True)
            ]
            return lambda: fn(*task_args)

        calls = seeded([one(i) for i in range(size)], randomness, call)
        outs = list(run_tasks(calls, task_workers(chosen, device)))
        return optree.tree_map(lambda *ts: torch.stack(ts), *outs)

    return mapped


def check_strategies(
    fn: Callable[..., torch.Tensor],
    *args: Any,
    strategies: Sequence[str] = ("vmap",),
    in_dims: Sequence[int | None] = (None, 0),
    chunk_size: int | None = None,
    randomness: str = "same",
    rtol: float = 1e-6,
) -> dict[str, float]:
    """Check that ``task_map(fn)`` gives the per-task loop's value and gradient under other
    strategies, before trusting a new layer under ``vmap``.

    ``fn(meta_params, task, ...) -> per-task scalar loss``; the gradient is taken with respect to
    ``args[0]`` of the mean over tasks, so a ``fn`` that adapts inside checks second-order
    gradients. Run it in float64 for a sharp test. Every strategy runs from the same random
    state, so with ``randomness='same'`` (the default) a ``fn`` with dropout draws the same
    masks under each and can be compared; ``'error'`` checks that ``fn`` draws nothing.

    Returns:
        ``{strategy: relative error}`` of the gradient against the loop (global L2 norms).

    Raises:
        ValueError: a strategy differs from the loop by more than ``rtol``; or
            ``randomness='different'``, under which strategies draw differently by design.
    """
    call = "check_strategies(fn, *args)"
    check_randomness(call, randomness)
    if randomness == "different":
        raise ValueError(
            f"{call}: randomness='different' draws differently under vmap and the loop, so the "
            "two cannot be compared; check with randomness='same' (every task draws alike)."
        )
    start = int(torch.randint(0, 2**62, (1,)))

    def grad_of(strategy: str) -> tuple[torch.Tensor, Any]:
        mapped = task_map(
            fn, strategy=strategy, in_dims=in_dims, chunk_size=chunk_size, randomness=randomness
        )

        def total(p: Any) -> tuple[torch.Tensor, torch.Tensor]:
            value = mapped(p, *args[1:]).mean()
            return value, value.detach()

        return in_task_stream(  # the same random state for every strategy
            lambda: torch.func.grad(total, has_aux=True)(args[0])[::-1],
            start,
            randomness=randomness,
            call=call,
        )

    ref_value, ref_grads = grad_of("loop")
    scale = float(mt.global_norm(ref_grads)) or 1.0
    errors: dict[str, float] = {}
    for strategy in strategies:
        value, grads = grad_of(strategy)
        err = float(mt.global_norm(mt.sub(grads, ref_grads))) / scale
        errors[strategy] = err
        value_err = abs(float(value - ref_value)) / (abs(float(ref_value)) or 1.0)
        if err > rtol or value_err > rtol:
            worst = max(
                mt.flatten_with_paths(mt.sub(grads, ref_grads)).items(),
                key=lambda kv: float(kv[1].abs().max()),
            )[0]
            raise ValueError(
                f"{call}: strategy {strategy!r} differs from the per-task loop: gradient "
                f"relative error {err:.3g}, value relative error {value_err:.3g} (rtol {rtol:g}); "
                f"largest difference at {worst!r}. A layer in fn is wrong under vmap: write it "
                "from primitive ops, or use strategy='loop'."
            )
    return errors
