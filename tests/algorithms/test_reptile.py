"""Reptile: the outer update against a sequential reference (manual SGD or Adam steps per task),
on every per-task strategy and each device, and the linearly annealed outer step."""

from __future__ import annotations

import pytest
import torch
from helpers import sine_tasks, to
from references import ref_reptile_params

from metafunc import mlp, optim, tree
from metafunc.algorithms import Reptile


# two intra-op threads, so that the 'threads' strategy runs tasks concurrently
@pytest.mark.usefixtures("two_intra_op_threads")
@pytest.mark.parametrize("strategy", ["loop", "vmap", "threads"])
@pytest.mark.parametrize("kind", ["sgd", "adam"])
def test_reptile_update_matches_sequential_reference(gen, device, strategy, kind):
    model = mlp((1, 8, 8, 1), activation="tanh", init="xavier")
    lr = 0.05 if kind == "sgd" else 0.01
    alg = Reptile(
        model, inner_lr=lr, inner_steps=4, inner_optimizer=kind, loss="mse", strategy=strategy
    )
    meta = alg.init(gen, dtype=torch.float64)
    batch = sine_tasks(gen, 3, dtype=torch.float64)
    on_device = to(device, meta)
    grads, loss, metrics = alg.meta_grad(on_device, to(device, batch))
    opt = alg.outer_optimizer(0.7, 100)
    updates, _ = opt.update(grads, opt.init(on_device), on_device)
    new = to("cpu", optim.apply_updates(on_device, updates)["params"])
    ref = ref_reptile_params(meta["params"], batch, lr, 4, 0.7, kind)
    assert tree.structure(new) == tree.structure(ref)
    err = max(float((new[k] - ref[k]).abs().max()) for k in ref)
    assert err <= 1e-10, err
    assert float(tree.global_norm(tree.sub(new, meta["params"]))) > 1e-2  # it moved
    assert not loss.requires_grad and set(metrics) == {"loss", "support_loss"}


def test_reptile_annealed_outer_step_falls_linearly(gen):
    alg = Reptile(mlp((1, 4, 1)), loss="mse", anneal=True)
    meta = alg.init(gen, dtype=torch.float64)
    g = tree.ones_like(meta)
    opt = alg.outer_optimizer(1.0, 4)
    state = opt.init(meta)
    for k in range(6):
        updates, state = opt.update(g, state, meta)
        expected = -max(1.0 - k / 4, 0.0)
        assert all(torch.allclose(u, torch.full_like(u, expected)) for u in tree.leaves(updates))
