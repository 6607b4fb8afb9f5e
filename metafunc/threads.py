"""The ``'threads'`` strategy's machinery: a pool of CPU threads that runs tasks concurrently,
each task's kernels on one intra-op thread, with the caller's grad mode and autocast state."""

from __future__ import annotations

import contextlib
import os
import threading
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import TypeVar

import torch

from metafunc import _random
from metafunc._transforms import any_transform

__all__ = ["on_worker", "run_tasks"]


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


def on_worker() -> bool:
    """Whether this thread is one of the pool's workers (running a task of ``run_tasks``)."""
    return bool(getattr(_WORKER, "active", False))


def _start_worker(started: threading.Barrier) -> None:
    _WORKER.active = True
    _random.mark_worker()
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
    them, mostly), on the cores the workers need. ``OMP_WAIT_POLICY=PASSIVE`` would do the same,
    but must be set before OpenMP starts, which a library cannot arrange (measurements: HISTORY
    "The caller's OpenMP team spun on the workers' cores"). Nested or interleaved results on one
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
