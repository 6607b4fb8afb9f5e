"""funcvmap: the naive torch.func reference, ``vmap`` over tasks of a ``grad`` inner loop."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.func import functional_call, grad, vmap

from benchmarks.peers.model import Conv4
from benchmarks.peers.spec import Spec

DESCRIPTION = (
    "torch.func.vmap over tasks of a torch.func.grad inner loop, functional_call on conv4 whose "
    "batch norm is written from mean/var/rsqrt (F.batch_norm under vmap gives wrong second-order "
    "gradients on torch 2.14.1, functorch#534); one backward of the mean"
)


def backward_style(spec: Spec) -> str:
    return "one backward of the vmapped mean"


def library_version() -> str:
    return torch.__version__


class FuncVmapPeer:
    def __init__(self, spec: Spec, init: dict[str, Tensor], data: dict[str, Tensor]) -> None:
        self.spec = spec
        self.params = {k: v.requires_grad_() for k, v in init.items()}
        self.data = data
        self.model = Conv4(spec, primitive_bn=True).to(device=init["head.weight"].device)
        self.batched = vmap(self.task_query_loss, in_dims=(None, 0, 0, 0, 0))

    def task_query_loss(
        self, params: dict[str, Tensor], sx: Tensor, sy: Tensor, qx: Tensor, qy: Tensor
    ) -> Tensor:
        spec = self.spec

        def support_loss(p: dict[str, Tensor]) -> Tensor:
            return F.cross_entropy(functional_call(self.model, p, (sx,)), sy)

        for _ in range(spec.inner_steps):
            grads = grad(support_loss)(params)
            if spec.first_order:
                grads = {k: g.detach() for k, g in grads.items()}
            params = {k: p - spec.inner_lr * grads[k] for k, p in params.items()}
        return F.cross_entropy(functional_call(self.model, params, (qx,)), qy)

    def forward_backward(self) -> Tensor:
        d = self.data
        losses = self.batched(
            self.params, d["support_x"], d["support_y"], d["query_x"], d["query_y"]
        )
        meta_loss = losses.mean()
        meta_loss.backward()
        return meta_loss.detach()


def build(spec: Spec, init: dict[str, Tensor], data: dict[str, Tensor]) -> FuncVmapPeer:
    return FuncVmapPeer(spec, init, data)
