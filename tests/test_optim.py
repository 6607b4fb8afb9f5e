"""metafunc.optim against torch.optim, hand-written update rules, and finite differences (float64).

Every optimizer runs 20 steps on a tiny two-layer classifier whose gradients are recomputed from
the current parameters at each step, next to the matching ``torch.optim`` optimizer driven by
``loss.backward()``; the parameter trees must agree after every step.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Iterator
from typing import Any

import optree
import pytest
import torch
import torch.nn.functional as F
from torch.optim import lr_scheduler

import metafunc.tree as mt
from metafunc import optim
from metafunc.optim import schedules, transforms

Tree = Any
Loss = Callable[[Tree], torch.Tensor]
STEPS = 20
RTOL, ATOL = 1e-10, 1e-12


# --------------------------------------------------------------------------------------------
# A small multi-leaf problem and two ways of optimising it
# --------------------------------------------------------------------------------------------


@pytest.fixture(autouse=True, scope="module")
def _one_thread() -> Iterator[None]:
    """Tiny tensors: intra-op threads only contend (70x slower on 2 busy cores)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def problem(gen: torch.Generator) -> tuple[Tree, Loss]:
    """A 3 -> 5 -> 3 tanh classifier in float64 and its cross-entropy on a fixed batch."""

    def r(*shape: int, s: float = 1.0) -> torch.Tensor:
        return s * torch.randn(*shape, generator=gen, dtype=torch.float64)

    params = {
        "layer": {"weight": r(5, 3, s=0.7), "bias": r(5, s=0.1)},
        "head": {"weight": r(3, 5, s=0.7), "bias": r(3, s=0.1)},
    }
    x = r(16, 3)
    y = torch.randint(0, 3, (16,), generator=gen)

    def loss(p: Tree) -> torch.Tensor:
        h = torch.tanh(x @ p["layer"]["weight"].T + p["layer"]["bias"])
        return F.cross_entropy(h @ p["head"]["weight"].T + p["head"]["bias"], y)

    return params, loss


def _grad(loss: Loss, params: Tree) -> Tree:
    """First-order gradient tree (``torch.func.grad`` would do; this is ~100x cheaper here)."""
    leaves, spec = optree.tree_flatten(params)
    leaves = [leaf.detach().requires_grad_() for leaf in leaves]
    grads = torch.autograd.grad(loss(optree.tree_unflatten(spec, leaves)), leaves)
    return optree.tree_unflatten(spec, list(grads))


def _run_ours(opt: optim.GradientTransformation, params: Tree, loss: Loss) -> list[Tree]:
    state = opt.init(params)
    history = []
    for _ in range(STEPS):
        grads = _grad(loss, params)
        updates, state = opt.update(grads, state, params)
        params = optim.apply_updates(params, updates)
        history.append(params)
    return history


def _run_torch(
    make_opt: Callable[[list[torch.Tensor]], torch.optim.Optimizer],
    params: Tree,
    loss: Loss,
    *,
    make_scheduler: Callable[[torch.optim.Optimizer], Any] | None = None,
    max_norm: float | None = None,
) -> list[Tree]:
    leaves, spec = optree.tree_flatten(params)
    tensors = [leaf.clone().requires_grad_() for leaf in leaves]
    opt = make_opt(tensors)
    scheduler = make_scheduler(opt) if make_scheduler else None
    history = []
    for _ in range(STEPS):
        opt.zero_grad()
        loss(optree.tree_unflatten(spec, tensors)).backward()
        if max_norm is not None:
            torch.nn.utils.clip_grad_norm_(tensors, max_norm)
        opt.step()
        if scheduler is not None:
            scheduler.step()
        history.append(optree.tree_unflatten(spec, [t.detach().clone() for t in tensors]))
    return history


