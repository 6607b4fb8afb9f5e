"""Schedules the algorithms build in: MAML++'s multi-step loss weights and cosine-annealed outer
rate, Reptile's linearly annealed outer step, ProtoNet's halving outer rate."""

from __future__ import annotations

import math

import pytest
import torch

from metafunc import conv4, mlp, optim, tree
from metafunc.algorithms import MAMLPlusPlus, ProtoNet, Reptile
from metafunc.algorithms.mamlpp import msl_weights


def test_msl_weights_anneal_to_the_last_step():
    w0 = msl_weights(5, 0, 100)
    assert torch.allclose(w0, torch.full((5,), 0.2, dtype=torch.float64))
    w50 = msl_weights(5, 50, 100)
    assert w50[-1] > 0.2 > w50[0] >= 0.03 / 5 and abs(float(w50.sum()) - 1) < 1e-9
    assert msl_weights(5, 100, 100).tolist() == [0, 0, 0, 0, 1]


def test_mamlpp_outer_rate_is_cosine_annealed_by_its_optimizer():
    alg = MAMLPlusPlus(mlp((1, 4, 1)), min_outer_lr=1e-5)
    lr, iterations = 1e-3, 40
    schedule = alg.outer_schedule(lr, iterations)
    for t in (0, 10, 20, 30, 40):
        cosine = 1e-5 + (lr - 1e-5) * (1 + math.cos(math.pi * t / iterations)) / 2
        assert abs(float(schedule(t)) - cosine) < 1e-12
    # the optimizer applies that rate: Adam's first step moves each weight by about the rate
    opt = alg.outer_optimizer(lr, iterations)
    params = {"w": torch.zeros(3, dtype=torch.float64)}
    state = opt.init(params)
    for t in range(iterations):
        updates, state = opt.update({"w": torch.ones(3, dtype=torch.float64)}, state, params)
        step = float(updates["w"].abs().max())
        assert abs(step - float(schedule(t))) < 1e-6 * float(schedule(t)), t
        params = optim.apply_updates(params, updates)


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


EMBED = conv4(None, hidden=4)


def test_protonet_outer_learning_rate_halves_on_schedule():
    alg = ProtoNet(EMBED, shots=1, halve_every=2)
    opt = alg.outer_optimizer(1.0, 7)
    params = {"w": torch.zeros(3, dtype=torch.float64)}
    state, steps = opt.init(params), []
    for _ in range(7):  # a constant gradient: Adam's step is the learning rate
        updates, state = opt.update({"w": torch.ones(3, dtype=torch.float64)}, state, params)
        steps.append(-float(updates["w"][0]))
    assert steps == pytest.approx([1, 1, 0.5, 0.5, 0.25, 0.25, 0.125], rel=1e-6)
    schedule = alg.outer_schedule(1.0, 7)  # what the harness logs is what Adam applied
    assert [float(schedule(torch.tensor(t))) for t in range(7)] == pytest.approx(steps, rel=1e-6)
    assert ProtoNet(EMBED, shots=1, halve_every=None).outer_optimizer(1.0, 7) is not None
    with pytest.raises(ValueError, match=r"ProtoNet\(halve_every\)"):
        ProtoNet(EMBED, shots=1, halve_every=0)
