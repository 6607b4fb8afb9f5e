"""The inner loop, once, and the one switch for running it over many tasks.

``adapt`` builds a pure function ``(params, batch) -> (adapted_params, metrics)`` that takes
``steps`` differentiable optimizer steps on ``loss_fn`` with ``torch.func.grad``. Differentiating
its output with respect to ``params`` (by ``torch.autograd`` or ``torch.func.grad``) gives the
second-order meta-gradient; ``first_order=True`` detaches the inner gradients.

``task_map`` runs any per-task function over a leading task axis with one of four strategies:
``'vmap'`` (``torch.func.vmap``), ``'chunked'`` (``vmap`` over chunks, bounding memory),
``'loop'`` (a per-task loop, stacked) and ``'threads'`` (the per-task loop with tasks run
concurrently on CPU threads). All compute the same result; ``'auto'`` picks by device.
"""

from __future__ import annotations

import contextlib
import os
import threading
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Literal, TypeVar

import optree
import torch

from metafunc import tree as mt
from metafunc._transforms import any_transform
from metafunc.optim.base import GradientTransformation, apply_updates

__all__ = [
    "STRATEGIES",
    "adapt",
    "check_strategies",
    "default_strategy",
    "grad_with_aux",
    "run_tasks",
    "strategy_candidates",
    "strategy_label",
    "task_map",
    "task_workers",
    "tasks_at_once",
]

Strategy = Literal["auto", "vmap", "chunked", "loop", "threads"]
STRATEGIES: tuple[str, ...] = ("auto", "vmap", "chunked", "loop", "threads")


def _scalar(call: str, loss: Any) -> torch.Tensor:
    if not isinstance(loss, torch.Tensor):
        raise TypeError(
            f"{call}: loss_fn returned a {type(loss).__qualname__}; it must return a scalar tensor."
        )
    if loss.dim() != 0:
        raise ValueError(
            f"{call}: loss_fn returned a tensor of shape {tuple(loss.shape)}; it must return a "
            "scalar (one task's loss). Reduce it, e.g. with .mean()."
        )
    return loss


def grad_with_aux(
    fn: Callable[..., tuple[torch.Tensor, Any]], tree: Any, *args: Any, differentiable: bool = True
) -> tuple[Any, Any]:
    """``torch.func.grad(fn, has_aux=True)(tree, *args)`` for ``fn(tree, *args) -> (scalar,
    aux)``: the gradient with respect to ``tree`` and ``aux``.

    Inside a ``torch.func`` transform (and while ``torch.compile`` traces) by ``torch.func.grad``;
    otherwise by ``torch.autograd.grad`` on the leaves themselves where grad mode is on and they
    require grad (so the gradient is differentiable with respect to whatever they came from, as
    ``torch.func.grad``'s is) and on detached copies of the others. The same gradient, bit for
    bit, with one autograd level fewer and less Python work: with it as the inner step, a 5-way
    conv4 MAML meta-batch held the GIL about a third less time (py-spy) and ran 9-13% faster on
    two threads. ``differentiable=False`` builds no graph of the gradient (for first-order
    methods, which detach it anyway); leaves ``fn`` does not use get zeros.
    """
    if any_transform():
        return torch.func.grad(fn, has_aux=True)(tree, *args)
    leaves, spec = optree.tree_flatten(tree)
    outer = torch.is_grad_enabled()
    inputs = [x if outer and x.requires_grad else x.detach().requires_grad_() for x in leaves]
    connected = differentiable and any(x is y for x, y in zip(inputs, leaves, strict=True))
    with torch.enable_grad():
        loss, aux = fn(spec.unflatten(inputs), *args)
        found = torch.autograd.grad(loss, inputs, create_graph=connected, allow_unused=True)
    # contiguous: a convolution on channels-last input returns its weight's gradient
    # channels-last-strided (metafunc.models.base.conv2d on the CPU)
    grads = [
        torch.zeros_like(x) if g is None else g.contiguous()
        for x, g in zip(leaves, found, strict=True)
    ]
    return spec.unflatten(grads), aux


