"""Matrix-free linear solvers on pytrees, for implicit differentiation.

A system ``A x = b`` is given by ``matvec(x) -> A x`` on trees shaped like ``b`` (a Hessian-vector
product, say) and solved without forming ``A``. Every solver:

- takes ``ridge`` (solve ``(A + ridge I) x = b``: damping for an ill-conditioned or indefinite
  ``A``), a tolerance on the relative residual ``||b - A x|| / ||b||`` and an iteration cap;
- runs a fixed number of iterations with converged systems frozen by masking, and no Python
  branch on a tensor's value, so it runs under ``vmap`` (many systems at once) and
  ``torch.compile``; eagerly it stops as soon as the residual is small enough;
- returns ``(x, SolveInfo)``: the solution and its final relative residual, so a caller can
  report it in its metrics.

``cg`` (conjugate gradient) is for a symmetric, ideally positive-definite ``A``: it watches the
curvature ``p·Ap`` along its search directions and, where one is not positive, says which
damping would make the system definite. ``normal_cg`` solves a non-symmetric system
through ``AᵀA x = Aᵀb`` (``Aᵀ`` by a vector-Jacobian product of ``matvec``), ``bicgstab`` solves
it directly, ``neumann`` sums the series ``x = α Σ (I - α A)^k b`` (for ``||I - αA|| < 1``), and
``dense`` forms ``A`` column by column and solves exactly (small systems, and tests).
"""

from __future__ import annotations

import functools
import warnings
from collections.abc import Callable
from typing import Any, NamedTuple

import torch

from metafunc import tree as mt
from metafunc._transforms import under_vmap

__all__ = ["SolveInfo", "bicgstab", "cg", "dense", "neumann", "normal_cg"]

MatVec = Callable[[Any], Any]
_WARNED: set[str] = set()


class SolveInfo(NamedTuple):
    """What a linear solve reached: ``residual`` (``||b - (A + ridge I) x|| / ||b||``, 0-d),
    ``iterations`` (matrix-vector products taken) and ``curvature`` (for ``cg``: the smallest
    ``p·Ap / p·p`` met, whose sign tells whether ``A`` was definite; ``nan`` for the others)."""

    residual: torch.Tensor
    iterations: int
    curvature: torch.Tensor


def _eager() -> bool:
    """Whether solver loops may stop early and checks may read values: not under ``vmap``
    (whose batched values a Python branch cannot read) nor while ``torch.compile`` traces."""
    return not torch.compiler.is_compiling() and not under_vmap()


def _damped(matvec: MatVec, ridge: float) -> MatVec:
    if ridge == 0:
        return matvec
    return lambda v: mt.axpy(ridge, v, matvec(v))


def _safe_div(a: torch.Tensor, b: torch.Tensor, where: torch.Tensor) -> torch.Tensor:
    """``a / b`` where ``where``, else 0, with no division by zero anywhere."""
    return torch.where(where, a / torch.where(where, b, torch.ones_like(b)), torch.zeros_like(a))


def _keep_where(mask: torch.Tensor, new: torch.Tensor, old: torch.Tensor) -> torch.Tensor:
    return torch.where(mask, new, old)


def _residual(matvec: MatVec, b: Any, x: Any) -> torch.Tensor:
    b_norm = mt.global_norm(b)
    r_norm = mt.global_norm(mt.sub(b, matvec(x)))
    return _safe_div(r_norm, b_norm, b_norm > 0)


def _check_args(call: str, b: Any, tol: float, maxiter: int, ridge: float) -> None:
    mt.validate(b, call=call, name="b")
    if not (isinstance(tol, int | float) and tol >= 0):
        raise ValueError(f"{call}: tol must be a float >= 0, got {tol!r}.")
    if isinstance(maxiter, bool) or not isinstance(maxiter, int) or maxiter < 1:
        raise ValueError(f"{call}: maxiter must be an int >= 1, got {maxiter!r}.")
    if not (isinstance(ridge, int | float) and ridge >= 0):
        raise ValueError(f"{call}: ridge must be a float >= 0, got {ridge!r}.")


