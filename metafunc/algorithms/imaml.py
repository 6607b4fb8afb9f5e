"""Implicit MAML (Rajeswaran, Finn, Kakade & Levine, 2019): meta-gradients by the implicit
function theorem, with memory independent of the number of inner steps."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from metafunc import linalg
from metafunc import tree as mt
from metafunc.algorithms._common import INNER_OPTIMIZERS, make_inner_optimizer, task_means
from metafunc.algorithms.base import Algorithm, loss_fn_of, task_metrics
from metafunc.algorithms.checks import check_choice, check_lr, check_positive, check_steps
from metafunc.data.batch import TaskBatch
from metafunc.implicit import NOT_COMPILABLE, custom_root
from metafunc.inner import adapt, grad_with_aux

__all__ = ["IMAML"]


@dataclass(frozen=True)
class IMAML(Algorithm):
    """iMAML: a proximally regularised inner loop and the implicit meta-gradient.

    ``meta_params = {'params': θ}``. Each task starts at ``φ = θ`` and takes ``inner_steps``
    first-order steps of ``inner_optimizer`` (``'sgd'`` or ``'adam'``) at ``inner_lr`` on
    ``L_support(φ) + lam/2 ||φ − θ||²``; nothing is kept for backward between steps, so memory
    does not grow with ``inner_steps``. At the adapted ``φ`` the task's meta-gradient is

        v = (I + H / lam)^-1 ∇_φ L_query(φ),   H = ∇²_φ L_support(φ),

    solved by at most ``cg_steps`` iterations of conjugate gradient (relative tolerance
    ``cg_tol``) with Hessian-vector products, through :func:`metafunc.implicit.custom_root`.
    :meth:`meta_grad` returns the mean of ``v`` over tasks, vmapped with :func:`metafunc.task_map`;
    :meth:`meta_loss` is the adapted query loss, detached (its gradient is not the
    meta-gradient). The outer optimizer is Adam.

    The system is indefinite where ``H`` has eigenvalues below ``−lam`` (an MSE task with large
    residuals, such as the sinusoid): keep ``lam`` above them, or damp it as the authors' code
    (imaml_dev, ``matrix_evaluator``) does, ``(1 + regu_coef) I + H / (lam + lam_damping)``, by
    default there ``regu_coef=1, lam_damping=10``; here both default to 0, the paper's formula.
    ``inner_optimizer='adam'`` keeps the inner loop from diverging on such tasks.

    Omniglot as the authors' script: ``IMAML(conv4(5), lam=1.0, inner_lr=0.01,
    inner_steps=16, cg_steps=5, regu_coef=1.0, lam_damping=10.0)``, meta-batch 16, outer 1e-2.
    """

    lam: float = 2.0
    inner_lr: float = 0.1
    inner_steps: int = 16
    inner_optimizer: str = "sgd"
    cg_steps: int = 5
    cg_tol: float = 1e-10
    regu_coef: float = 0.0
    lam_damping: float = 0.0

    def __post_init__(self) -> None:
        super().__post_init__()
        name = type(self).__name__
        check_positive(
            name,
            "lam",
            self.lam,
            " The proximal weight λ keeps φ near θ and makes I + H/λ invertible; try lam=2.0.",
        )
        check_lr(name, "inner_lr", self.inner_lr)
        check_steps(name, "inner_steps", self.inner_steps)
        check_choice(name, "inner_optimizer", self.inner_optimizer, INNER_OPTIMIZERS)
        check_steps(name, "cg_steps", self.cg_steps)
        check_lr(name, "cg_tol", self.cg_tol)
        check_lr(name, "regu_coef", self.regu_coef)
        check_lr(name, "lam_damping", self.lam_damping)

    # -- one task ----------------------------------------------------------------------------

    def inner_loop(self, theta: Any, steps: int, observe: Any = None) -> Any:
        """``adapt`` on the proximal objective around ``theta`` (detached: no outer graph)."""
        anchor = mt.detach(theta)

        def proximal_loss(phi: Any, task: TaskBatch) -> torch.Tensor:
            distance = mt.sub(phi, anchor)
            return self.support_loss(phi, task) + 0.5 * self.lam * mt.vdot(distance, distance)

        optimizer = make_inner_optimizer(self.inner_optimizer, self.inner_lr)
        return adapt(proximal_loss, optimizer, steps, first_order=True, observe=observe)

    def adapted(self, theta: Any, task: TaskBatch) -> Any:
        """The task's adapted parameters ``φ`` (detached)."""
        phi, _ = self.inner_loop(theta, self.inner_steps)(mt.detach(theta), task)
        return mt.detach(phi)

    def task_grad(
        self, theta: Any, task: TaskBatch
    ) -> tuple[Any, torch.Tensor, dict[str, torch.Tensor]]:
        """``(v, query loss, metrics)`` for one task: ``v = (I + H/λ)^-1 ∇ L_query(φ)``.

        ``φ(θ)`` is a root of the proximal objective's gradient ``∇L_support(φ) + λ(φ - θ)``,
        differentiated by :func:`metafunc.implicit.custom_root`: its backward solves
        ``(H + λ I) u = ∇L_query(φ)`` by conjugate gradient and gives ``θ`` the gradient
        ``λ u``. The authors' damping (``regu_coef``, ``lam_damping``) solves
        ``(H + (λ + lam_damping)(1 + regu_coef) I) u`` instead, with ``v = (λ + lam_damping) u``.
        """
        damped = (self.lam + self.lam_damping) * (1.0 + self.regu_coef)

        def optimality(phi: Any, th: Any) -> Any:
            return mt.axpy(self.lam, mt.sub(phi, th), torch.func.grad(self.support_loss)(phi, task))

        root = custom_root(
            optimality, linalg.cg, tol=self.cg_tol, maxiter=self.cg_steps,
            ridge=damped - self.lam,
        )(lambda init, th: self.adapted(th, task))  # fmt: skip

        def query_loss(th: Any) -> tuple[torch.Tensor, torch.Tensor]:
            preds = self.predict(root(None, th), task)
            return loss_fn_of(self.loss)(preds, task.query_y), preds.detach()

        v, preds = grad_with_aux(query_loss, theta)  # top level: the CG keeps no graph
        if self.lam_damping:
            v = mt.scale((self.lam + self.lam_damping) / self.lam, v)
        metrics = task_metrics(self.loss, preds, task.query_y)
        return v, metrics["loss"], metrics

    def task_loss(self, theta: Any, task: TaskBatch) -> tuple[torch.Tensor, Any]:
        preds = self.predict(self.adapted(theta, task), task)
        metrics = task_metrics(self.loss, preds, task.query_y)
        return metrics["loss"], metrics

    def not_compilable(self) -> str:
        return NOT_COMPILABLE

    # -- the meta-batch ----------------------------------------------------------------------

    def meta_grad(
        self, meta_params: Any, batch: TaskBatch, *, iteration: int = 0
    ) -> tuple[Any, torch.Tensor, dict[str, torch.Tensor]]:
        """``({'params': mean_tasks(v)}, adapted query loss, metrics)``, all detached."""
        with torch.no_grad():  # torch.func transforms inside still differentiate
            theta = mt.detach(meta_params["params"])
            vs, losses, metrics = self.map_tasks(self.task_grad)(theta, batch)
        grads = {"params": mt.map(lambda v: v.mean(0), vs)}
        return grads, *task_means(losses, metrics)

    def meta_loss(
        self, meta_params: Any, batch: TaskBatch, *, iteration: int = 0
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """The adapted query loss, detached (use :meth:`meta_grad` for the meta-gradient)."""
        with torch.no_grad():
            losses, metrics = self.map_tasks(self.task_loss)(
                mt.detach(meta_params["params"]), batch
            )
        return task_means(losses, metrics)

    def adapt_and_predict(self, meta_params: Any, batch: TaskBatch, steps: int) -> torch.Tensor:
        check_steps(f"{type(self).__name__}.adapt_and_predict", "steps", steps, minimum=0)

        def one(mp: dict[str, Any], task: TaskBatch) -> torch.Tensor:
            theta = mt.detach(mp["params"])
            return self.inner_loop(theta, steps, observe=self.predict)(theta, task)[1]["observed"]

        return self.map_tasks(one)(meta_params, batch)