def adapt(
    loss_fn: Callable[..., Any],
    optimizer: GradientTransformation,
    steps: int,
    *,
    first_order: bool = False,
    trainable: mt.PathFilter | None = None,
    stateful: bool = False,
    observe: Callable[..., torch.Tensor] | None = None,
) -> Callable[..., Any]:
    """Build the inner loop of one task.

    Args:
        loss_fn: ``loss_fn(params, batch) -> scalar``; with ``stateful=True``,
            ``loss_fn(params, batch, state, step) -> (scalar, new_state)``, where ``state`` is
            e.g. batch-norm running statistics and ``step`` the inner step (an ``int``).
        optimizer: a differentiable optimizer, e.g. ``metafunc.optim.sgd(0.4)``; its state is
            created fresh from the adapted leaves on every call.
        steps: number of inner steps (``0`` returns ``params`` unchanged).
        first_order: detach the inner gradients (first-order MAML); gradients still flow along
            the direct path from ``params`` and through tensor hyper-parameters of ``optimizer``.
        trainable: which leaves adapt (``tree.partition`` filter, e.g. ``'head'`` for ANIL); the
            others are held fixed in the inner loop but still receive meta-gradients.
        stateful: thread a state through ``loss_fn`` (see above).
        observe: ``observe(params, batch) -> tensor`` (stateful: ``observe(params, batch, state,
            step)``), evaluated at the initial and at every adapted point and returned stacked
            as ``metrics['observed']`` (``steps + 1`` entries), differentiable. Use it for
            MAML++'s multi-step loss or to evaluate after 0..k steps in one pass.

    Returns:
        ``run(params, batch) -> (adapted_params, metrics)``, or with ``stateful=True``
        ``run(params, batch, state) -> (adapted_params, new_state, metrics)``. ``metrics['loss']``
        holds the detached support loss before each step (``steps`` entries).

        ``run(params, batch, first=(grads, loss))`` takes the first step with ``grads`` (the
        gradient of ``loss_fn`` at ``params``, for the adapted leaves) and ``loss`` (its value)
        computed elsewhere, e.g. for many tasks at once: every task starts from the same
        ``params``, so :class:`metafunc.algorithms.MAML` computes all their first gradients in
        one ``vmap`` on the per-task strategies. Gradients flow into ``grads`` as into any input.
        Not with ``stateful=True`` (the first step's new state would be lost) or ``steps=0``.

    Example (MAML's inner loop)::

        def loss_fn(params, task):
            return F.cross_entropy(model.apply(params, task.support_x), task.support_y)

        inner = adapt(loss_fn, metafunc.optim.sgd(0.4), steps=1)
        adapted, metrics = inner(params, task)
    """
    call = "adapt(loss_fn, optimizer, steps)"
    if not callable(loss_fn):
        raise TypeError(f"{call}: loss_fn is a {type(loss_fn).__qualname__}, not a callable.")
    if not isinstance(optimizer, GradientTransformation):
        raise TypeError(
            f"{call}: optimizer is a {type(optimizer).__qualname__}; pass a "
            "GradientTransformation such as metafunc.optim.sgd(0.01)."
        )
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 0:
        raise ValueError(f"{call}: steps must be an int >= 0, got {steps!r}.")
    if observe is not None and not callable(observe):
        raise TypeError(f"{call}: observe must be callable or None.")

    def run(params: Any, batch: Any, state: Any = None, *, first: Any = None) -> Any:
        mt.validate(params, call="adapt(...)(params, batch)")
        if stateful and state is None:
            raise ValueError(
                "adapt(..., stateful=True)(params, batch, state): state is missing; pass e.g. "
                "model.init_state()."
            )
        if trainable is not None:
            fast, frozen, spec = mt.partition(params, trainable)
        else:
            fast, frozen, spec = params, None, None
        if first is not None:
            _check_first(first, fast, stateful=stateful, steps=steps)

        def full(f: Any) -> Any:
            return f if spec is None else mt.combine(f, frozen, spec)

        def step_loss(f: Any, st: Any, k: int) -> tuple[torch.Tensor, tuple[torch.Tensor, Any]]:
            if stateful:
                out = loss_fn(full(f), batch, st, k)
                if not (isinstance(out, tuple) and len(out) == 2):
                    raise TypeError(
                        f"{call}: with stateful=True, loss_fn must return (loss, new_state)."
                    )
                loss, st = out
            else:
                loss = loss_fn(full(f), batch)
            loss = _scalar(call, loss)
            return loss, (loss.detach(), st)

        def look(f: Any, st: Any, k: int) -> torch.Tensor:
            assert observe is not None
            return observe(full(f), batch, st, k) if stateful else observe(full(f), batch)

        opt_state = optimizer.init(fast)
        losses: list[torch.Tensor] = []
        observed: list[torch.Tensor] = []
        st = state if stateful else {}
        for k in range(steps):
            if observe is not None:
                observed.append(look(fast, st, k))
            if k == 0 and first is not None:
                grads, loss = first
                loss = loss.detach()
            else:
                grads, (loss, st) = grad_with_aux(
                    step_loss, fast, st, k, differentiable=not first_order
                )
            if first_order:
                grads = mt.detach(grads)
            updates, opt_state = optimizer.update(grads, opt_state, fast)
            fast = apply_updates(fast, updates)
            losses.append(loss)
        metrics: dict[str, torch.Tensor] = {
            "loss": torch.stack(losses) if losses else torch.zeros(0, device=_device(params))
        }
        if observe is not None:
            observed.append(look(fast, st, steps))
            metrics["observed"] = torch.stack(observed)
        adapted = full(fast)
        return (adapted, st, metrics) if stateful else (adapted, metrics)

    return run