def cg(
    matvec: MatVec,
    b: Any,
    *,
    tol: float = 1e-10,
    maxiter: int = 100,
    ridge: float = 0.0,
    strict: bool = False,
) -> tuple[Any, SolveInfo]:
    """Conjugate gradient for a symmetric ``A`` (a Hessian), from ``x = 0``: at most ``maxiter``
    products, until the relative residual is ``tol``.

    CG is made for a positive-definite ``A``. It watches the curvature ``p·Ap / p·p`` of its
    search directions: a non-positive one means ``A + ridge I`` is indefinite or singular,
    where CG may still converge (a symmetric system without breakdown) or wander. Eagerly that
    warns once (``strict``: raises ``ValueError``), naming the curvature met and the ``ridge``
    that would make that direction positive; a zero curvature (breakdown) freezes the iterate,
    so the result is never NaN.
    """
    call = "linalg.cg(matvec, b)"
    _check_args(call, b, tol, maxiter, ridge)
    op = _damped(matvec, ridge)
    x = mt.zeros_like(b)
    r = p = b
    rs = mt.vdot(r, r)
    stop = (tol * tol) * rs
    curvature = torch.full_like(rs, float("inf"))
    steps = 0
    for steps in range(1, maxiter + 1):  # noqa: B007 - steps is reported
        ap = op(p)
        p_ap = mt.vdot(p, ap)
        p_p = mt.vdot(p, p)
        active = (rs > stop) & (p_ap != 0)
        seen = _safe_div(p_ap, p_p, p_p > 0)
        curvature = torch.where(active, torch.minimum(curvature, seen), curvature)
        alpha = _safe_div(rs, p_ap, active)
        x = mt.axpy(alpha, p, x)
        r = mt.axpy(-alpha, ap, r)
        rs_new = mt.vdot(r, r)
        p = mt.axpy(_safe_div(rs_new, rs, active), p, r)
        rs = torch.where(active, rs_new, rs)
        if _eager() and not bool(((rs > stop) & (p_ap != 0)).any()):
            break
    info = SolveInfo(_residual(op, b, x), steps, curvature)
    if _eager():
        _check_solution(call, x, info, ridge, strict)
    return x, info


def _check_solution(call: str, x: Any, info: SolveInfo, ridge: float, strict: bool) -> None:
    """Name an indefinite system with the damping that would fix it (warn once, or raise with
    ``strict``), and refuse a non-finite solution."""
    if not all(bool(torch.isfinite(v.detach()).all()) for v in mt.leaves(x)):
        raise ValueError(
            f"{call}: the solution is not finite (relative residual "
            f"{float(info.residual.detach()):.3g}); "
            "the system is singular or badly conditioned: damp it with ridge=..."
        )
    worst = float(info.curvature.detach().min())
    reached = float(info.residual.detach())
    if worst > 0:
        return
    message = (
        f"{call}: the system is not positive definite: a search direction has curvature "
        f"p·Ap / p·p = {worst:.3g} (with ridge={ridge:g}); the relative residual reached is "
        f"{reached:.3g}. Damp it with a ridge above the most negative eigenvalue's "
        f"magnitude, so at least ridge > {ridge + abs(worst):.3g} (try ridge="
        f"{ridge + 2 * abs(worst) + 1e-12:.3g}); or use normal_cg or bicgstab for a "
        "non-symmetric system."
    )
    if strict:
        raise ValueError(message)
    if "cg" not in _WARNED:
        _WARNED.add("cg")
        warnings.warn(message, RuntimeWarning, stacklevel=3)


def normal_cg(
    matvec: MatVec, b: Any, *, tol: float = 1e-10, maxiter: int = 100, ridge: float = 0.0
) -> tuple[Any, SolveInfo]:
    """CG on the normal equations ``AᵀA x = Aᵀb`` for any non-singular ``A``; ``Aᵀ`` is the
    vector-Jacobian product of ``matvec`` (a linear map is its own Jacobian). ``tol`` bounds the
    residual of the original system, ``||b - A x|| / ||b||``."""
    call = "linalg.normal_cg(matvec, b)"
    _check_args(call, b, tol, maxiter, ridge)
    op = _damped(matvec, ridge)
    _, transpose = torch.func.vjp(op, mt.zeros_like(b))  # type: ignore[misc]

    def normal(v: Any) -> Any:
        return transpose(op(v))[0]

    x, info = cg(normal, transpose(b)[0], tol=tol, maxiter=maxiter)
    return x, SolveInfo(
        _residual(op, b, x), info.iterations, torch.full_like(info.residual, torch.nan)
    )


