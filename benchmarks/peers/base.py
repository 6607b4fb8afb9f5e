"""What an impl module provides, and the task loop the loop-style impls share.

An impl module (``impl_<name>.py``, registered in ``run_peer.IMPLS``) defines:

- ``DESCRIPTION: str``: one line saying which API style it uses, echoed in the result.
- ``library_version() -> str``: import the peer library and return its version. Raise
  ``ImportError`` when it is not installed (the run then reports ``status: "missing"``). Import the
  library here or in ``build``, never at module top level.
- ``unsupported(spec) -> str | None`` (optional): a reason when the impl cannot run ``spec``.
- ``PER_TASK_BACKWARD: bool`` (task-loop impls only): the backward style of the library's official
  MAML example, used where ``spec.per_task_backward`` is None (see ``resolve_backward``).
- ``backward_style(spec) -> str`` (optional): what the result's ``backward`` says, when it is not
  ``spec.per_task_backward`` read as ``"per-task"`` / ``"whole-batch"``.
- ``build(spec, init, data) -> Peer``: set up everything that is not timed.

A ``Peer`` holds its meta-parameters as leaf tensors named and ordered as ``param_names(spec)``
(the harness builds the outer Adam over them and reads their ``.grad``), and ``forward_backward()``
computes one meta-iteration's loss and leaves the meta-gradient in ``.grad`` (the harness zeroes
the gradients before and steps the optimiser after).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Protocol

import torch
from torch import Tensor

from benchmarks.peers.inputs import DATA_KEYS
from benchmarks.peers.spec import Spec

__all__ = ["Peer", "Task", "backward_label", "resolve_backward", "run_task_loop", "split_tasks"]

Task = tuple[Tensor, Tensor, Tensor, Tensor]


class Peer(Protocol):
    """One impl, set up for one spec."""

    @property
    def params(self) -> dict[str, Tensor]:
        """The meta-parameters: leaf tensors requiring grad, in the protocol's names and order."""
        ...

    def forward_backward(self) -> Tensor:
        """Compute the meta-loss (mean query loss over tasks), backprop it; return it detached."""
        ...


def split_tasks(data: dict[str, Tensor]) -> list[Task]:
    """The meta-batch as a list of ``(support_x, support_y, query_x, query_y)`` per task."""
    return list(zip(*(data[k].unbind(0) for k in DATA_KEYS), strict=True))


def resolve_backward(spec: Spec, official: bool, *, force_batch: bool = False) -> Spec:
    """``spec`` with ``per_task_backward`` decided: False with ``force_batch`` (the ``-batch``
    variants), else the spec's own value, else ``official`` (the impl's ``PER_TASK_BACKWARD``)."""
    if force_batch:
        return spec.replace(per_task_backward=False)
    if spec.per_task_backward is None:
        return spec.replace(per_task_backward=official)
    return spec


def backward_label(spec: Spec) -> str:
    """``"per-task"`` or ``"whole-batch"``: the backward style a resolved ``spec`` runs."""
    return "per-task" if spec.per_task_backward else "whole-batch"


def run_task_loop(spec: Spec, tasks: list[Task], query_loss: Callable[[Task], Tensor]) -> Tensor:
    """Mean of ``query_loss(task)`` over ``tasks``, backpropagated; returns it detached.

    With ``spec.per_task_backward`` each task's loss divided by the task count is backpropagated
    as soon as it is computed (the official learn2learn / higher example style: one task's graph
    held at a time); with False the mean is backpropagated once (every task's graph held). The
    spec must be resolved (``resolve_backward``; ``run_peer.run`` does it).
    """
    if spec.per_task_backward is None:
        raise ValueError(
            f"run_task_loop(Spec(name={spec.name!r})): per_task_backward is None, the impl's "
            "official style, which only run_peer.run resolves. Resolve it first with "
            "spec = resolve_backward(spec, module.PER_TASK_BACKWARD)."
        )
    count = len(tasks)
    if spec.per_task_backward:
        total = torch.zeros((), dtype=tasks[0][0].dtype, device=tasks[0][0].device)
        for task in tasks:
            loss = query_loss(task)
            (loss / count).backward()
            total = total + loss.detach()
        return total / count
    meta_loss = torch.stack([query_loss(task) for task in tasks]).mean()
    meta_loss.backward()
    return meta_loss.detach()
