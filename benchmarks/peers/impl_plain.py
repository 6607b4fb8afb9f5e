"""plain: a per-task PyTorch loop, ``torch.autograd.grad`` inner steps on a functional conv4."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from benchmarks.peers.base import Task, run_task_loop, split_tasks
from benchmarks.peers.model import conv4_apply
from benchmarks.peers.spec import Spec

#: Per task, as PyTorch's own pure-PyTorch MAML example
#: (functorch/examples/maml_omniglot/maml-omniglot-ptonly.py: ``qry_loss.backward()`` per task).
PER_TASK_BACKWARD = True

DESCRIPTION = (
    "per-task Python loop; hand-written functional conv4 (F.conv2d, F.batch_norm training=True); "
    "inner SGD via torch.autograd.grad(create_graph=not first_order)"
)


def library_version() -> str:
    return torch.__version__


class PlainPeer:
    def __init__(self, spec: Spec, init: dict[str, Tensor], data: dict[str, Tensor]) -> None:
        self.spec = spec
        self.params = {k: v.requires_grad_() for k, v in init.items()}
        self.tasks = split_tasks(data)

    def query_loss(self, task: Task) -> Tensor:
        sx, sy, qx, qy = task
        spec = self.spec
        fast = self.params
        for _ in range(spec.inner_steps):
            loss = F.cross_entropy(conv4_apply(fast, sx, pooling=spec.pooling), sy)
            order2 = not spec.first_order
            grads = torch.autograd.grad(loss, list(fast.values()), create_graph=order2)
            fast = {k: p - spec.inner_lr * g for (k, p), g in zip(fast.items(), grads, strict=True)}
        return F.cross_entropy(conv4_apply(fast, qx, pooling=spec.pooling), qy)

    def forward_backward(self) -> Tensor:
        return run_task_loop(self.spec, self.tasks, self.query_loss)


def build(spec: Spec, init: dict[str, Tensor], data: dict[str, Tensor]) -> PlainPeer:
    return PlainPeer(spec, init, data)