def bicgstab(
    matvec: MatVec, b: Any, *, tol: float = 1e-10, maxiter: int = 100, ridge: float = 0.0
) -> tuple[Any, SolveInfo]:
    """BiCGSTAB (van der Vorst, 1992) for a non-symmetric ``A``, from ``x = 0``: two products an
    iteration, no transpose. A breakdown (a zero inner product) freezes the iterate."""
    call = "linalg.bicgstab(matvec, b)"
    _check_args(call, b, tol, maxiter, ridge)
    op = _damped(matvec, ridge)
    x = mt.zeros_like(b)
    r = r_hat = p = b
    rho = mt.vdot(r_hat, r)
    stop = (tol * tol) * mt.vdot(b, b)
    steps = 0
    for steps in range(1, maxiter + 1):  # noqa: B007 - steps is reported
        active = mt.vdot(r, r) > stop
        v = op(p)
        r_hat_v = mt.vdot(r_hat, v)
        active = active & (r_hat_v != 0)
        alpha = _safe_div(rho, r_hat_v, active)
        s = mt.axpy(-alpha, v, r)
        t = op(s)
        t_t = mt.vdot(t, t)
        omega = _safe_div(mt.vdot(t, s), t_t, active & (t_t > 0))
        x = mt.axpy(alpha, p, mt.axpy(omega, s, x))
        r_new = mt.axpy(-omega, t, s)
        r = mt.map(functools.partial(_keep_where, active), r_new, r)
        rho_new = mt.vdot(r_hat, r)
        keep = active & (rho != 0) & (omega != 0)
        beta = _safe_div(rho_new, rho, keep) * _safe_div(alpha, omega, keep)
        p = mt.axpy(1.0, r, mt.scale(beta, mt.axpy(-omega, v, p)))
        rho = torch.where(active, rho_new, rho)
        if _eager() and not bool((mt.vdot(r, r) > stop).any()):
            break
    return x, SolveInfo(_residual(op, b, x), 2 * steps, torch.full_like(rho, torch.nan))


def neumann(
    matvec: MatVec,
    b: Any,
    *,
    alpha: float = 1.0,
    tol: float = 1e-10,
    maxiter: int = 100,
    ridge: float = 0.0,
) -> tuple[Any, SolveInfo]:
    """The truncated Neumann series ``x = α Σ_{k<maxiter} (I - α A)^k b``, which converges when
    the eigenvalues of ``α A`` lie in ``(0, 2)`` (Lorraine et al., 2020, use it for
    hypergradients): cheap, one product a term, no inner products to break down."""
    call = "linalg.neumann(matvec, b)"
    _check_args(call, b, tol, maxiter, ridge)
    op = _damped(matvec, ridge)
    term = mt.scale(alpha, b)
    x = term
    stop = tol * mt.global_norm(x)
    steps = 0
    for steps in range(1, maxiter):  # noqa: B007 - steps is reported
        term = mt.axpy(-alpha, op(term), term)
        x = mt.add(x, term)
        if _eager() and not bool(mt.global_norm(term) > stop):
            break
    return x, SolveInfo(_residual(op, b, x), steps, torch.full_like(stop, torch.nan))


def dense(matvec: MatVec, b: Any, *, ridge: float = 0.0) -> tuple[Any, SolveInfo]:
    """Form ``A + ridge I`` column by column (one product per unknown, batched by ``vmap``) and
    solve it with ``torch.linalg.solve``: exact, for systems of up to a few thousand unknowns
    and as the reference of the iterative solvers."""
    call = "linalg.dense(matvec, b)"
    _check_args(call, b, 0.0, 1, ridge)
    op = _damped(matvec, ridge)
    flat, spec = mt.leaves(b), mt.structure(b)
    sizes = [x.numel() for x in flat]
    vector = torch.cat([x.reshape(-1) for x in flat])

    def unflat(v: torch.Tensor) -> Any:
        parts = torch.split(v, sizes)
        return spec.unflatten([p.reshape(x.shape) for p, x in zip(parts, flat, strict=True)])

    def column(e: torch.Tensor) -> torch.Tensor:
        return torch.cat([y.reshape(-1) for y in mt.leaves(op(unflat(e)))])

    eye = torch.eye(vector.numel(), dtype=vector.dtype, device=vector.device)
    matrix = torch.func.vmap(column)(eye).T  # column j is A e_j
    x = unflat(torch.linalg.solve(matrix, vector))
    return x, SolveInfo(_residual(op, b, x), vector.numel(), torch.full_like(vector[0], torch.nan))