def _assert_same_trajectory(ours: list[Tree], theirs: list[Tree], start: Tree) -> None:
    assert len(ours) == len(theirs) == STEPS
    for step, (a, b) in enumerate(zip(ours, theirs, strict=True)):
        assert optree.tree_structure(a) == optree.tree_structure(b), step
        for path, leaf in mt.flatten_with_paths(a).items():
            ref = mt.flatten_with_paths(b)[path]
            assert leaf.dtype == ref.dtype == torch.float64
            torch.testing.assert_close(
                leaf, ref, rtol=RTOL, atol=ATOL, msg=lambda m, s=step, p=path: f"{s} {p}: {m}"
            )
    # The comparison means something only if the parameters actually moved.
    assert float(mt.global_norm(mt.sub(ours[-1], start))) > 1e-2


# --------------------------------------------------------------------------------------------
# Against torch.optim, step for step
# --------------------------------------------------------------------------------------------

SGD_CASES = {
    "plain": {"lr": 0.5},
    "momentum": {"lr": 0.2, "momentum": 0.9},
    "nesterov": {"lr": 0.2, "momentum": 0.9, "nesterov": True},
    "dampening": {"lr": 0.2, "momentum": 0.8, "dampening": 0.5},
    "weight-decay": {"lr": 0.5, "weight_decay": 0.05},
    "momentum-weight-decay": {"lr": 0.2, "momentum": 0.5, "weight_decay": 0.1},
    "nesterov-weight-decay": {"lr": 0.2, "momentum": 0.7, "nesterov": True, "weight_decay": 0.1},
}


@pytest.mark.parametrize("kwargs", list(SGD_CASES.values()), ids=list(SGD_CASES))
def test_sgd_matches_torch(problem: tuple[Tree, Loss], kwargs: dict[str, Any]) -> None:
    params, loss = problem
    ours = _run_ours(optim.sgd(**kwargs), params, loss)
    theirs = _run_torch(lambda ps: torch.optim.SGD(ps, **kwargs), params, loss)
    _assert_same_trajectory(ours, theirs, params)


def test_sgd_with_a_tensor_lr_matches_torch(problem: tuple[Tree, Loss]) -> None:
    params, loss = problem
    lr = torch.tensor(0.3, dtype=torch.float64)
    ours = _run_ours(optim.sgd(lr, 0.9), params, loss)
    theirs = _run_torch(lambda ps: torch.optim.SGD(ps, lr=0.3, momentum=0.9), params, loss)
    _assert_same_trajectory(ours, theirs, params)


@pytest.mark.parametrize("betas", [(0.9, 0.999), (0.5, 0.9)], ids=["default-betas", "low-betas"])
@pytest.mark.parametrize("weight_decay", [0.0, 0.1], ids=["no-decay", "l2"])
def test_adam_matches_torch(
    problem: tuple[Tree, Loss], betas: tuple[float, float], weight_decay: float
) -> None:
    params, loss = problem
    b1, b2 = betas
    ours = _run_ours(optim.adam(0.05, b1, b2, 1e-8, weight_decay=weight_decay), params, loss)
    theirs = _run_torch(
        lambda ps: torch.optim.Adam(ps, lr=0.05, betas=betas, eps=1e-8, weight_decay=weight_decay),
        params,
        loss,
    )
    _assert_same_trajectory(ours, theirs, params)


@pytest.mark.parametrize("betas", [(0.9, 0.999), (0.5, 0.9)], ids=["default-betas", "low-betas"])
@pytest.mark.parametrize("weight_decay", [0.01, 0.5])
def test_adamw_matches_torch(
    problem: tuple[Tree, Loss], betas: tuple[float, float], weight_decay: float
) -> None:
    params, loss = problem
    b1, b2 = betas
    ours = _run_ours(optim.adamw(0.05, b1, b2, weight_decay=weight_decay), params, loss)
    theirs = _run_torch(
        lambda ps: torch.optim.AdamW(ps, lr=0.05, betas=betas, weight_decay=weight_decay),
        params,
        loss,
    )
    _assert_same_trajectory(ours, theirs, params)


def test_adamw_defaults_match_torch(problem: tuple[Tree, Loss]) -> None:
    params, loss = problem
    ours = _run_ours(optim.adamw(0.05), params, loss)
    theirs = _run_torch(lambda ps: torch.optim.AdamW(ps, lr=0.05), params, loss)
    _assert_same_trajectory(ours, theirs, params)


