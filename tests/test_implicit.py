"""Implicit differentiation (``metafunc.implicit``) and the linear solvers (``metafunc.linalg``)
against closed forms, dense solves and unrolled differentiation, in float64."""

from __future__ import annotations

import warnings

import pytest
import torch
import torch.nn.functional as F
from torch.func import grad, vmap

from metafunc import linalg, optim, tree
from metafunc.implicit import custom_fixed_point, custom_root, hypergradient

DT = torch.float64


def problem(seed: int = 0) -> tuple[torch.Tensor, ...]:
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(30, 6, generator=gen, dtype=DT)
    y = torch.randn(30, generator=gen, dtype=DT)
    xv = torch.randn(20, 6, generator=gen, dtype=DT)
    yv = torch.randn(20, generator=gen, dtype=DT)
    return x, y, xv, yv


def ridge_optimality(w, lam, x, y):
    return x.T @ (x @ w - y) + lam * w


@custom_root(ridge_optimality, tol=1e-13)
def ridge(init, lam, x, y):
    return torch.linalg.solve(x.T @ x + lam * torch.eye(x.shape[1], dtype=DT), x.T @ y)


def test_ridge_hypergradient_equals_the_closed_form():
    x, y, xv, yv = problem()
    lam = torch.tensor(0.7, dtype=DT)
    got = grad(lambda lam: ((xv @ ridge(None, lam, x, y) - yv) ** 2).mean())(lam)
    # d/dλ of w = (XᵀX + λI)⁻¹ Xᵀy is -(XᵀX + λI)⁻¹ w; the chain rule by hand
    a = x.T @ x + lam * torch.eye(6, dtype=DT)
    w = torch.linalg.solve(a, x.T @ y)
    dw = -torch.linalg.solve(a, w)
    want = (2 / len(yv)) * (xv @ w - yv) @ (xv @ dw)
    assert abs(float(got - want)) <= 1e-10 * abs(float(want))
    # through torch.autograd as well, and with respect to the data
    lam2 = lam.clone().requires_grad_()
    (auto,) = torch.autograd.grad(((xv @ ridge(None, lam2, x, y) - yv) ** 2).mean(), lam2)
    assert abs(float(auto - want)) <= 1e-10 * abs(float(want))
    gx = grad(lambda xx: ridge(None, lam, xx, y).sum())(x)
    gx_ref = grad(lambda xx: torch.linalg.solve(xx.T @ xx + lam * torch.eye(6, dtype=DT),
                                                xx.T @ y).sum())(x)  # fmt: skip
    assert float((gx - gx_ref).norm() / gx_ref.norm()) <= 1e-10


def test_custom_root_under_vmap_equals_the_per_task_loop():
    x, y, xv, yv = problem(1)
    lams = torch.rand(8, generator=torch.Generator().manual_seed(2), dtype=DT) + 0.1

    def val(lam):
        return ((xv @ ridge(None, lam, x, y) - yv) ** 2).mean()

    batched = vmap(grad(val))(lams)
    looped = torch.stack([grad(val)(lam) for lam in lams])
    assert float((batched - looped).abs().max()) <= 1e-12 * float(looped.abs().max())


