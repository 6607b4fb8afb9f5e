"""Differentiable solver heads on a meta-learned embedding: R2D2's ridge regression in closed form
(Bertinetto, Henriques, Torr & Vedaldi, 2019) and MetaOptNet's multi-class SVM (Lee, Maji,
Ravichandran & Soatto, 2019), whose dual is solved per task and differentiated implicitly.

Both fit a linear classifier on the support embeddings of each task and score the queries with
it; the embedding learns through the solution. They are :class:`ProtoNet`'s shape with another
head: the same episodes, the same embedding networks (``conv4(None)``, ``resnet12(None)``), the
same outer schedule.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from metafunc import linalg
from metafunc.algorithms._common import class_one_hot, ways_of
from metafunc.algorithms.checks import check_lr, check_steps
from metafunc.algorithms.protonets import ProtoNet
from metafunc.data.batch import TaskBatch
from metafunc.implicit import NOT_COMPILABLE, custom_fixed_point

__all__ = ["R2D2", "MetaOptNet", "ridge_logits", "svm_logits"]


def ridge_logits(
    support: torch.Tensor, support_y: torch.Tensor, query: torch.Tensor, ways: int, lam: Any
) -> torch.Tensor:
    """Query scores ``[Q, ways]`` of ridge regression onto one-hot labels, in closed form by the
    Woodbury identity: ``W = Φᵀ (Φ Φᵀ + λ I)⁻¹ Y``, a system the size of the support set (not of
    the embedding), as R2D2 solves it."""
    one_hot = class_one_hot(support_y, ways, support.dtype)  # [S, N]
    gram = support @ support.T  # [S, S]
    eye = torch.eye(gram.shape[0], dtype=gram.dtype, device=gram.device)
    weights = support.T @ torch.linalg.solve(gram + lam * eye, one_hot)  # [D, N]
    return query @ weights


def project_rows(v: torch.Tensor, upper: torch.Tensor, iters: int = 60) -> torch.Tensor:
    """Each row ``a`` of ``v`` projected onto ``{a <= upper, Σ a = 0}``: ``a = min(v - τ, upper)``
    for the shift ``τ`` that makes the row sum zero. Bisection (``Σ min(v - τ, upper)`` falls
    with ``τ``; a fixed number of halvings, so it runs under ``vmap``) finds which entries stay
    below their bound; ``τ`` is then solved exactly on them, ``τ = (Σ_free v + Σ_bound upper) /
    #free``, so that it is exact and differentiable in ``v`` and ``upper``."""
    low = (v - upper).min(-1, keepdim=True).values - 1.0  # sum >= 0 at low
    high = v.max(-1, keepdim=True).values + 1.0  # every entry < 0 at high
    for _ in range(iters):
        mid = 0.5 * (low + high)
        positive = torch.minimum(v - mid, upper).sum(-1, keepdim=True) > 0
        low = torch.where(positive, mid, low)
        high = torch.where(positive, high, mid)
    free = (v - 0.5 * (low + high)) < upper
    count = free.sum(-1, keepdim=True).clamp(min=1).to(v.dtype)
    tau = (torch.where(free, v, upper).sum(-1, keepdim=True)) / count
    return torch.minimum(v - tau, upper)


def svm_logits(
    support: torch.Tensor,
    support_y: torch.Tensor,
    query: torch.Tensor,
    ways: int,
    c: float = 0.1,
    steps: int = 200,
    tol: float = 1e-8,
) -> torch.Tensor:
    """Query scores ``[Q, ways]`` of the Crammer-Singer multi-class SVM fitted on the support
    set, as MetaOptNet-SVM uses it: the dual

        max_α  Σ_i α_iᵀ y_i - ½ Σ_ij k(x_i, x_j) α_iᵀ α_j,   α_i <= C y_i,  Σ_m α_i^m = 0,

    (``y_i`` one-hot; ``k`` the linear kernel plus the identity, as the authors' code has it)
    solved by ``steps`` steps of accelerated projected gradient ascent (step ``1 / ||K||``), and
    differentiated by the implicit function theorem at its fixed point (the
    projected step, :func:`metafunc.implicit.custom_fixed_point`, its linear system solved by
    BiCGSTAB to ``tol``), not through the steps. The query scores are ``Σ_i k(q, x_i) α_i``."""
    one_hot = class_one_hot(support_y, ways, support.dtype)
    upper = c * one_hot

    def projected_step(alpha: torch.Tensor, gram: torch.Tensor, eta: torch.Tensor) -> Any:
        return project_rows(alpha + eta * (one_hot - gram @ alpha), upper)

    # a Krylov solve of the fixed point's Jacobian (the size of the dual); tasks with many
    # support examples converge slowly: 1e-8 suits training, tests check small ones to 1e-12
    @custom_fixed_point(projected_step, solve=linalg.bicgstab, tol=tol, maxiter=1000)
    def dual(init: Any, gram: torch.Tensor, eta: torch.Tensor) -> torch.Tensor:
        # accelerated projected gradient (FISTA): the fixed point of the plain step, reached in
        # about sqrt(condition number) steps instead of the condition number
        alpha = look = torch.zeros_like(one_hot)
        t = 1.0
        for _ in range(steps):
            new = projected_step(look, gram, eta)
            t_next = (1.0 + (1.0 + 4.0 * t * t) ** 0.5) / 2.0
            look = new + ((t - 1.0) / t_next) * (new - alpha)
            alpha, t = new, t_next
        return alpha

    # the authors' code adds the identity to the kernel (better conditioned, a squared-norm
    # penalty on the slack); the query scores use the plain kernel
    gram = support @ support.T + torch.eye(support.shape[0], dtype=support.dtype,
                                           device=support.device)  # fmt: skip
    eta = 1.0 / (torch.linalg.matrix_norm(gram.detach(), ord=2) + 1e-12)
    alpha = dual(None, gram, eta)
    return (query @ support.T) @ alpha