def test_adam_l2_and_adamw_differ(problem: tuple[Tree, Loss]) -> None:
    # Guards the two tests above against a mix-up that both reference optimizers would share.
    params, loss = problem
    l2 = _run_ours(optim.adam(0.05, weight_decay=0.5), params, loss)[-1]
    decoupled = _run_ours(optim.adamw(0.05, weight_decay=0.5), params, loss)[-1]
    assert not mt.allclose(l2, decoupled, rtol=1e-3)


@pytest.mark.parametrize("max_norm", [0.05, 100.0], ids=["clips", "does-not-clip"])
@pytest.mark.parametrize("momentum", [0.0, 0.9])
def test_clip_by_global_norm_then_sgd_matches_torch(
    problem: tuple[Tree, Loss], max_norm: float, momentum: float
) -> None:
    params, loss = problem
    if max_norm < 1:  # the clipping branch is really taken
        assert float(mt.global_norm(_grad(loss, params))) > 2 * max_norm
    opt = optim.chain(optim.clip_by_global_norm(max_norm), optim.sgd(0.5, momentum))
    ours = _run_ours(opt, params, loss)
    theirs = _run_torch(
        lambda ps: torch.optim.SGD(ps, lr=0.5, momentum=momentum), params, loss, max_norm=max_norm
    )
    _assert_same_trajectory(ours, theirs, params)


# --------------------------------------------------------------------------------------------
# Schedules
# --------------------------------------------------------------------------------------------

BASE_LR = 0.5
SCHEDULE_CASES: dict[str, tuple[schedules.Schedule, Callable[[Any], Any]]] = {
    "cosine": (
        schedules.cosine_decay(BASE_LR, STEPS, alpha=0.1),
        lambda o: lr_scheduler.CosineAnnealingLR(o, T_max=STEPS, eta_min=0.1 * BASE_LR),
    ),
    "exponential": (
        schedules.exponential_decay(BASE_LR, 0.9),
        lambda o: lr_scheduler.ExponentialLR(o, gamma=0.9),
    ),
    "multistep": (
        schedules.piecewise_constant(BASE_LR, {12: 0.3, 5: 0.3}),
        lambda o: lr_scheduler.MultiStepLR(o, milestones=[5, 12], gamma=0.3),
    ),
    "linear": (
        schedules.linear(0.25 * BASE_LR, BASE_LR, 8),
        lambda o: lr_scheduler.LinearLR(o, start_factor=0.25, end_factor=1.0, total_iters=8),
    ),
}


@pytest.mark.parametrize("case", list(SCHEDULE_CASES))
def test_schedule_values_match_torch_scheduler(case: str) -> None:
    schedule, make_scheduler = SCHEDULE_CASES[case]
    opt = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=BASE_LR)
    scheduler = make_scheduler(opt)
    expected = []
    for _ in range(STEPS + 1):
        expected.append(opt.param_groups[0]["lr"])
        opt.step()
        scheduler.step()
    assert len(set(expected)) > 2  # the schedule does change
    for t, ref in enumerate(expected):
        for count in (torch.tensor(t), t):
            value = schedule(count)  # type: ignore[arg-type]
            assert value.shape == ()
            assert math.isclose(float(value), ref, rel_tol=1e-12), (t, float(value), ref)


@pytest.mark.parametrize("case", list(SCHEDULE_CASES))
def test_sgd_with_a_schedule_matches_torch_sgd_and_scheduler(
    problem: tuple[Tree, Loss], case: str
) -> None:
    params, loss = problem
    schedule, make_scheduler = SCHEDULE_CASES[case]
    ours = _run_ours(optim.sgd(schedule, 0.9), params, loss)
    theirs = _run_torch(
        lambda ps: torch.optim.SGD(ps, lr=BASE_LR, momentum=0.9),
        params,
        loss,
        make_scheduler=make_scheduler,
    )
    _assert_same_trajectory(ours, theirs, params)