def _check_first(first: Any, fast: Any, *, stateful: bool, steps: int) -> None:
    call = "adapt(...)(params, batch, first=(grads, loss))"
    if stateful or steps == 0:
        why = "stateful=True (the first step's new state would be lost)" if stateful else "steps=0"
        raise ValueError(f"{call}: first is not supported with {why}; leave first=None.")
    if not (isinstance(first, tuple) and len(first) == 2):
        raise TypeError(f"{call}: first must be a pair (grads, loss), got {type(first).__name__}.")
    grads, loss = first
    if mt.structure(grads) != mt.structure(fast):
        raise ValueError(
            f"{call}: grads has leaves {mt.paths(grads)} but the adapted leaves are "
            f"{mt.paths(fast)}; pass the gradient of exactly the leaves that adapt."
        )
    if not isinstance(loss, torch.Tensor) or loss.dim() != 0:
        raise ValueError(f"{call}: loss must be a scalar tensor (the support loss at params).")


def _device(tree: Any) -> torch.device:
    leaves = mt.leaves(tree)
    return leaves[0].device if leaves else torch.device("cpu")


def default_strategy(device: torch.device | str) -> str:
    """The task-parallel strategy ``'auto'`` resolves to on ``device``.

    On CUDA: ``'vmap'`` (one batched kernel per op across tasks). On the CPU: ``'threads'``
    (the per-task loop, as many tasks at a time as ``torch.get_num_threads()``, each on one
    thread; with one thread it is ``'loop'``). Measured on 2 cores: a vmapped conv4 MAML step
    becomes grouped convolutions, about 2x slower than the loop and 4x the memory, and running
    two tasks at once beat one task on two intra-op threads by 1.1-1.4x on one VM, but by only
    1.02x at 5-way 1-shot (1.31x at 20-way) on a faster one (see ``benchmarks/``). The winner
    depends on the machine and the task size: :func:`metafunc.algorithms.tune_strategy` (which
    ``metafunc train --strategy auto`` calls) times the candidates on your own work instead of
    taking this rule.
    :class:`metafunc.algorithms.MAML` (and first-order MAML, Meta-SGD) with ``inner_steps=1``
    and small support sets (``MAML.SHARED_STEP_MAX_SUPPORT``) make an exception on the CPU,
    for models exact under ``vmap`` (``Model.vmap_exact``): ``'auto'`` computes every task's
    one inner step in a single ``vmap`` (its ``shared_first_step``) and then runs the query
    passes as ``'threads'``.
    On glibc, :func:`metafunc.tune_cpu_allocator` (which ``metafunc train`` calls) saves the
    tasks from page-faulting their buffers in again each meta-batch: 3-20% more on 2 cores.
    """
    return "vmap" if torch.device(device).type == "cuda" else "threads"


def _resolved(strategy: str, device: torch.device | str) -> str:
    """``strategy``, with ``'auto'`` replaced by :func:`default_strategy` of ``device`` (a
    name, unlike :func:`metafunc.harness.run.resolve_strategy`, which times candidates)."""
    return default_strategy(device) if strategy == "auto" else strategy


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


