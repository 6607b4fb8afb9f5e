"""higher: ``higher.innerloop_ctx`` with a differentiable SGD per task (official loop)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from benchmarks.peers.base import Task, run_task_loop, split_tasks
from benchmarks.peers.model import Conv4
from benchmarks.peers.spec import Spec

#: Per task, as higher's examples/maml-omniglot.py (``qry_loss.backward()`` inside each task's
#: ``innerloop_ctx``).
PER_TASK_BACKWARD = True

DESCRIPTION = (
    "per task higher.innerloop_ctx(conv4 nn.Module, torch.optim.SGD, copy_initial_weights=False, "
    "track_higher_grads=not first_order), diffopt.step(support loss); first order: higher detaches "
    "the fast weights, so the query gradient at the adapted weights is added to the meta-grads"
)


def library_version() -> str:
    from importlib.metadata import version

    import higher  # noqa: F401  (higher has no __version__; ask the installed distribution)

    return version("higher")


def backward_style(spec: Spec) -> str:
    """First order backpropagates per task whatever the spec says (see ``forward_backward``)."""
    return "per-task" if spec.first_order or spec.per_task_backward else "whole-batch"


class HigherPeer:
    def __init__(self, spec: Spec, init: dict[str, Tensor], data: dict[str, Tensor]) -> None:
        self.spec = spec
        self.model = Conv4.from_init(spec, init)
        self.inner_opt = torch.optim.SGD(self.model.parameters(), lr=spec.inner_lr)
        self.params = dict(self.model.named_parameters())
        self.tasks = split_tasks(data)

    def query_loss(self, task: Task) -> Tensor:
        import higher

        sx, sy, qx, qy = task
        with higher.innerloop_ctx(
            self.model,
            self.inner_opt,
            copy_initial_weights=False,
            track_higher_grads=not self.spec.first_order,
        ) as (fmodel, diffopt):
            for _ in range(self.spec.inner_steps):
                diffopt.step(F.cross_entropy(fmodel(sx), sy))
            return F.cross_entropy(fmodel(qx), qy)

    def first_order_query_loss(self, task: Task, scale: float) -> Tensor:
        """FOMAML in higher: accumulate ``scale * d(query loss)/d(adapted weights)`` into .grad."""
        import higher

        sx, sy, qx, qy = task
        with higher.innerloop_ctx(
            self.model, self.inner_opt, copy_initial_weights=False, track_higher_grads=False
        ) as (fmodel, diffopt):
            for _ in range(self.spec.inner_steps):
                diffopt.step(F.cross_entropy(fmodel(sx), sy))
            loss = F.cross_entropy(fmodel(qx), qy)
            grads = torch.autograd.grad(loss * scale, list(fmodel.parameters()))
        for p, g in zip(self.params.values(), grads, strict=True):
            p.grad = g if p.grad is None else p.grad + g
        return loss.detach()

    def forward_backward(self) -> Tensor:
        if self.spec.first_order:
            scale = 1.0 / len(self.tasks)
            losses = [self.first_order_query_loss(task, scale) for task in self.tasks]
            return torch.stack(losses).mean()
        return run_task_loop(self.spec, self.tasks, self.query_loss)


def build(spec: Spec, init: dict[str, Tensor], data: dict[str, Tensor]) -> HigherPeer:
    return HigherPeer(spec, init, data)