def test_adam_with_a_schedule_matches_torch(problem: tuple[Tree, Loss]) -> None:
    params, loss = problem
    ours = _run_ours(optim.adam(schedules.exponential_decay(0.05, 0.8)), params, loss)
    theirs = _run_torch(
        lambda ps: torch.optim.Adam(ps, lr=0.05),
        params,
        loss,
        make_scheduler=lambda o: lr_scheduler.ExponentialLR(o, gamma=0.8),
    )
    _assert_same_trajectory(ours, theirs, params)


def _values(schedule: schedules.Schedule, steps: list[int]) -> list[float]:
    return [float(schedule(torch.tensor(t))) for t in steps]


def test_schedules_against_their_closed_forms() -> None:
    steps = [0, 1, 3, 4, 8, 12, 20, 100]
    assert _values(schedules.constant(0.3), steps) == [0.3] * len(steps)
    # cosine_decay holds its final value after decay_steps (torch's CosineAnnealingLR would rise).
    cos = _values(schedules.cosine_decay(2.0, 8, alpha=0.25), steps)
    expected = [0.5 + 1.5 * (1 + math.cos(math.pi * min(t, 8) / 8)) / 2 for t in steps]
    assert cos == pytest.approx(expected, rel=1e-12)
    assert cos[-1] == pytest.approx(0.5)
    exp = _values(schedules.exponential_decay(1.0, 0.5, transition_steps=4), steps)
    assert exp == pytest.approx([0.5 ** (t / 4) for t in steps], rel=1e-12)
    piece = _values(schedules.piecewise_constant(1.0, {4: 0.5, 12: 0.1}), steps)
    assert piece == pytest.approx([1, 1, 1, 0.5, 0.5, 0.05, 0.05, 0.05], rel=1e-12)
    lin = _values(schedules.linear(1.0, 0.0, 8), steps)
    assert lin == pytest.approx([1, 7 / 8, 5 / 8, 0.5, 0, 0, 0, 0], rel=1e-12, abs=1e-15)


def test_warmup_cosine_decay_at_a_few_points() -> None:
    schedule = schedules.warmup_cosine_decay(
        0.0, 1.0, warmup_steps=4, decay_steps=12, end_value=0.1
    )
    points = {
        0: 0.0,
        2: 0.5,  # halfway up the warm-up
        4: 1.0,  # peak
        8: 0.1 + 0.9 * (1 + math.cos(math.pi / 2)) / 2,  # halfway down: 0.55
        10: 0.1 + 0.9 * (1 + math.cos(math.pi * 0.75)) / 2,
        12: 0.1,
        50: 0.1,
    }
    for t, ref in points.items():
        assert float(schedule(torch.tensor(t))) == pytest.approx(ref, rel=1e-12, abs=1e-15), t
    assert points[8] == pytest.approx(0.55)


def test_schedules_reject_bad_step_counts() -> None:
    with pytest.raises(ValueError, match=r"cosine_decay\(\.\.\.\): decay_steps"):
        schedules.cosine_decay(1.0, 0)
    with pytest.raises(ValueError, match=r"linear\(\.\.\.\): transition_steps"):
        schedules.linear(1.0, 0.0, -3)
    with pytest.raises(ValueError, match="must exceed warmup_steps"):
        schedules.warmup_cosine_decay(0.0, 1.0, warmup_steps=10, decay_steps=10)


# --------------------------------------------------------------------------------------------
# Per-leaf and per-step learning rates (Meta-SGD, MAML++)
# --------------------------------------------------------------------------------------------


def _manual_sgd(params: Tree, loss: Loss, rate: Callable[[int, str], torch.Tensor], steps: int):
    """``p <- p - lr * g`` written out leaf by leaf on flat path dicts."""
    flat = mt.flatten_with_paths(params)
    out = []
    for k in range(steps):
        grads = mt.flatten_with_paths(_grad(loss, _unflatten(params, flat)))
        flat = {p: v - rate(k, p) * grads[p] for p, v in flat.items()}
        out.append(_unflatten(params, flat))
    return out


def _unflatten(like: Tree, flat: dict[str, torch.Tensor]) -> Tree:
    return optree.tree_unflatten(optree.tree_structure(like), [flat[p] for p in mt.paths(like)])