def tasks_at_once(strategy: str, chunk_size: int | None, tasks: int, device: torch.device) -> int:
    """How many of ``tasks`` ``strategy`` maps at once on ``device``: one for ``'loop'`` and
    ``'threads'``, ``chunk_size`` for ``'chunked'``, all for ``'vmap'``; ``'auto'`` as
    :func:`default_strategy`. Algorithms differentiate their meta-loss in pieces of this size
    (under ``'threads'``, :func:`task_workers` pieces at a time)."""
    chosen = _resolved(strategy, device)
    if chosen in ("loop", "threads"):
        return 1
    return min(tasks, chunk_size) if chosen == "chunked" and chunk_size else tasks


# -- the 'threads' strategy ---------------------------------------------------------------------

_POOLS: dict[int, ThreadPoolExecutor] = {}
_POOLS_LOCK = threading.Lock()
_WORKER = threading.local()
_CALLER = threading.local()  # _caller_on_one_thread's depth and saved setting, per thread
T = TypeVar("T")


def _forget_pools() -> None:  # a forked child inherits the pools but not their threads
    global _POOLS_LOCK
    _POOLS.clear()
    _POOLS_LOCK = threading.Lock()
    if getattr(_CALLER, "depth", 0):  # forked while its tasks ran: the child gets its threads
        _CALLER.depth = 0
        torch.set_num_threads(_CALLER.saved)


os.register_at_fork(after_in_child=_forget_pools)


def _start_worker(started: threading.Barrier) -> None:
    _WORKER.active = True
    torch.get_num_threads()  # torch's once-per-thread set-up first, so that it does not later
    torch.set_num_threads(1)  # undo this: this thread's kernels run on one thread
    started.wait()


def _pool(workers: int) -> ThreadPoolExecutor:
    with _POOLS_LOCK:
        pool = _POOLS.get(workers)
        if pool is None:
            # start every worker now, then give torch's process-wide default (which a worker's
            # set_num_threads also sets, for threads started later) back its value
            caller = torch.get_num_threads()
            started = threading.Barrier(workers + 1)
            pool = ThreadPoolExecutor(
                workers,
                thread_name_prefix="metafunc-task",
                initializer=_start_worker,
                initargs=(started,),
            )
            for _ in range(workers):
                pool.submit(int)
            started.wait()
            torch.set_num_threads(caller)
            _POOLS[workers] = pool
        return pool


def _state_only_this_thread_has() -> bool:
    """Whether this thread has state the workers would not see: a ``torch.func`` transform, a
    dispatch or function mode (``FlopCounterMode``...), the profiler, inference mode, saved-tensor
    hooks; or whether it is a worker itself (no nesting) or ``torch.compile`` is tracing."""
    if getattr(_WORKER, "active", False) or any_transform() or torch.is_inference_mode_enabled():
        return True
    try:  # private torch API; where it is missing, the safe choice
        return bool(
            torch._C._len_torch_dispatch_stack() > 0
            or torch._C._is_torch_function_mode_enabled()
            or torch._C._autograd._profiler_enabled()
            or torch._C._autograd._top_saved_tensors_default_hooks(False) is not None
        )
    except (AttributeError, RuntimeError, TypeError):  # pragma: no cover - other torch
        return True


def task_workers(strategy: str, device: torch.device | str) -> int:
    """How many tasks ``strategy`` runs at once on ``device``: ``torch.get_num_threads()`` for
    ``'threads'`` (or ``'auto'`` on the CPU), each task on one intra-op thread; 1 for the other
    strategies and on a non-CPU device. :func:`run_tasks` still runs them in turn where the
    calling thread has state the workers would not share. While ``torch.compile`` traces the
    answer is 1: a compiled graph covers one task (or one chunk), and its pieces run in turn."""
    chosen = _resolved(strategy, device)
    if chosen != "threads" or torch.device(device).type != "cpu":
        return 1
    if torch.compiler.is_compiling():
        return 1
    return max(1, torch.get_num_threads())