@dataclass(frozen=True)
class R2D2(ProtoNet):
    """R2D2 (Bertinetto et al., 2019): ridge regression onto one-hot labels in closed form on
    each task's support embeddings, learned scale and bias on its query scores, and a learned
    regulariser: ``meta_params = {'params': embedding, 'head': {'log_lam', 'scale', 'bias'}}``.
    The closed form differentiates exactly (no solver iterations)."""

    lam_init: float = 1.0

    def __post_init__(self) -> None:
        super().__post_init__()
        check_lr(type(self).__name__, "lam_init", self.lam_init)

    def init(
        self,
        generator: torch.Generator | None = None,
        *,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str | None = None,
    ) -> dict[str, Any]:
        meta = super().init(generator, dtype=dtype, device=device)
        head = {"log_lam": float(torch.tensor(self.lam_init).log()), "scale": 1.0, "bias": 0.0}
        meta["head"] = {k: torch.tensor(v, dtype=dtype, device=device) for k, v in head.items()}
        return meta

    def task_logits(self, meta_params: dict[str, Any], task: TaskBatch) -> torch.Tensor:
        n_support = task.support_x.shape[0]
        ways = ways_of(f"{type(self).__name__}(shots, ways)", self.ways, self.shots, n_support)
        emb = self.model.apply(meta_params["params"], torch.cat([task.support_x, task.query_x]))
        emb = emb.flatten(1)
        head = meta_params["head"]
        scores = ridge_logits(
            emb[:n_support], task.support_y, emb[n_support:], ways, head["log_lam"].exp()
        )
        return head["scale"] * scores + head["bias"]


@dataclass(frozen=True)
class MetaOptNet(ProtoNet):
    """MetaOptNet (Lee et al., 2019) with its two heads, ``head='svm'`` (MetaOptNet-SVM, the
    default) or ``head='ridge'`` (MetaOptNet-RR). The SVM head is a Crammer-Singer multi-class
    SVM (:func:`svm_logits`) fitted on each task's support embeddings, its dual solved by
    ``svm_steps`` projected gradient steps and differentiated implicitly; the ridge head is
    ridge regression onto one-hot labels with the fixed regulariser ``lam`` (50 in the authors'
    code), in closed form (:func:`ridge_logits`). Both have a learned scale on their query
    scores, as the authors' code has: ``meta_params = {'params': embedding, 'head': {'scale'}}``.
    """

    c: float = 0.1
    svm_steps: int = 200
    head: str = "svm"
    lam: float = 50.0

    def __post_init__(self) -> None:
        super().__post_init__()
        name = type(self).__name__
        check_lr(name, "c", self.c)
        check_steps(name, "svm_steps", self.svm_steps)
        check_lr(name, "lam", self.lam)
        if self.head not in ("svm", "ridge"):
            raise ValueError(f"{name}(head): {self.head!r} is not 'svm' or 'ridge'.")

    def not_compilable(self) -> str:
        return NOT_COMPILABLE if self.head == "svm" else ""

    def init(
        self,
        generator: torch.Generator | None = None,
        *,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str | None = None,
    ) -> dict[str, Any]:
        meta = super().init(generator, dtype=dtype, device=device)
        meta["head"] = {"scale": torch.tensor(1.0, dtype=dtype, device=device)}
        return meta

    def task_logits(self, meta_params: dict[str, Any], task: TaskBatch) -> torch.Tensor:
        n_support = task.support_x.shape[0]
        ways = ways_of(f"{type(self).__name__}(shots, ways)", self.ways, self.shots, n_support)
        emb = self.model.apply(meta_params["params"], torch.cat([task.support_x, task.query_x]))
        emb = emb.flatten(1)
        support, query = emb[:n_support], emb[n_support:]
        if self.head == "ridge":
            scores = ridge_logits(support, task.support_y, query, ways, self.lam)
        else:
            scores = svm_logits(support, task.support_y, query, ways, self.c, self.svm_steps)
        return meta_params["head"]["scale"] * scores
