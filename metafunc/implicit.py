"""Implicit differentiation as a part to compose: ``custom_root`` and ``custom_fixed_point``
(as jaxopt has them), and ``hypergradient`` for bilevel problems (implicit, unrolled, truncated,
finite-difference or first-order).

A solver returns ``x*(θ)`` with ``F(x*, θ) = 0`` (for a minimiser, ``F = ∇ₓ inner_loss``). By the
implicit function theorem ``∂x*/∂θ = -(∂F/∂x)⁻¹ ∂F/∂θ``, so the gradient of anything computed from
``x*`` needs one linear solve with ``(∂F/∂x)ᵀ`` (matrix-free, :mod:`metafunc.linalg`) and one
vector-Jacobian product of ``F`` with respect to ``θ``: no graph through the solver's
iterations, so memory does not grow with them.

Example (ridge regression's weights, differentiable in the regularisation ``lam``)::

    def optimality(w, lam, x, y):              # the gradient of the inner objective
        return x.T @ (x @ w - y) + lam * w

    @custom_root(optimality)
    def ridge(init, lam, x, y):
        return torch.linalg.solve(x.T @ x + lam * torch.eye(x.shape[1]), x.T @ y)

    w = ridge(None, lam, x, y)                  # gradients flow to lam (and x, y)
"""

from __future__ import annotations

import functools
import warnings
from collections.abc import Callable
from typing import Any, NamedTuple

import optree
import torch

from metafunc import linalg
from metafunc import tree as mt
from metafunc._transforms import under_vmap
from metafunc.inner import adapt, grad_with_aux
from metafunc.optim import GradientTransformation, sgd

__all__ = [
    "HYPERGRADIENTS",
    "NOT_COMPILABLE",
    "HyperInfo",
    "custom_fixed_point",
    "custom_root",
    "hypergradient",
]

Solve = Callable[..., tuple[Any, linalg.SolveInfo]]
#: Why an algorithm built on :func:`custom_root` does not compile (HISTORY "what stops
#: custom_root from compiling").
NOT_COMPILABLE = (
    "custom_root's implicit backward is an autograd.Function made per call, which "
    "torch.compile cannot trace"
)
_WARNED: set[str] = set()


def _check_structure(call: str, what: str, got: Any, want: Any) -> None:
    if mt.structure(got) != mt.structure(want):
        raise ValueError(
            f"{call}: {what} has leaves {mt.paths(got)} but the solution has {mt.paths(want)}; "
            "the optimality function must return a tree shaped like the solution (one residual "
            "per unknown)."
        )


