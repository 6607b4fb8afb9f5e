"""The task batch: one type for a single task and for a meta-batch with a leading task axis, and
the one check every public entry point that takes tasks runs on it."""

from __future__ import annotations

import contextlib
import os
import threading
from collections.abc import Callable, Iterator
from typing import Any, Literal, NamedTuple

import torch

from metafunc._transforms import any_transform

__all__ = ["TaskBatch", "check_batch", "checked_scope", "in_checked_scope"]

Targets = Literal["classes", "values"]

# value checks (label range) on accelerators too, where they cost a host synchronisation
DEBUG = os.environ.get("METAFUNC_DEBUG", "") not in ("", "0")
_SCOPE = threading.local()  # .depth: checked batches being worked through on this thread


@contextlib.contextmanager
def checked_scope() -> Iterator[None]:
    """Work on a batch :func:`check_batch` has passed: the single tasks cut from it inside need
    no check of their own (:func:`in_checked_scope`), which keeps checks off the hot path."""
    _SCOPE.depth = getattr(_SCOPE, "depth", 0) + 1
    try:
        yield
    finally:
        _SCOPE.depth -= 1


def in_checked_scope() -> bool:
    return bool(getattr(_SCOPE, "depth", 0))


class TaskBatch(NamedTuple):
    """Support and query sets of one task, or of many tasks stacked on a leading task axis.

    A single task holds ``support_x: [S, ...]``, ``support_y: [S, ...]``, ``query_x: [Q, ...]``,
    ``query_y: [Q, ...]``. A meta-batch holds the same fields with a leading task axis
    ``[T, S, ...]``; ``metafunc.task_map`` slices it into single tasks (by ``vmap`` or a loop).
    Being a NamedTuple, it is a pytree node for both optree and ``torch.func``.
    """

    support_x: torch.Tensor
    support_y: torch.Tensor
    query_x: torch.Tensor
    query_y: torch.Tensor

    @property
    def num_tasks(self) -> int:
        """Size of the leading task axis (only meaningful for a meta-batch)."""
        return int(self.support_x.shape[0])

    def to(
        self, device: torch.device | str | None = None, dtype: torch.dtype | None = None
    ) -> TaskBatch:
        """Move every field to ``device``; cast floating fields (not labels) to ``dtype``."""

        def move(t: torch.Tensor) -> torch.Tensor:
            if dtype is not None and t.is_floating_point():
                return t.to(device=device, dtype=dtype)
            return t.to(device=device)

        return TaskBatch(*(move(t) for t in self))


def _shape(t: torch.Tensor) -> str:
    return str(tuple(t.shape))