def test_per_leaf_lr_tree_is_meta_sgd(problem: tuple[Tree, Loss], gen: torch.Generator) -> None:
    params, loss = problem
    lr = {
        # One rate per entry for most leaves, a 0-d rate (broadcast) for one of them.
        "layer": {
            "weight": 0.1 + torch.rand(5, 3, generator=gen, dtype=torch.float64),
            "bias": 0.2,
        },
        "head": {
            "weight": 0.1 + torch.rand(3, 5, generator=gen, dtype=torch.float64),
            "bias": torch.tensor(0.7, dtype=torch.float64),
        },
    }
    lr["layer"]["bias"] = torch.tensor(0.2, dtype=torch.float64)
    flat_lr = mt.flatten_with_paths(lr)
    expected = _manual_sgd(params, loss, lambda k, p: flat_lr[p], 3)
    opt = optim.sgd(lr)
    state = opt.init(params)
    current = params
    for k in range(3):
        updates, state = opt.update(_grad(loss, current), state, current)
        current = optim.apply_updates(current, updates)
        assert optree.tree_structure(current) == optree.tree_structure(expected[k])
        assert mt.allclose(current, expected[k], rtol=1e-14, atol=0)
    # A single scalar rate would give something else: the per-leaf rates are really used.
    scalar = _run_ours(optim.sgd(0.5), params, loss)[2]
    assert not mt.allclose(current, scalar, rtol=1e-3)


def test_per_step_lr_tree_is_maml_plus_plus(
    problem: tuple[Tree, Loss], gen: torch.Generator
) -> None:
    params, loss = problem
    steps = 3
    lr = {
        # Per-layer, per-step rates (shape [steps]) and one per-entry, per-step leaf.
        "layer": {
            "weight": torch.tensor([0.1, 0.4, 0.9], dtype=torch.float64),
            "bias": torch.tensor([0.3, 0.0, 0.2], dtype=torch.float64),
        },
        "head": {
            "weight": torch.rand(steps, 3, 5, generator=gen, dtype=torch.float64),
            "bias": torch.tensor([0.5, 0.6, 0.05], dtype=torch.float64),
        },
    }
    flat_lr = mt.flatten_with_paths(lr)
    expected = _manual_sgd(params, loss, lambda k, p: flat_lr[p][k], steps)
    opt = optim.sgd(lr, per_step=True)
    state = opt.init(params)
    current = params
    for k in range(steps):
        updates, state = opt.update(_grad(loss, current), state, current)
        current = optim.apply_updates(current, updates)
        assert mt.allclose(current, expected[k], rtol=1e-14, atol=0), k
    with pytest.raises(ValueError, match="per-step rates have 3 steps but step 3 was asked for"):
        opt.update(_grad(loss, current), state, current)


def test_per_step_tensor_lr_and_per_step_float_rejected(problem: tuple[Tree, Loss]) -> None:
    params, loss = problem
    rates = torch.tensor([0.5, 0.1], dtype=torch.float64)
    expected = _manual_sgd(params, loss, lambda k, p: rates[k], 2)
    opt = optim.sgd(rates, per_step=True)
    state = opt.init(params)
    current = params
    for k in range(2):
        updates, state = opt.update(_grad(loss, current), state, current)
        current = optim.apply_updates(current, updates)
        assert mt.allclose(current, expected[k], rtol=1e-14, atol=0)
    with pytest.raises(ValueError, match=r"per_step=True needs a tensor or tree"):
        optim.sgd(0.1, per_step=True)


def test_lr_tree_with_another_structure_is_rejected(problem: tuple[Tree, Loss]) -> None:
    params, loss = problem
    lr = {"layer": {"weight": torch.tensor(0.1)}, "head": {"weight": torch.tensor(0.1)}}
    opt = optim.sgd(lr)
    with pytest.raises(ValueError, match=r"only in grads: \['head\.bias', 'layer\.bias'\]"):
        opt.update(_grad(loss, params), opt.init(params), params)


# --------------------------------------------------------------------------------------------
# Differentiability: through several steps, w.r.t. params and learning rates
# --------------------------------------------------------------------------------------------


