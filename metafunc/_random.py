"""Random draws per task: the ``randomness`` option of :func:`metafunc.task_map` and of every
algorithm, with one meaning under every strategy.

- ``'different'``: every task draws its own numbers (dropout masks differ between tasks);
- ``'same'``: every task draws the same numbers;
- ``'error'``: a random draw inside a task is an error (for functions meant to be deterministic).

Under ``vmap`` these are ``torch.func.vmap``'s own options. The per-task strategies run each task
from a seed of its own: ``'different'`` gives task ``i`` the seed ``base + i * PHI`` and ``'same'``
gives every task ``base``, where ``base`` is drawn once per call from the current stream (torch's
default generator, or the task's own stream when called inside a task). So a run is repeatable
under a fixed ``torch.manual_seed`` whatever the strategy, and ``'loop'`` and ``'threads'`` draw
the same numbers. On the calling thread a task's stream is the default generator, seeded for the
task and restored after it; on a worker thread of ``'threads'``, where the default generator is
shared, a task's random calls take turns on it under a lock, each resuming the task's own saved
state (:class:`_Stream`), which draws exactly what the calling thread would.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Callable, Iterator
from typing import Any, Literal, TypeVar, get_args

import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode

__all__ = [
    "RANDOMNESS",
    "Randomness",
    "check_randomness",
    "in_task_stream",
    "mark_worker",
    "task_seeds",
]

Randomness = Literal["different", "same", "error"]
"""How random draws differ across the tasks a call maps (:func:`metafunc.task_map`)."""
RANDOMNESS: tuple[str, ...] = get_args(Randomness)
_PHI = 0x9E3779B97F4A7C15  # odd 64-bit constant: task seeds spread over the seed space
_MASK = (1 << 63) - 1

_LOCK = threading.Lock()
_LOCAL = threading.local()  # .streams: _Stream modes open on this thread; .worker: a pool thread
T = TypeVar("T")

# torch functions that draw from the default generator when given no generator
_DROPOUTS = {
    F.dropout, F.dropout1d, F.dropout2d, F.dropout3d, F.alpha_dropout, F.feature_alpha_dropout,
}  # fmt: skip
_RANDOM = _DROPOUTS | {
    f
    for f in (
        *(getattr(torch, n, None) for n in (
            "rand", "randn", "randint", "randperm", "rand_like", "randn_like", "randint_like",
            "bernoulli", "normal", "multinomial", "poisson", "dropout", "feature_dropout",
            "alpha_dropout", "feature_alpha_dropout", "rrelu", "rrelu_",
        )),
        *(getattr(torch.Tensor, n, None) for n in (
            "bernoulli", "bernoulli_", "uniform_", "normal_", "random_", "exponential_",
            "geometric_", "cauchy_", "log_normal_", "multinomial",
        )),
        F.rrelu, F.gumbel_softmax,
    )
    if f is not None
}  # fmt: skip


def check_randomness(call: str, value: object) -> None:
    if value not in RANDOMNESS:
        raise ValueError(
            f"{call}: randomness={value!r} is not one of {RANDOMNESS}: 'different' (each task "
            "draws its own dropout masks), 'same' (all tasks draw alike) or 'error'."
        )


def task_seeds(randomness: str, tasks: int) -> list[int] | None:
    """One seed per task for ``randomness`` (``None`` for ``'error'``: nothing is drawn), from
    one draw of the current stream."""
    if randomness == "error" or torch.compiler.is_compiling():
        return None
    base = int(torch.randint(0, 2**62, (1,)))
    if randomness == "same":
        return [base] * tasks
    return [(base + i * _PHI) & _MASK for i in range(tasks)]


def _draws(func: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> bool:
    """Whether calling ``func`` draws from the default generator."""
    if func not in _RANDOM or kwargs.get("generator") is not None:
        return False
    if func in _DROPOUTS:  # (input, p, training, inplace); F.dropout's training default is True
        training = args[2] if len(args) > 2 else kwargs.get("training", True)
        return bool(training)
    return True


def _name(func: Any) -> str:
    module = "F" if func in _DROPOUTS or func in (F.rrelu, F.gumbel_softmax) else "torch"
    return f"{module}.{getattr(func, '__name__', func)}"


class _Stream(TorchFunctionMode):
    """A task's random calls from its own generator state (``seed``, then wherever its last call
    left it), on a thread that shares torch's default generator with others; with ``seed=None``,
    random calls raise (``randomness='error'``)."""

    def __init__(self, seed: int | None, call: str) -> None:
        super().__init__()
        self.seed, self.call = seed, call
        self.state: torch.Tensor | None = None

    def __torch_function__(
        self, func: Any, types: Any, args: tuple[Any, ...] = (), kwargs: Any = None
    ) -> Any:
        kwargs = kwargs or {}
        if not _draws(func, args, kwargs):
            return func(*args, **kwargs)
        with torch._C.DisableTorchFunction():  # an enclosing task's stream must not see it
            return self._draw(func, args, kwargs)

    def _draw(self, func: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        if self.seed is None:
            raise ValueError(
                f"{self.call}: the task function calls {_name(func)}, a random draw, but "
                "randomness='error'. Pass randomness='different' (each task draws its own, "
                "e.g. dropout masks) or 'same' (every task draws alike)."
            )
        cpu = torch.default_generator
        with _LOCK:
            saved = cpu.get_state()
            if self.state is None:
                cpu.manual_seed(self.seed)
            else:
                cpu.set_state(self.state)
            try:
                return func(*args, **kwargs)
            finally:
                self.state = cpu.get_state()
                cpu.set_state(saved)


@contextlib.contextmanager
def _stream_mode(seed: int | None, call: str) -> Iterator[None]:
    _LOCAL.streams = getattr(_LOCAL, "streams", 0) + 1
    try:
        with _Stream(seed, call):
            yield
    finally:
        _LOCAL.streams -= 1


@contextlib.contextmanager
def _seeded_default(seed: int) -> Iterator[None]:
    """torch's default generators (the CPU's and every initialised CUDA device's) seeded with
    ``seed`` inside, and restored after."""
    cpu = torch.default_generator
    saved = cpu.get_state()
    cuda = torch.cuda.is_initialized()
    saved_cuda = torch.cuda.get_rng_state_all() if cuda else []
    cpu.manual_seed(seed)
    if cuda:
        torch.cuda.manual_seed_all(seed)
    try:
        yield
    finally:
        cpu.set_state(saved)
        if cuda:
            torch.cuda.set_rng_state_all(saved_cuda)


def mark_worker() -> None:
    """Mark this thread as one of the pool's: its tasks share the default generator with the
    other workers', so their draws go through :class:`_Stream`."""
    _LOCAL.worker = True


def in_task_stream(fn: Callable[[], T], seed: int | None, *, randomness: str, call: str) -> T:
    """``fn()`` drawing from the stream of a task seeded with ``seed`` (see the module
    docstring); ``randomness='error'`` makes its draws raise, naming ``call``."""
    if torch.compiler.is_compiling():  # dynamo keeps random state of its own
        return fn()
    shared = getattr(_LOCAL, "worker", False) or getattr(_LOCAL, "streams", 0)
    if randomness == "error" or shared:
        with _stream_mode(None if randomness == "error" else seed, call):
            return fn()
    if seed is None:
        return fn()
    with _seeded_default(seed):
        return fn()