def run_tasks(calls: Sequence[Callable[[], T]], workers: int) -> Iterator[T]:
    """The results of ``calls``, in order, computed ``workers`` at a time on a pool of CPU
    threads (each running its kernels on one thread) with the caller's grad mode and autocast
    state; exceptions re-raised here (the calls not yet started are then cancelled).

    ``workers <= 1`` runs them in turn on this thread, one at a time as the results are
    consumed; so does a calling thread with state other threads would not share: a
    ``torch.func`` transform (so under ``torch.func.grad`` the tasks run in turn), a dispatch or
    function mode such as ``FlopCounterMode``, the profiler, inference mode, saved-tensor hooks,
    ``torch.compile`` tracing, or being a worker of the pool itself (no nesting). Random ops
    inside ``calls`` draw from torch's shared generator in no fixed order when they run
    concurrently."""
    if workers <= 1 or len(calls) <= 1 or _state_only_this_thread_has():
        for call in calls:
            yield call()
        return
    pool = _pool(workers)
    grad = torch.is_grad_enabled()
    autocast = [
        (kind, torch.get_autocast_dtype(kind))
        for kind in ("cpu", "cuda")
        if torch.is_autocast_enabled(kind)
    ]

    def in_context(call: Callable[[], T]) -> T:
        with contextlib.ExitStack() as stack:
            stack.enter_context(torch.set_grad_enabled(grad))
            for kind, dtype in autocast:
                stack.enter_context(torch.autocast(kind, dtype=dtype))
            return call()

    futures = [pool.submit(in_context, call) for call in calls]
    with _caller_on_one_thread():
        try:
            for future in futures:
                yield future.result()
        finally:
            for future in futures:
                future.cancel()


@contextlib.contextmanager
def _caller_on_one_thread() -> Iterator[None]:
    """The calling thread's ops on one intra-op thread while the workers compute its tasks.

    Its OpenMP team would otherwise spin-wait after every op it runs between results (summing
    them, mostly), on the cores the workers need. 20-way MAML, 16 tasks on two workers, 2-core
    EPYC VM: 1.556 s against 1.727 s a meta-batch (1.12x by round; ``OMP_WAIT_POLICY=PASSIVE``
    gave the same, but must be set before OpenMP starts). Nested or interleaved results on one
    thread (two ``run_tasks`` consumed together) restore the setting when the last one ends;
    a thread that first uses torch meanwhile starts with one intra-op thread too (torch's
    default for new threads follows ``set_num_threads``)."""
    state = _CALLER
    if getattr(state, "depth", 0) == 0:
        state.saved = torch.get_num_threads()
        torch.set_num_threads(1)
    state.depth = getattr(state, "depth", 0) + 1
    owner = threading.get_ident()
    try:
        yield
    finally:
        if threading.get_ident() == owner:  # a generator closed elsewhere cannot restore here
            state.depth -= 1
            if state.depth == 0:
                torch.set_num_threads(state.saved)


def _task_axis_size(call: str, args: Sequence[Any], in_dims: Sequence[int | None]) -> int:
    size: int | None = None
    first = ""
    for i, (arg, dim) in enumerate(zip(args, in_dims, strict=True)):
        if dim is None:
            continue
        flat = mt.flatten_with_paths(arg)
        if not flat:
            raise ValueError(
                f"{call}: argument {i} is mapped over (in_dims[{i}]=0) but has no tensors."
            )
        for path, leaf in flat.items():
            where = f"args[{i}]" + (f"['{path}']" if path else "")
            if not isinstance(leaf, torch.Tensor) or leaf.dim() == 0:
                raise ValueError(
                    f"{call}: {where} has no task axis (got {type(leaf).__qualname__}"
                    f"{' of shape ()' if isinstance(leaf, torch.Tensor) else ''}); every mapped "
                    "leaf needs a leading task axis."
                )
            n = int(leaf.shape[0])
            if size is None:
                size, first = n, where
            elif n != size:
                raise ValueError(
                    f"{call}: task axes differ: {first} has {size} tasks but {where} has {n}. "
                    "Every mapped leaf must have the same leading size."
                )
    if size is None:
        raise ValueError(f"{call}: in_dims maps no argument; put 0 for the batched one.")
    if size == 0:
        raise ValueError(f"{call}: the task axis is empty (0 tasks).")
    return size