def _small(gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor, Loss]:
    x = torch.randn(6, 3, generator=gen, dtype=torch.float64)
    target = torch.randn(6, 2, generator=gen, dtype=torch.float64)
    w = torch.randn(3, 2, generator=gen, dtype=torch.float64).requires_grad_()
    b = (0.1 * torch.randn(2, generator=gen, dtype=torch.float64)).requires_grad_()

    def loss(p: Tree) -> torch.Tensor:
        return ((torch.tanh(x @ p["w"] + p["b"]) - target) ** 2).mean()

    return w, b, loss


def _unroll(opt: optim.GradientTransformation, params: Tree, loss: Loss, steps: int) -> Tree:
    """Inner steps with gradients from ``torch.autograd.grad(create_graph=True)`` (second order)."""
    state = opt.init(params)
    for _ in range(steps):
        leaves, spec = optree.tree_flatten(params)
        grads = torch.autograd.grad(loss(params), leaves, create_graph=True)
        updates, state = opt.update(optree.tree_unflatten(spec, list(grads)), state, params)
        params = optim.apply_updates(params, updates)
    return params


def test_gradcheck_through_three_adam_steps_wrt_params_and_lr(gen: torch.Generator) -> None:
    w, b, loss = _small(gen)
    lr = torch.tensor(0.05, dtype=torch.float64, requires_grad=True)

    def f(w: torch.Tensor, b: torch.Tensor, lr: torch.Tensor) -> tuple[torch.Tensor, ...]:
        out = _unroll(optim.adam(lr, 0.8, 0.9, 1e-8), {"w": w, "b": b}, loss, 3)
        return out["w"], out["b"], loss(out)

    assert torch.autograd.gradcheck(f, (w, b, lr))
    # Non-vacuous: the learning rate does reach the result.
    (dlr,) = torch.autograd.grad(f(w, b, lr)[-1], lr)
    assert abs(float(dlr)) > 1e-3


def test_gradcheck_through_three_momentum_steps_wrt_params_and_lr_tree(
    gen: torch.Generator,
) -> None:
    w, b, loss = _small(gen)
    lr_w = (0.2 + 0.3 * torch.rand(3, 2, generator=gen, dtype=torch.float64)).requires_grad_()
    lr_b = torch.tensor(0.3, dtype=torch.float64, requires_grad=True)

    def f(w: torch.Tensor, b: torch.Tensor, lr_w: torch.Tensor, lr_b: torch.Tensor):
        opt = optim.sgd({"w": lr_w, "b": lr_b}, 0.9, nesterov=True)
        out = _unroll(opt, {"w": w, "b": b}, loss, 3)
        return out["w"], out["b"], loss(out)

    assert torch.autograd.gradcheck(f, (w, b, lr_w, lr_b))