def test_logistic_regression_on_digits_implicit_equals_unrolled_through_a_converged_loop():
    """Per-feature weight decay of multinomial logistic regression on scikit-learn's digits:
    the implicit hypergradient (CG to 1e-12) against reverse mode through the same converged
    inner loop."""
    datasets = pytest.importorskip("sklearn.datasets")
    digits = datasets.load_digits()
    x = torch.tensor(digits.data, dtype=DT) / 16.0
    y = torch.tensor(digits.target)
    xt, yt, xv, yv = x[:300], y[:300], x[300:600], y[300:600]

    def inner(p, h):
        loss = F.cross_entropy(xt @ p["w"] + p["b"], yt)
        return loss + 0.5 * (torch.exp(h["log_decay"]) * p["w"] ** 2).sum()

    def outer(p, h):
        return F.cross_entropy(xv @ p["w"] + p["b"], yv)

    p0 = {"w": torch.zeros(64, 10, dtype=DT), "b": torch.zeros(10, dtype=DT)}
    h = {"log_decay": torch.full((64, 1), -1.0, dtype=DT)}
    kw = {"steps": 600, "optimizer": optim.sgd(1.0)}
    implicit, info = hypergradient(inner, outer, h, p0, method="implicit", tol=1e-12,
                                   maxiter=500, **kw)  # fmt: skip
    assert float(info.inner_grad_norm) < 1e-8  # the inner loop has converged
    unrolled, _ = hypergradient(inner, outer, h, p0, method="unrolled", **kw)
    err = tree.global_norm(tree.sub(implicit, unrolled)) / tree.global_norm(unrolled)
    assert float(err) <= 1e-6
    truncated, _ = hypergradient(inner, outer, h, p0, method="truncated", truncate=300, **kw)
    first, _ = hypergradient(inner, outer, h, p0, method="first_order", **kw)
    fd, _ = hypergradient(inner, outer, h, p0, method="finite_difference", **kw)
    for approx in (truncated, first, fd):  # approximations: finite and shaped like h
        assert tree.structure(approx) == tree.structure(h)
        assert all(torch.isfinite(v).all() for v in tree.leaves(approx))
    err_t = tree.global_norm(tree.sub(truncated, implicit)) / tree.global_norm(implicit)
    assert float(err_t) < 0.05  # most of the dependence is in the last 300 steps


def test_custom_fixed_point_equals_unrolled_iteration():
    """x = tanh(W x + θ), a contraction: the implicit gradient against backpropagation through
    enough iterations to converge."""
    gen = torch.Generator().manual_seed(4)
    w = 0.3 * torch.randn(5, 5, generator=gen, dtype=DT)
    theta = torch.randn(5, generator=gen, dtype=DT)

    def step(x, theta):
        return torch.tanh(w @ x + theta)

    @custom_fixed_point(step, tol=1e-13)
    def solve(init, theta):
        x = torch.zeros(5, dtype=DT)
        for _ in range(200):
            x = step(x, theta)
        return x

    def unrolled(theta):
        x = torch.zeros(5, dtype=DT)
        for _ in range(200):
            x = step(x, theta)
        return x

    got = grad(lambda t: (solve(None, t) ** 2).sum())(theta)
    want = grad(lambda t: (unrolled(t) ** 2).sum())(theta)
    assert float((got - want).norm() / want.norm()) <= 1e-10


@pytest.mark.parametrize("name", ["cg", "normal_cg", "bicgstab", "neumann"])
def test_each_solver_equals_the_dense_solve_and_reports_its_residual(name):
    gen = torch.Generator().manual_seed(5)
    m = torch.randn(8, 8, generator=gen, dtype=DT)
    spd = m @ m.T + 2 * torch.eye(8, dtype=DT)
    b = {"a": torch.randn(5, generator=gen, dtype=DT), "b": torch.randn(3, generator=gen, dtype=DT)}

    def matvec(v):
        flat = spd @ torch.cat([v["a"], v["b"]])
        return {"a": flat[:5], "b": flat[5:]}

    ref, dense_info = linalg.dense(matvec, b)
    assert float(dense_info.residual) <= 1e-14
    solver = getattr(linalg, name)
    kw = {"alpha": 1 / float(torch.linalg.eigvalsh(spd).max())} if name == "neumann" else {}
    x, info = solver(matvec, b, tol=1e-12, maxiter=5000 if name == "neumann" else 200, **kw)
    assert float(tree.global_norm(tree.sub(x, ref)) / tree.global_norm(ref)) <= 1e-9
    assert float(info.residual) <= 1e-10 and info.iterations >= 1
    with_ridge, _ = solver(matvec, b, tol=1e-12, maxiter=5000 if name == "neumann" else 200,
                           ridge=0.5, **kw)  # fmt: skip
    ref_ridge, _ = linalg.dense(matvec, b, ridge=0.5)
    assert float(tree.global_norm(tree.sub(with_ridge, ref_ridge))) <= 1e-9