def task_map(
    fn: Callable[..., Any],
    *,
    strategy: Strategy | str = "auto",
    chunk_size: int | None = None,
    in_dims: Sequence[int | None] = (None, 0),
    randomness: str = "error",
) -> Callable[..., Any]:
    """Map a per-task function over a leading task axis.

    ``in_dims`` says, per positional argument, ``0`` (sliced along the task axis) or ``None``
    (shared by all tasks); the default fits ``fn(meta_params, task)``. Outputs are stacked along
    a new leading axis. Strategies: ``'vmap'``, ``'chunked'`` (``vmap`` over ``chunk_size`` tasks
    at a time), ``'loop'`` (a per-task Python loop), ``'threads'`` (that loop, tasks run
    :func:`task_workers` at a time on CPU threads; in turn under a ``torch.func`` transform, so
    differentiate with ``Algorithm.meta_grad``, which maps its tasks outside one, to get them
    concurrently), ``'auto'`` (:func:`default_strategy` of the first mapped tensor's device).
    All give the same values and gradients; random ops in ``fn`` draw in no fixed order under
    ``'threads'`` (and need ``randomness`` under ``vmap``).
    """
    call = f"task_map(fn, strategy={strategy!r})"
    if strategy not in STRATEGIES:
        raise ValueError(f"{call}: unknown strategy; choose one of {STRATEGIES}.")
    if strategy == "chunked" and (chunk_size is None or chunk_size < 1):
        raise ValueError(f"{call}: 'chunked' needs chunk_size >= 1, got {chunk_size!r}.")
    if chunk_size is not None and (isinstance(chunk_size, bool) or chunk_size < 1):
        raise ValueError(f"{call}: chunk_size must be >= 1 or None, got {chunk_size!r}.")
    in_dims = tuple(in_dims)
    if any(d not in (None, 0) for d in in_dims):
        raise ValueError(f"{call}: in_dims entries must be 0 or None, got {in_dims!r}.")

    def mapped(*args: Any) -> Any:
        if len(args) != len(in_dims):
            raise TypeError(
                f"{call}: got {len(args)} arguments but in_dims has {len(in_dims)} entries."
            )
        size = _task_axis_size(call, args, in_dims)
        device = next(
            mt.leaves(a)[0] for a, d in zip(args, in_dims, strict=True) if d is not None
        ).device
        chosen = _resolved(strategy, device)
        if chosen in ("vmap", "chunked"):
            vm = torch.func.vmap(fn, in_dims=in_dims, randomness=randomness, chunk_size=chunk_size)
            return vm(*args)

        def one(i: int) -> Callable[[], Any]:
            task_args = [
                a if d is None else optree.tree_map(lambda t: t[i], a)
                for a, d in zip(args, in_dims, strict=True)
            ]
            return lambda: fn(*task_args)

        outs = list(run_tasks([one(i) for i in range(size)], task_workers(chosen, device)))
        return optree.tree_map(lambda *ts: torch.stack(ts), *outs)

    return mapped


def check_strategies(
    fn: Callable[..., torch.Tensor],
    *args: Any,
    strategies: Sequence[str] = ("vmap",),
    in_dims: Sequence[int | None] = (None, 0),
    chunk_size: int | None = None,
    rtol: float = 1e-6,
) -> dict[str, float]:
    """Check that ``task_map(fn)`` gives the per-task loop's value and gradient under other
    strategies, before trusting a new layer under ``vmap``.

    ``fn(meta_params, task, ...) -> per-task scalar loss``; the gradient is taken with respect to
    ``args[0]`` of the mean over tasks, so a ``fn`` that adapts inside checks second-order
    gradients. Run it in float64 for a sharp test.

    Returns:
        ``{strategy: relative error}`` of the gradient against the loop (global L2 norms).

    Raises:
        ValueError: a strategy differs from the loop by more than ``rtol``.
    """
    call = "check_strategies(fn, *args)"

    def grad_of(strategy: str) -> tuple[torch.Tensor, Any]:
        mapped = task_map(fn, strategy=strategy, in_dims=in_dims, chunk_size=chunk_size)

        def total(p: Any) -> tuple[torch.Tensor, torch.Tensor]:
            value = mapped(p, *args[1:]).mean()
            return value, value.detach()

        grads, value = torch.func.grad(total, has_aux=True)(args[0])
        return value, grads

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
