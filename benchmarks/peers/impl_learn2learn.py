"""learn2learn: ``l2l.algorithms.MAML`` with ``clone()`` / ``adapt()`` per task (official loop)."""

from __future__ import annotations

from typing import Any

import torch.nn.functional as F
from torch import Tensor

from benchmarks.peers.base import Task, run_task_loop, split_tasks
from benchmarks.peers.model import Conv4
from benchmarks.peers.spec import Spec

#: Per task, as learn2learn's examples/vision/maml_omniglot.py (``evaluation_error.backward()``
#: per task, then the gradients scaled by 1 / meta-batch).
PER_TASK_BACKWARD = True

DESCRIPTION = (
    "l2l.algorithms.MAML(conv4 nn.Module, lr, first_order); per task learner = maml.clone(), "
    "learner.adapt(support loss) per inner step, query loss of learner"
)


def library_version() -> str:
    import learn2learn

    return str(learn2learn.__version__)


class Learn2LearnPeer:
    def __init__(self, spec: Spec, init: dict[str, Tensor], data: dict[str, Tensor]) -> None:
        import learn2learn as l2l

        self.spec = spec
        self.model = Conv4.from_init(spec, init)
        self.maml: Any = l2l.algorithms.MAML(
            self.model, lr=spec.inner_lr, first_order=spec.first_order
        )
        self.params = dict(self.model.named_parameters())
        self.tasks = split_tasks(data)

    def query_loss(self, task: Task) -> Tensor:
        sx, sy, qx, qy = task
        learner = self.maml.clone()
        for _ in range(self.spec.inner_steps):
            learner.adapt(F.cross_entropy(learner(sx), sy))
        return F.cross_entropy(learner(qx), qy)

    def forward_backward(self) -> Tensor:
        return run_task_loop(self.spec, self.tasks, self.query_loss)


def build(spec: Spec, init: dict[str, Tensor], data: dict[str, Tensor]) -> Learn2LearnPeer:
    return Learn2LearnPeer(spec, init, data)
