"""Each algorithm's meta-gradient in float64 against a reference computed another way: an
explicit per-task ``torch.autograd.grad`` loop (MAML, first-order MAML, ANIL, Meta-SGD, MAML++,
Prototypical Networks), a sequential Reptile, and a dense implicit solve (iMAML)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from helpers import (
    LR,
    check,
    class_tasks,
    conv_batch,
    distinct_rates,
    mamlpp_case,
    ref_imaml_grad,
    ref_meta_grad,
    ref_protonet_loss,
    ref_reptile_params,
    rel_err,
    sine_tasks,
    takes_shared_path,
)

from metafunc import conv4, mlp, optim, tree
from metafunc.algorithms import (
    ANIL,
    IMAML,
    MAML,
    FirstOrderMAML,
    MAMLPlusPlus,
    MetaSGD,
    ProtoNet,
    Reptile,
)

# two intra-op threads, so that the 'threads' strategy runs tasks concurrently
pytestmark = pytest.mark.usefixtures("two_intra_op_threads")


@pytest.fixture
def batch(gen):
    return conv_batch(gen)


# MAML can share the first inner step across tasks on the per-task strategies
# (shared_first_step; by default only under 'threads'); both ways are checked against the reference
PER_TASK = [("loop", True), ("loop", False), ("vmap", True), ("threads", True), ("threads", False)]


@pytest.mark.parametrize(("strategy", "shared"), PER_TASK)
@pytest.mark.parametrize("cls", [MAML, FirstOrderMAML])
@pytest.mark.parametrize("steps", [1, 3])
def test_maml_and_first_order(gen, batch, strategy, shared, cls, steps, monkeypatch):
    alg = cls(
        conv4(3, hidden=6), inner_lr=LR, inner_steps=steps, strategy=strategy,
        shared_first_step=shared,
    )  # fmt: skip
    meta = alg.init(gen, dtype=torch.float64)
    calls = takes_shared_path(alg, meta, batch, monkeypatch, shared and strategy != "vmap")
    ref = ref_meta_grad(
        meta, batch, steps, lr=lambda leaves, k, n: LR, first_order=cls is FirstOrderMAML
    )
    check(alg, meta, batch, ref)
    assert len(calls) == int(shared and strategy != "vmap")
    assert all(seen is batch for seen in calls)


@pytest.mark.parametrize("cls", [MAML, ANIL])
@pytest.mark.parametrize("strategy", ["loop", "vmap"])
def test_a_callable_loss(gen, batch, strategy, cls):
    """``loss=`` your own function (label-smoothed cross-entropy here), second order through
    three steps, against the explicit per-task loop with the same function; accuracy is still
    reported (integer labels, class scores), by meta_grad and by evaluate."""

    def smoothed(logits, labels):
        return F.cross_entropy(logits, labels, label_smoothing=0.2)

    alg = cls(conv4(3, hidden=6), inner_lr=LR, inner_steps=3, strategy=strategy, loss=smoothed)
    meta = alg.init(gen, dtype=torch.float64)
    keys = ["head.weight", "head.bias"] if cls is ANIL else None
    ref = ref_meta_grad(meta, batch, 3, lr=lambda leaves, k, n: LR, adapt_keys=keys,
                        loss_fn=smoothed)  # fmt: skip
    check(alg, meta, batch, ref)
    _, _, metrics = alg.meta_grad(meta, batch)
    scores = alg.evaluate(meta, batch, 1)
    assert set(metrics) == {"loss", "accuracy"} and set(scores) == {"loss", "accuracy"}
    assert scores["loss"].shape == (batch.num_tasks, 2)
    per_task = [smoothed(p, y) for p, y in zip(alg.adapt_and_predict(meta, batch, 1)[:, 1],
                                                batch.query_y, strict=True)]  # fmt: skip
    torch.testing.assert_close(scores["loss"][:, 1], torch.stack(per_task), rtol=1e-12, atol=0)


def test_a_callable_regression_loss_gives_the_named_ones_result(gen):
    """F.mse_loss passed as a function gives what loss='mse' gives: the same meta-gradient and
    the same evaluation, with no accuracy (floating targets)."""
    tasks = sine_tasks(gen, 4, dtype=torch.float64)
    named = MAML(mlp((1, 8, 1)), inner_lr=0.01, loss="mse", strategy="loop")
    own = MAML(mlp((1, 8, 1)), inner_lr=0.01, loss=F.mse_loss, strategy="loop")
    meta = named.init(gen, dtype=torch.float64)
    g1, l1, _ = named.meta_grad(meta, tasks)
    g2, l2, m2 = own.meta_grad(meta, tasks)
    assert tree.allclose(g1, g2, rtol=1e-14, atol=0) and set(m2) == {"loss"}
    assert float(l1) == float(l2)
    e1, e2 = named.evaluate(meta, tasks, 2), own.evaluate(meta, tasks, 2)
    assert set(e2) == {"loss"}
    torch.testing.assert_close(e1["loss"], e2["loss"], rtol=1e-12, atol=0)


@pytest.mark.parametrize("strategy", ["loop", "vmap", "threads"])
def test_anil(gen, batch, strategy):
    alg = ANIL(conv4(3, hidden=6), inner_lr=LR, inner_steps=3, strategy=strategy)
    meta = alg.init(gen, dtype=torch.float64)
    ref = ref_meta_grad(
        meta, batch, 3, lr=lambda leaves, k, n: LR, adapt_keys=["head.weight", "head.bias"]
    )
    check(alg, meta, batch, ref)


@pytest.mark.parametrize(("strategy", "shared"), PER_TASK)
def test_meta_sgd(gen, batch, strategy, shared):
    alg = MetaSGD(
        conv4(3, hidden=6), inner_lr=LR, inner_steps=2, strategy=strategy,
        shared_first_step=shared,
    )  # fmt: skip
    meta = alg.init(gen, dtype=torch.float64)
    meta["lr"] = distinct_rates(meta["lr"], gen)
    ref = ref_meta_grad(meta, batch, 2, lr=lambda leaves, k, n: leaves[f"lr.{n}"])
    assert float(ref["lr.head.weight"].abs().sum()) > 0
    check(alg, meta, batch, ref)


@pytest.mark.parametrize("strategy", ["loop", "vmap", "threads"])
@pytest.mark.parametrize("iteration", [0, 50])
def test_maml_plus_plus_with_batch_norm(gen, batch, strategy, iteration):
    steps = 3
    alg = MAMLPlusPlus(
        conv4(3, hidden=6), inner_lr=LR, inner_steps=steps, msl_iterations=100, strategy=strategy
    )
    meta, ref = mamlpp_case(alg, gen, batch, iteration)
    grads, _, _ = alg.meta_grad(meta, batch, iteration=iteration)
    flat = tree.flatten_with_paths(grads)
    assert set(flat) == set(ref)
    err = tree.global_norm(tree.sub(flat, ref)) / tree.global_norm(ref)
    assert float(err) <= 1e-8
    assert float(flat["bn.bn0.weight"][0].abs().sum()) > 0  # the per-step BN weights learn


def test_maml_plus_plus_first_order_annealing(gen, batch):
    alg = MAMLPlusPlus(
        conv4(3, hidden=6), inner_lr=LR, inner_steps=2, msl_iterations=0, first_order_iterations=10
    )
    meta = alg.init(gen, dtype=torch.float64)
    early, _, _ = alg.meta_grad(meta, batch, iteration=5)
    late, _, _ = alg.meta_grad(meta, batch, iteration=10)
    ref_first = ref_meta_grad(
        meta,
        batch,
        2,
        lr=lambda leaves, k, n: leaves[f"lr.{n}"][k],
        first_order=True,
        bn=lambda leaves, k: {n[3:]: v[k] for n, v in leaves.items() if n.startswith("bn.")},
    )
    flat = tree.flatten_with_paths(early)
    # first order: gradients of params match the detached reference (lr/bn paths differ:
    # the reference's detached inner grads still give lr a direct-path gradient, as ours)
    err = tree.global_norm(tree.sub(flat, ref_first)) / tree.global_norm(ref_first)
    assert float(err) <= 1e-8
    assert not tree.allclose(early, late)


@pytest.mark.parametrize("strategy", ["loop", "vmap", "threads"])
@pytest.mark.parametrize("kind", ["sgd", "adam"])
def test_reptile_update_matches_sequential_reference(gen, strategy, kind):
    model = mlp((1, 8, 8, 1), activation="tanh", init="xavier")
    lr = 0.05 if kind == "sgd" else 0.01
    alg = Reptile(
        model, inner_lr=lr, inner_steps=4, inner_optimizer=kind, loss="mse", strategy=strategy
    )
    meta = alg.init(gen, dtype=torch.float64)
    batch = sine_tasks(gen, 3, dtype=torch.float64)
    grads, loss, metrics = alg.meta_grad(meta, batch)
    opt = alg.outer_optimizer(0.7, 100)
    updates, _ = opt.update(grads, opt.init(meta), meta)
    new = optim.apply_updates(meta, updates)["params"]
    ref = ref_reptile_params(meta["params"], batch, lr, 4, 0.7, kind)
    assert tree.structure(new) == tree.structure(ref)
    err = max(float((new[k] - ref[k]).abs().max()) for k in ref)
    assert err <= 1e-10, err
    assert float(tree.global_norm(tree.sub(new, meta["params"]))) > 1e-2  # it moved
    assert not loss.requires_grad and set(metrics) == {"loss", "support_loss"}


@pytest.mark.parametrize(
    "strategy, regu, damping",
    [("loop", 0.0, 0.0), ("threads", 0.0, 0.0), ("vmap", 0.0, 0.0), ("vmap", 1.0, 10.0)],
)
def test_imaml_gradient_matches_dense_implicit_solve(gen, strategy, regu, damping):
    model = mlp((1, 4, 1), activation="tanh", init="xavier")
    alg = IMAML(
        model,
        lam=1.0,
        inner_lr=0.05,
        inner_steps=20,
        cg_steps=40,
        regu_coef=regu,
        lam_damping=damping,
        loss="mse",
        strategy=strategy,
    )
    meta = alg.init(gen, dtype=torch.float64)
    batch = sine_tasks(gen, 3, dtype=torch.float64)
    grads, loss, _ = alg.meta_grad(meta, batch)
    ref, plain = ref_imaml_grad(meta["params"], batch, 1.0, 0.05, 20, regu, damping)
    plain = tree.scale(1 / (1 + regu), plain)
    err = rel_err(grads["params"], ref)
    assert err <= 1e-6, err
    assert rel_err(plain, ref) > 1e-2  # the Hessian term matters, so the check can fail
    assert not loss.requires_grad


def test_imaml_few_cg_steps_approximate_the_solve(gen):
    """CG's error falls with iterations (and 1 step is a different answer: no silent early exit)."""
    model = mlp((1, 4, 1), activation="tanh", init="xavier")
    batch = sine_tasks(gen, 2, dtype=torch.float64)
    errors = []
    for cg_steps in (1, 3, 40):
        alg = IMAML(model, lam=1.0, inner_lr=0.05, inner_steps=20, cg_steps=cg_steps, loss="mse")
        meta = alg.init(torch.Generator().manual_seed(1), dtype=torch.float64)
        ref, _ = ref_imaml_grad(meta["params"], batch, 1.0, 0.05, 20)
        errors.append(rel_err(alg.meta_grad(meta, batch)[0]["params"], ref))
    assert errors[0] > errors[1] > errors[2] and errors[0] > 1e-3


@pytest.mark.parametrize("strategy", ["loop", "vmap", "threads"])
def test_protonet_gradient_matches_per_task_reference(gen, strategy):
    alg = ProtoNet(conv4(None, hidden=8), shots=2, strategy=strategy)
    meta = alg.init(gen, dtype=torch.float64)
    batch = class_tasks(gen, tasks=3, ways=3, shots=2, queries=2)
    grads, loss, metrics = alg.meta_grad(meta, batch)
    leaves = {k: v.clone().requires_grad_() for k, v in meta["params"].items()}
    ref_loss = ref_protonet_loss(leaves, batch, ways=3)
    ref = dict(zip(leaves, torch.autograd.grad(ref_loss, list(leaves.values())), strict=True))
    assert abs(float(loss - ref_loss.detach())) <= 1e-12
    assert rel_err(grads["params"], ref) <= 1e-10
    assert 0.0 <= float(metrics["accuracy"]) <= 1.0