def custom_root(
    optimality_fn: Callable[..., Any],
    solve: Solve = linalg.cg,
    *,
    tol: float = 1e-10,
    maxiter: int = 100,
    ridge: float = 0.0,
    strict: bool = False,
    symmetric: bool = False,
) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """Make ``solver(init, *args) -> x`` differentiable in ``args`` by the implicit function
    theorem, given ``optimality_fn(x, *args) -> residual`` (a tree shaped like ``x``) that is
    zero at the solver's output.

    ``args`` are any pytrees; their floating tensors receive gradients, everything else (ints,
    labels, Python values) is passed through. The solver runs without a graph (its own
    iterations are never differentiated). The backward solves ``(∂F/∂x)ᵀ u = -ḡ`` with ``solve``
    (``linalg.cg`` for a symmetric ``∂F/∂x``, a Hessian; ``normal_cg`` or ``bicgstab`` for another)
    at ``tol``, ``maxiter`` and ``ridge`` (damping, added to ``∂F/∂x``), then gives ``args`` the
    vector-Jacobian product of ``F`` with ``u``. Works under ``torch.autograd``,
    ``torch.func.grad``, ``vjp`` and ``vmap`` (over many problems at once).

    With ``symmetric`` (``∂F/∂x`` symmetric, as the Hessian of a minimisation is), the backward
    multiplies by ``∂F/∂x`` by forward-over-reverse differentiation (``jvp`` of ``F``), usually
    faster than the reverse-over-reverse product it takes otherwise.

    A backward solve that ends above ``tol`` warns once (with ``strict``, raises), naming the
    residual and the tolerance; it is checked outside ``vmap`` (whose batched values cannot be
    read), and so are the conjugate gradient's checks of definiteness.
    """
    call = "custom_root(optimality_fn)"
    if not callable(optimality_fn):
        raise TypeError(f"{call}: optimality_fn is a {type(optimality_fn).__qualname__}.")
    solve_kw = {"tol": tol, "maxiter": maxiter, "ridge": ridge}
    if solve is linalg.dense:
        solve_kw = {"ridge": ridge}

    def decorator(solver: Callable[..., Any]) -> Callable[..., Any]:
        name = getattr(solver, "__qualname__", "solver")
        where = f"custom_root(...)({name})"

        @functools.wraps(solver)
        def wrapped(init: Any, *args: Any) -> Any:
            flat: list[Any]
            flat, spec = optree.tree_flatten(args)  # type: ignore[arg-type]
            hyper = [i for i, a in enumerate(flat) if _differentiable(a)]
            out_spec: list[Any] = []

            def rebuild(tensors: tuple[torch.Tensor, ...]) -> tuple[Any, ...]:
                values = list(flat)
                for i, t in zip(hyper, tensors, strict=True):
                    values[i] = t
                return tuple(optree.tree_unflatten(spec, values))

            class Root(torch.autograd.Function):
                generate_vmap_rule = True

                @staticmethod
                def forward(*tensors: torch.Tensor) -> Any:
                    x = solver(init, *rebuild(tensors))
                    leaves, s = optree.tree_flatten(x)
                    out_spec.append(s)
                    return tuple(leaves)

                @staticmethod
                def setup_context(ctx: Any, inputs: Any, output: Any) -> None:
                    ctx.save_for_backward(*inputs, *output)
                    ctx.count = len(inputs)

                @staticmethod
                def backward(ctx: Any, *grads: torch.Tensor) -> Any:
                    saved = ctx.saved_tensors
                    tensors, x_leaves = saved[: ctx.count], saved[ctx.count :]
                    x = out_spec[0].unflatten(x_leaves)
                    cotangent = out_spec[0].unflatten(
                        [
                            torch.zeros_like(x) if g is None else g
                            for g, x in zip(grads, x_leaves, strict=True)
                        ]
                    )
                    held = rebuild(tuple(tensors))

                    def at(z: Any) -> Any:
                        return optimality_fn(z, *held)

                    residual, transpose = torch.func.vjp(at, x)  # type: ignore[misc]
                    _check_structure(where, "optimality_fn's output", residual, x)

                    def product(v: Any) -> Any:
                        if symmetric:  # forward-over-reverse
                            return torch.func.jvp(at, (x,), (v,))[1]
                        return transpose(v)[0]

                    u, info = solve(product, mt.scale(-1.0, cotangent), **solve_kw)
                    _report(where, info, tol, strict)
                    _, pull = torch.func.vjp(lambda *ts: optimality_fn(x, *rebuild(ts)), *tensors)  # type: ignore[misc]
                    return pull(u)

            leaves = Root.apply(*(flat[i] for i in hyper))
            return out_spec[-1].unflatten(list(leaves))

        return wrapped

    return decorator


def custom_fixed_point(
    fixed_point_fn: Callable[..., Any],
    solve: Solve = linalg.normal_cg,
    **options: Any,
) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """:func:`custom_root` for a solver of ``x = T(x, *args)``: the root of ``T(x) - x``, whose
    Jacobian ``∂T/∂x - I`` is in general not symmetric (hence ``normal_cg`` by default)."""

    def optimality(x: Any, *args: Any) -> Any:
        return mt.sub(fixed_point_fn(x, *args), x)

    return custom_root(optimality, solve, **options)


def _differentiable(leaf: Any) -> bool:
    return isinstance(leaf, torch.Tensor) and (leaf.is_floating_point() or leaf.is_complex())


def _report(where: str, info: linalg.SolveInfo, tol: float, strict: bool) -> None:
    """Warn once (or raise) for a backward solve that ended above its tolerance."""
    if under_vmap() or torch.compiler.is_compiling():
        return
    residual = float(info.residual.detach())
    if residual <= max(tol, 1e-15) * 10:
        return
    message = (
        f"{where}: the implicit gradient's linear solve ended at relative residual "
        f"{residual:.3g} after {info.iterations} products, above tol={tol:g}; raise maxiter, "
        "damp the system (ridge=...), or check that the solver's output is a root of "
        "optimality_fn."
    )
    if strict:
        raise RuntimeError(message)
    if where not in _WARNED:
        _WARNED.add(where)
        warnings.warn(message, RuntimeWarning, stacklevel=4)


HYPERGRADIENTS = ("implicit", "unrolled", "truncated", "finite_difference", "first_order")


class HyperInfo(NamedTuple):
    """What :func:`hypergradient` computed along the way: ``params`` (the inner solution it
    differentiated at), ``outer_loss`` (at it), ``inner_grad_norm`` (``||∇ inner_loss||`` there:
    how close to a minimum the inner solve got, which the implicit gradient assumes)."""

    params: Any
    outer_loss: torch.Tensor
    inner_grad_norm: torch.Tensor