def test_meta_gradient_of_adam_is_finite_where_a_gradient_is_exactly_zero(
    gen: torch.Generator, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The last input feature is always 0, so the gradient of w[2, :] is exactly 0 at every step
    # and Adam's second moment there stays exactly 0: sqrt's derivative at 0 is infinite.
    x = torch.randn(6, 3, generator=gen, dtype=torch.float64)
    x[:, 2] = 0.0
    target = torch.randn(6, 2, generator=gen, dtype=torch.float64)
    w = torch.randn(3, 2, generator=gen, dtype=torch.float64).requires_grad_()
    lr = torch.tensor(0.05, dtype=torch.float64, requires_grad=True)

    def loss(p: Tree) -> torch.Tensor:
        return ((torch.tanh(x @ p["w"]) - target) ** 2).mean()

    def meta_grads() -> tuple[torch.Tensor, ...]:
        final = _unroll(optim.adam(lr), {"w": w}, loss, 3)
        return torch.autograd.grad(loss(final), (w, lr))

    assert torch.equal(_grad(loss, {"w": w})["w"][2], torch.zeros(2, dtype=torch.float64))
    dw, dlr = meta_grads()
    assert torch.isfinite(dw).all() and torch.isfinite(dlr)
    assert torch.equal(dw[2], torch.zeros(2, dtype=torch.float64))
    assert dw[:2].abs().min() > 0
    # The setup really hits the hazard: with a plain sqrt the same meta-gradient is NaN.
    monkeypatch.setattr(transforms, "safe_sqrt", torch.sqrt)
    dw_plain, _ = meta_grads()
    assert torch.isnan(dw_plain).any()


def test_second_order_through_clipping_at_a_zero_gradient_is_finite() -> None:
    # At w = 0 the gradient of sum(w^2) is exactly 0, so the global norm sits at sqrt(0).
    w = torch.zeros(2, dtype=torch.float64, requires_grad=True)
    (g,) = torch.autograd.grad((w * w).sum(), w, create_graph=True)
    opt = optim.chain(optim.clip_by_global_norm(1.0), optim.sgd(0.1))
    updates, _ = opt.update({"w": g}, opt.init({"w": w}), {"w": w})
    (dw,) = torch.autograd.grad(updates["w"].sum(), w)
    # Below max_norm clipping is the identity, so d(-0.1 * 2w)/dw summed is -0.2 per entry.
    torch.testing.assert_close(dw, torch.full((2,), -0.2, dtype=torch.float64))


OUT_OF_PLACE_CASES = {
    "sgd-nesterov-decay": lambda: optim.sgd(0.1, 0.9, nesterov=True, weight_decay=0.1),
    "sgd-dampening": lambda: optim.sgd(0.1, 0.9, dampening=0.3),
    "adam-l2": lambda: optim.adam(0.01, weight_decay=0.1),
    "adamw": lambda: optim.adamw(0.01),
    "clip-sgd": lambda: optim.chain(optim.clip_by_global_norm(0.1), optim.sgd(0.1)),
    "schedule": lambda: optim.sgd(schedules.cosine_decay(0.1, 5), 0.5),
    "per-step-tree": lambda: optim.sgd(
        {
            "layer": {"weight": torch.full((4,), 0.1), "bias": torch.full((4,), 0.2)},
            "head": {"weight": torch.full((4,), 0.3), "bias": torch.full((4,), 0.4)},
        },
        0.9,
        per_step=True,
    ),
}


@pytest.mark.parametrize("make", list(OUT_OF_PLACE_CASES.values()), ids=list(OUT_OF_PLACE_CASES))
def test_update_and_apply_updates_never_mutate_their_inputs(
    problem: tuple[Tree, Loss], make: Callable[[], optim.GradientTransformation]
) -> None:
    params, loss = problem
    opt = make()
    state = opt.init(params)
    for _ in range(3):
        grads = _grad(loss, params)
        inputs = (params, grads, state)
        leaves = optree.tree_leaves(inputs)
        assert any(leaf.dtype == torch.int64 for leaf in leaves)  # the step counters are checked
        copies = [leaf.clone() for leaf in leaves]
        versions = [leaf._version for leaf in leaves]
        updates, new_state = opt.update(grads, state, params)
        new_params = optim.apply_updates(params, updates)
        for leaf, copy, version in zip(leaves, copies, versions, strict=True):
            assert leaf._version == version
            assert torch.equal(leaf, copy)
        assert all(
            new is not old
            for new, old in zip(
                optree.tree_leaves(new_params), optree.tree_leaves(params), strict=True
            )
        )
        params, state = new_params, new_state


# --------------------------------------------------------------------------------------------
# Bad input
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("make", "call"),
    [
        (lambda: optim.sgd(-0.1), "sgd(lr, momentum, ...)"),
        (lambda: optim.sgd(float("nan")), "sgd(lr, momentum, ...)"),
        (lambda: optim.adam(-1e-3), "adam(lr, b1, b2, eps, ...)"),
        (lambda: optim.adamw(-1e-3), "adamw(lr, b1, b2, eps, ...)"),
        (lambda: optim.scale_by_learning_rate(-1.0), "scale_by_learning_rate(lr)"),
    ],
    ids=["sgd", "sgd-nan", "adam", "adamw", "scale_by_learning_rate"],
)
def test_negative_lr_names_the_call(make: Callable[[], Any], call: str) -> None:
    with pytest.raises(ValueError, match=re.escape(call) + ": lr must be >= 0"):
        make()


