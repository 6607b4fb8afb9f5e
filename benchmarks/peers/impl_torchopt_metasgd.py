"""torchopt-metasgd: TorchOpt's OOP ``torchopt.MetaSGD`` loop from its MAML Omniglot example."""

from __future__ import annotations

from typing import Any

import torch.nn.functional as F
from torch import Tensor

from benchmarks.peers.base import Task, run_task_loop, split_tasks
from benchmarks.peers.model import Conv4
from benchmarks.peers.spec import Spec

#: Once on the mean, as TorchOpt's examples/few-shot/maml_omniglot.py
#: (``torch.mean(torch.stack(qry_losses)).backward()`` after the task loop).
PER_TASK_BACKWARD = False

DESCRIPTION = (
    "TorchOpt OOP API (examples/few-shot/maml_omniglot.py): inner_opt = torchopt.MetaSGD(conv4, "
    "lr); per task inner_opt.step(support loss), query loss, then torchopt.recover_state_dict of "
    "the module and the optimiser; second order only"
)


def library_version() -> str:
    import torchopt

    return str(torchopt.__version__)


def unsupported(spec: Spec) -> str | None:
    if spec.first_order:
        return "torchopt.MetaSGD always differentiates through the inner step (create_graph=True)"
    return None


class TorchOptMetaSGDPeer:
    def __init__(self, spec: Spec, init: dict[str, Tensor], data: dict[str, Tensor]) -> None:
        import torchopt

        self.torchopt: Any = torchopt
        self.spec = spec
        self.model = Conv4.from_init(spec, init)
        self.params = dict(self.model.named_parameters())
        self.inner_opt = torchopt.MetaSGD(self.model, lr=spec.inner_lr)
        self.net_state = torchopt.extract_state_dict(
            self.model, by="reference", detach_buffers=True
        )
        self.opt_state = torchopt.extract_state_dict(self.inner_opt, by="reference")
        self.tasks = split_tasks(data)

    def query_loss(self, task: Task) -> Tensor:
        sx, sy, qx, qy = task
        for _ in range(self.spec.inner_steps):
            self.inner_opt.step(F.cross_entropy(self.model(sx), sy))
        loss = F.cross_entropy(self.model(qx), qy)
        self.torchopt.recover_state_dict(self.model, self.net_state)
        self.torchopt.recover_state_dict(self.inner_opt, self.opt_state)
        return loss

    def forward_backward(self) -> Tensor:
        return run_task_loop(self.spec, self.tasks, self.query_loss)


def build(spec: Spec, init: dict[str, Tensor], data: dict[str, Tensor]) -> TorchOptMetaSGDPeer:
    return TorchOptMetaSGDPeer(spec, init, data)
