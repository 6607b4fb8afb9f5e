"""iMAML: the meta-gradient in float64 against a dense implicit solve (a dense Hessian and a
direct solve, after an explicit proximal inner loop), on every per-task strategy and each
device, and conjugate gradient's error falling with its steps."""

from __future__ import annotations

import pytest
import torch
from helpers import sine_tasks, to
from references import ref_imaml_grad, rel_err

from metafunc import mlp, tree
from metafunc.algorithms import IMAML

# two intra-op threads, so that the 'threads' strategy runs tasks concurrently
pytestmark = pytest.mark.usefixtures("two_intra_op_threads")


@pytest.mark.parametrize(
    "strategy, regu, damping",
    [("loop", 0.0, 0.0), ("threads", 0.0, 0.0), ("vmap", 0.0, 0.0), ("vmap", 1.0, 10.0)],
)
def test_imaml_gradient_matches_dense_implicit_solve(gen, device, strategy, regu, damping):
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
    grads, loss, _ = alg.meta_grad(to(device, meta), to(device, batch))
    ref, plain = ref_imaml_grad(meta["params"], batch, 1.0, 0.05, 20, regu, damping)
    plain = tree.scale(1 / (1 + regu), plain)
    err = rel_err(grads["params"], ref)
    assert err <= 1e-6, err
    assert rel_err(plain, ref) > 1e-2  # the Hessian term matters, so the check can fail
    assert not loss.requires_grad


def test_imaml_few_cg_steps_approximate_the_solve(gen, device):
    """CG's error falls with iterations (and 1 step is a different answer: no silent early exit)."""
    model = mlp((1, 4, 1), activation="tanh", init="xavier")
    batch = sine_tasks(gen, 2, dtype=torch.float64)
    errors = []
    for cg_steps in (1, 3, 40):
        alg = IMAML(model, lam=1.0, inner_lr=0.05, inner_steps=20, cg_steps=cg_steps, loss="mse")
        meta = alg.init(torch.Generator().manual_seed(1), dtype=torch.float64)
        ref, _ = ref_imaml_grad(meta["params"], batch, 1.0, 0.05, 20)
        errors.append(rel_err(alg.meta_grad(to(device, meta), to(device, batch))[0]["params"], ref))
    assert errors[0] > errors[1] > errors[2] and errors[0] > 1e-3
