"""torchopt: TorchOpt's functional optimiser API (``torchopt.sgd`` + ``apply_updates``)."""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.func import functional_call

from benchmarks.peers.base import Task, run_task_loop, split_tasks
from benchmarks.peers.model import Conv4
from benchmarks.peers.spec import Spec

#: Once on the mean: TorchOpt has no per-task functional MAML loop to follow, and its examples
#: (few-shot/maml_omniglot.py, FuncTorch/maml_omniglot_vmap.py) backpropagate the mean once.
PER_TASK_BACKWARD = False

DESCRIPTION = (
    "TorchOpt functional API: per task opt = torchopt.sgd(lr), state = opt.init(params), "
    "grads = torch.autograd.grad(create_graph=not first_order), opt.update(grads, state, "
    "inplace=False), torchopt.apply_updates(params, updates, inplace=False); "
    "torch.func.functional_call on the conv4 nn.Module"
)


def library_version() -> str:
    import torchopt

    return str(torchopt.__version__)


class TorchOptPeer:
    def __init__(self, spec: Spec, init: dict[str, Tensor], data: dict[str, Tensor]) -> None:
        import torchopt

        self.torchopt: Any = torchopt
        self.spec = spec
        self.model = Conv4.from_init(spec, init)
        self.params = {k: v.requires_grad_() for k, v in init.items()}
        self.names = list(self.params)
        self.inner_opt = torchopt.sgd(lr=spec.inner_lr)
        self.tasks = split_tasks(data)

    def logits(self, params: tuple[Tensor, ...], x: Tensor) -> Tensor:
        return functional_call(self.model, dict(zip(self.names, params, strict=True)), (x,))

    def query_loss(self, task: Task) -> Tensor:
        sx, sy, qx, qy = task
        params = tuple(self.params.values())
        state = self.inner_opt.init(params)
        for _ in range(self.spec.inner_steps):
            loss = F.cross_entropy(self.logits(params, sx), sy)
            grads = torch.autograd.grad(loss, params, create_graph=not self.spec.first_order)
            updates, state = self.inner_opt.update(grads, state, params=params, inplace=False)
            params = self.torchopt.apply_updates(params, updates, inplace=False)
        return F.cross_entropy(self.logits(params, qx), qy)

    def forward_backward(self) -> Tensor:
        return run_task_loop(self.spec, self.tasks, self.query_loss)


def build(spec: Spec, init: dict[str, Tensor], data: dict[str, Tensor]) -> TorchOptPeer:
    return TorchOptPeer(spec, init, data)