def hypergradient(
    inner_loss: Callable[[Any, Any], torch.Tensor],
    outer_loss: Callable[[Any, Any], torch.Tensor],
    hyper: Any,
    params: Any,
    *,
    method: str = "implicit",
    optimizer: GradientTransformation | None = None,
    steps: int = 100,
    truncate: int = 10,
    solve: Solve = linalg.cg,
    tol: float = 1e-10,
    maxiter: int = 100,
    ridge: float = 0.0,
    epsilon: float = 1e-2,
    xi: float = 1e-2,
) -> tuple[Any, HyperInfo]:
    """The gradient with respect to ``hyper`` of ``outer_loss(params*(hyper), hyper)``, where
    ``params*`` minimises ``inner_loss(·, hyper)`` by ``steps`` steps of ``optimizer`` (default
    ``sgd(0.1)``) from ``params``; one bilevel problem, five ways of differentiating it, so they
    can be compared on one problem:

    - ``'implicit'``: the implicit function theorem at the inner solution (:func:`custom_root`
      with ``∇ inner_loss`` as the optimality condition; ``solve``, ``tol``, ``maxiter``,
      ``ridge`` for its linear system): exact at a minimum, memory flat in ``steps``;
    - ``'unrolled'``: reverse mode through all ``steps`` inner steps (:func:`metafunc.adapt`);
    - ``'truncated'``: through the last ``truncate`` steps only;
    - ``'finite_difference'``: DARTS' approximation (Liu et al., 2019): the direct gradient minus
      ``xi`` times the mixed second derivative along ``v = ∇_params outer``, by central
      differences of ``∇_hyper inner_loss`` at ``params* ± ε v`` (``ε = epsilon / ||v||``);
    - ``'first_order'``: the direct gradient ``∂ outer_loss / ∂ hyper`` alone.

    Returns ``(hypergradient shaped like hyper, HyperInfo)``.
    """
    call = f"hypergradient(inner_loss, outer_loss, hyper, params, method={method!r})"
    if method not in HYPERGRADIENTS:
        raise ValueError(f"{call}: method must be one of {HYPERGRADIENTS}.")
    mt.validate(hyper, call=call, name="hyper")
    mt.validate(params, call=call, name="params")
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
        raise ValueError(f"{call}: steps must be an int >= 1, got {steps!r}.")
    opt = sgd(0.1) if optimizer is None else optimizer
    hyper = mt.detach(hyper)

    def run(p: Any, h: Any, k: int, *, first_order: bool) -> Any:
        inner = adapt(lambda q, hh: inner_loss(q, hh), opt, k, first_order=first_order)
        return inner(p, h)[0]

    with torch.no_grad():
        solution = mt.detach(run(mt.detach(params), hyper, steps, first_order=True))
    inner_grad = torch.func.grad(inner_loss)(solution, hyper)

    def info_at(p: Any) -> HyperInfo:
        return HyperInfo(p, outer_loss(p, hyper).detach(), mt.global_norm(inner_grad))

    if method == "implicit":
        root = custom_root(
            lambda p, h: torch.func.grad(inner_loss)(p, h),
            solve, tol=tol, maxiter=maxiter, ridge=ridge,
        )(lambda init, h: solution)  # fmt: skip
        # at the top level by torch.autograd.grad, whose backward (the solver's iterations
        # included) builds no graph of itself
        grads, _ = grad_with_aux(lambda h: (outer_loss(root(None, h), h), None), hyper)
        return grads, info_at(solution)
    if method in ("unrolled", "truncated"):
        start, k = mt.detach(params), steps
        if method == "truncated":
            k = min(truncate, steps)
            with torch.no_grad():
                start = mt.detach(run(start, hyper, steps - k, first_order=True))
        grads = torch.func.grad(lambda h: outer_loss(run(start, h, k, first_order=False), h))(hyper)
        return grads, info_at(solution)
    direct = torch.func.grad(outer_loss, argnums=1)(solution, hyper)
    if method == "first_order":
        return direct, info_at(solution)
    v = torch.func.grad(outer_loss)(solution, hyper)
    eps = epsilon / float(mt.global_norm(v)) if float(mt.global_norm(v)) > 0 else epsilon
    plus = torch.func.grad(inner_loss, argnums=1)(mt.axpy(eps, v, solution), hyper)
    minus = torch.func.grad(inner_loss, argnums=1)(mt.axpy(-eps, v, solution), hyper)
    grads = mt.axpy(-xi / (2 * eps), mt.sub(plus, minus), direct)
    return grads, info_at(solution)