def test_solvers_run_under_vmap_over_many_systems():
    gen = torch.Generator().manual_seed(6)
    m = torch.randn(6, 6, generator=gen, dtype=DT)
    spd = m @ m.T + torch.eye(6, dtype=DT)
    bs = torch.randn(4, 6, generator=gen, dtype=DT)
    want = torch.linalg.solve(spd, bs.T).T
    for solver in (linalg.cg, linalg.bicgstab):
        got = vmap(lambda b, s=solver: s(lambda v: spd @ v, b, maxiter=100)[0])(bs)
        assert float((got - want).abs().max()) <= 1e-10


def test_an_indefinite_system_is_named_with_the_damping_that_fixes_it():
    a = torch.diag(torch.tensor([3.0, 1.0, -2.0], dtype=DT))
    b = torch.ones(3, dtype=DT)
    with pytest.raises(ValueError, match=r"not positive definite.*-0.586.*ridge > 0.586"):
        linalg.cg(lambda v: a @ v, b, strict=True)
    x, info = linalg.cg(lambda v: a @ v, b)  # warns (once), and still solves this one
    assert float(info.curvature) < 0 and float(info.residual) <= 1e-10
    _, info = linalg.cg(lambda v: a @ v, b, ridge=2.5)  # above the -2 eigenvalue: definite
    assert float(info.curvature) > 0 and float(info.residual) <= 1e-10
    # a singular system breaks down: frozen, never NaN, eagerly or under vmap
    singular = torch.diag(torch.tensor([1.0, 0.0], dtype=DT))
    x, info = linalg.cg(lambda v: singular @ v, torch.ones(2, dtype=DT))
    assert torch.isfinite(x).all() and float(info.residual) > 0.1
    xs = vmap(lambda bb: linalg.cg(lambda v: singular @ v, bb)[0])(torch.ones(2, 2, dtype=DT))
    assert torch.isfinite(xs).all()


def test_a_solve_that_does_not_converge_warns_once_and_raises_when_strict():
    x, y, xv, yv = problem(3)
    lam = torch.tensor(0.1, dtype=DT)

    for strict in (False, True):

        @custom_root(ridge_optimality, maxiter=1, tol=1e-14, strict=strict)
        def short(init, lam, x, y):
            return torch.linalg.solve(x.T @ x + lam * torch.eye(6, dtype=DT), x.T @ y)

        def val(lam, short=short):
            return ((xv @ short(None, lam, x, y) - yv) ** 2).mean()

        if strict:
            with pytest.raises(RuntimeError, match=r"relative residual .* above tol=1e-14"):
                grad(val)(lam)
        else:
            with pytest.warns(RuntimeWarning, match="linear solve ended at relative residual"):
                grad(val)(lam)
            with warnings.catch_warnings():
                warnings.simplefilter("error")
                grad(val)(lam)  # once


def test_bad_structures_and_hyper_arguments_are_named():
    x, y, _, _ = problem()

    @custom_root(lambda w, lam, x, y: {"w": ridge_optimality(w, lam, x, y)})
    def mismatched(init, lam, x, y):
        return torch.linalg.solve(x.T @ x + lam * torch.eye(6, dtype=DT), x.T @ y)

    with pytest.raises(ValueError, match=r"optimality_fn's output has leaves \['w'\] but the "
                       r"solution has \[''\]"):  # fmt: skip
        grad(lambda lam: mismatched(None, lam, x, y).sum())(torch.tensor(0.5, dtype=DT))
    with pytest.raises(TypeError, match=r"hyper\['decay'\] is a torch.int64 tensor"):
        hypergradient(lambda p, h: (p**2).sum(), lambda p, h: p.sum(),
                      {"decay": torch.tensor(1)}, torch.zeros(2, dtype=DT))  # fmt: skip
    with pytest.raises(ValueError, match="method must be one of"):
        hypergradient(lambda p, h: (p**2).sum(), lambda p, h: p.sum(),
                      torch.ones(1, dtype=DT), torch.zeros(2, dtype=DT),
                      method="magic")  # fmt: skip