@pytest.mark.parametrize("b1", [1.0, -0.1, 1.5])
def test_adam_b1_out_of_range(b1: float) -> None:
    for make, call in [(optim.adam, "adam("), (optim.adamw, "adamw(")]:
        with pytest.raises(ValueError, match=re.escape(call) + r".*b1 must be in \[0, 1\)"):
            make(1e-3, b1=b1)
    with pytest.raises(ValueError, match=r"scale_by_adam.*b1 must be in \[0, 1\)"):
        optim.scale_by_adam(b1=b1)


def test_other_out_of_range_hyper_parameters() -> None:
    with pytest.raises(ValueError, match=r"adam\(.*b2 must be in \[0, 1\)"):
        optim.adam(1e-3, b2=1.0)
    with pytest.raises(ValueError, match=r"sgd\(.*momentum must be in \[0, 1\)"):
        optim.sgd(0.1, momentum=1.0)
    with pytest.raises(ValueError, match=r"sgd\(.*weight_decay must be >= 0"):
        optim.sgd(0.1, weight_decay=-0.1)
    with pytest.raises(ValueError, match=r"max_norm must be > 0"):
        optim.clip_by_global_norm(0.0)


def test_nesterov_needs_momentum_and_no_dampening() -> None:
    with pytest.raises(ValueError, match=r"sgd\(.*nesterov=True needs momentum > 0"):
        optim.sgd(0.1, nesterov=True)
    with pytest.raises(ValueError, match="nesterov needs decay > 0 and dampening 0"):
        optim.sgd(0.1, 0.9, nesterov=True, dampening=0.1)


def test_chain_rejects_a_non_transform() -> None:
    with pytest.raises(TypeError, match=r"chain\(\*transforms\): transforms\[1\] is a function"):
        optim.chain(optim.sgd(0.1), lambda g: g)  # type: ignore[arg-type]


def test_chain_rejects_a_state_from_another_optimizer(problem: tuple[Tree, Loss]) -> None:
    params, loss = problem
    state = optim.sgd(0.1).init(params)
    with pytest.raises(ValueError, match=r"chain\.update: state has 1 parts for 2 transforms"):
        optim.sgd(0.1, 0.9).update(_grad(loss, params), state, params)


def test_weight_decay_needs_params(problem: tuple[Tree, Loss]) -> None:
    params, loss = problem
    opt = optim.adamw(1e-3)
    with pytest.raises(ValueError, match=r"add_decayed_weights.*update needs params"):
        opt.update(_grad(loss, params), opt.init(params))  # type: ignore[call-arg]


def test_apply_updates_rejects_another_structure_naming_the_paths(
    problem: tuple[Tree, Loss],
) -> None:
    params, _ = problem
    updates = mt.zeros_like(params)
    del updates["head"]["bias"]
    updates["head"]["scale"] = torch.zeros(3, dtype=torch.float64)
    with pytest.raises(ValueError, match=r"apply_updates\(params, updates\)") as info:
        optim.apply_updates(params, updates)
    assert "only in params: ['head.bias']" in str(info.value)
    assert "only in updates: ['head.scale']" in str(info.value)


def test_apply_updates_is_params_plus_updates_in_the_params_dtype(
    problem: tuple[Tree, Loss],
) -> None:
    params, _ = problem
    updates = mt.cast(mt.ones_like(params), torch.float32)
    out = optim.apply_updates(params, updates)
    for leaf, ref in zip(optree.tree_leaves(out), optree.tree_leaves(params), strict=True):
        assert leaf.dtype == torch.float64
        torch.testing.assert_close(leaf, ref + 1, rtol=0, atol=0)


def test_identity_and_scale_transforms(problem: tuple[Tree, Loss]) -> None:
    params, loss = problem
    grads = _grad(loss, params)
    out, _ = optim.identity().update(grads, optim.identity().init(params), params)
    assert out is grads
    scaled, _ = optim.scale(-2.0).update(grads, optim.scale(-2.0).init(params), params)
    assert mt.allclose(scaled, mt.scale(-2.0, grads), rtol=0, atol=0)