def check_batch(
    batch: Any,
    *,
    call: str,
    name: str = "batch",
    tasks: bool = True,
    targets: Targets | None = None,
    ways: int | Callable[[], int | None] | None = None,
) -> None:
    """Check ``batch`` before any task runs, naming the field and the fix.

    Checked from metadata alone (shapes, dtypes, devices): a :class:`TaskBatch` of tensors on one
    device; with ``tasks``, a leading task axis of one size in all four fields (the per-task
    strategies would otherwise slice the support set's task count and drop extra query tasks);
    as many targets as inputs in the support and in the query set; support and query inputs
    (and targets) with the same per-example shape. ``targets='classes'``: int64 class indices of
    one per example; ``'values'``: floating targets; integer targets are int64 in any case. With
    ``ways`` (or ``ways()``, asked once the shapes are known to be right), class indices must lie
    in ``[0, ways)``: a value check, run where the labels are on the CPU (no synchronisation) or,
    on an accelerator, with ``METAFUNC_DEBUG=1``; never while ``torch.compile`` traces or inside
    a ``torch.func`` transform.

    Fields are named ``f"{name}.support_x"`` and so on in the messages.

    Raises:
        TypeError: not a TaskBatch, a field that is not a tensor, or labels of the wrong dtype.
        ValueError: inconsistent shapes or devices, or labels out of range.
    """
    if not isinstance(batch, TaskBatch):
        got = type(batch).__qualname__
        raise TypeError(
            f"{call}: {name} is a {got}, not a metafunc.TaskBatch; build one with "
            "metafunc.TaskBatch(support_x, support_y, query_x, query_y)."
        )
    if torch.compiler.is_compiling():  # checked eagerly at the compiled step's boundary
        return
    names = [f"{name}.{field}" for field in TaskBatch._fields]
    for what, field in zip(names, batch, strict=True):
        if not isinstance(field, torch.Tensor):
            raise TypeError(
                f"{call}: {what} is a {type(field).__qualname__}; every field of a "
                "TaskBatch is a tensor (torch.as_tensor(...) converts arrays and lists)."
            )
    sx, sy, qx, qy = batch
    lead = 1 if tasks else 0
    if tasks:
        for what, field in zip(names, batch, strict=True):
            if field.dim() < 2:
                raise ValueError(
                    f"{call}: {what} has shape {_shape(field)}, with no task axis; a "
                    "meta-batch is [tasks, examples, ...] in every field. For one task, add the "
                    "axis: batch = TaskBatch(*(f[None] for f in batch))."
                )
        counts = {what: int(f.shape[0]) for what, f in zip(names, batch, strict=True)}
        if len(set(counts.values())) > 1:
            listed = ", ".join(f"{n} {c}" for n, c in counts.items())
            raise ValueError(
                f"{call}: the fields hold different numbers of tasks ({listed}); every field "
                "needs the same leading task axis. Sample support and query sets together, e.g. "
                "with one sampler.sample(tasks, generator)."
            )
    x_y = ((names[0], names[1], sx, sy), (names[2], names[3], qx, qy))
    for x_name, y_name, x, y in x_y:
        if y.dim() < lead + 1 or x.dim() < lead + 1 or x.shape[lead] != y.shape[lead]:
            raise ValueError(
                f"{call}: {x_name} has shape {_shape(x)} but {y_name} has shape "
                f"{_shape(y)}; each example needs one target, so their "
                f"{'second' if tasks else 'first'} dimensions must agree."
            )
    if sx.shape[lead + 1 :] != qx.shape[lead + 1 :]:
        raise ValueError(
            f"{call}: {names[0]} has examples of shape {tuple(sx.shape[lead + 1 :])} but "
            f"{names[2]} of shape {tuple(qx.shape[lead + 1 :])}; one model sees both, so "
            "they must agree."
        )
    if sy.shape[lead + 1 :] != qy.shape[lead + 1 :] or sy.dtype != qy.dtype:
        raise ValueError(
            f"{call}: {names[1]} is {sy.dtype} {_shape(sy)} but {names[3]} is "
            f"{qy.dtype} {_shape(qy)}; support and query targets must have the same dtype and "
            "per-example shape."
        )
    devices = {f.device for f in batch}
    if len(devices) > 1:
        where = ", ".join(f"{n} on {f.device}" for n, f in zip(names, batch, strict=True))
        raise ValueError(
            f"{call}: the fields are on different devices ({where}); move them together with "
            f"{name}.to(device)."
        )
    if not (sy.is_floating_point() or sy.is_complex()) and sy.dtype != torch.int64:
        raise TypeError(
            f"{call}: {names[1]} is {sy.dtype}; class indices must be int64 (torch's losses "
            f"take no other integer type) and regression targets floating. Cast them: "
            f"{names[1]}.long(), {names[3]}.long() (or .float() for regression)."
        )
    if targets == "classes":
        _check_classes(call, name, batch, lead, ways)
    elif targets == "values" and not sy.is_floating_point():
        raise TypeError(
            f"{call}: {names[1]} is {sy.dtype}, but a regression loss ('mse') needs floating "
            f"targets; cast them ({names[1]}.float(), {names[3]}.float()), or use "
            "loss='cross_entropy' for class labels."
        )


def _check_classes(
    call: str, name: str, batch: TaskBatch, lead: int, ways: int | Callable[[], int | None] | None
) -> None:
    sy, qy = batch.support_y, batch.query_y
    if sy.is_floating_point() or sy.is_complex():
        raise TypeError(
            f"{call}: {name}.support_y is {sy.dtype}, but classification ('cross_entropy') "
            f"takes int64 class indices; cast them ({name}.support_y.long(), "
            f"{name}.query_y.long()), or use loss='mse' for real-valued targets."
        )
    if sy.dtype != torch.int64:
        raise TypeError(
            f"{call}: {name}.support_y is {sy.dtype}; class indices must be int64 (torch's "
            f"losses take no other integer type). Cast them: {name}.support_y.long(), "
            f"{name}.query_y.long()."
        )
    if sy.dim() != lead + 1:
        raise ValueError(
            f"{call}: {name}.support_y has shape {_shape(sy)}; class indices are one int per "
            f"example ({'[tasks, examples]' if lead else '[examples]'}), not one-hot vectors. "
            "Use labels.argmax(-1) for one-hot labels."
        )
    if callable(ways):
        ways = ways()
    if ways is None or not _values_checked(sy):
        return
    for field, y in (("support_y", sy), ("query_y", qy)):
        if y.numel() == 0:
            continue
        low, high = int(y.min()), int(y.max())
        if low < 0 or high >= ways:
            raise ValueError(
                f"{call}: {name}.{field} holds labels from {low} to {high}, but the model has "
                f"{ways} classes; a task's labels are 0..{ways - 1} (relabel each task's "
                "classes in order, e.g. labels - labels.min() for 1-based labels)."
            )


def _values_checked(t: torch.Tensor) -> bool:
    """Whether value checks run on ``t``: on the CPU (or everywhere with ``METAFUNC_DEBUG=1``),
    and not on a tensor a ``torch.func`` transform wraps."""
    return (t.device.type == "cpu" or DEBUG) and not any_transform()
