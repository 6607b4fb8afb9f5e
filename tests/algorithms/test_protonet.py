"""Prototypical Networks: the meta-gradient in float64 against a per-task reference (on every
per-task strategy and each device), the halving outer learning rate, and one instance training
60-way and evaluating 5-way."""

from __future__ import annotations

import pytest
import torch
from helpers import class_tasks, to
from references import ref_protonet_loss, rel_err

from metafunc import TaskBatch, conv4, optim
from metafunc.algorithms import ProtoNet


# two intra-op threads, so that the 'threads' strategy runs tasks concurrently
@pytest.mark.usefixtures("two_intra_op_threads")
@pytest.mark.parametrize("strategy", ["loop", "vmap", "threads"])
def test_protonet_gradient_matches_per_task_reference(gen, device, strategy):
    alg = ProtoNet(conv4(None, hidden=8), shots=2, strategy=strategy)
    meta = alg.init(gen, dtype=torch.float64)
    batch = class_tasks(gen, tasks=3, ways=3, shots=2, queries=2)
    grads, loss, metrics = alg.meta_grad(to(device, meta), to(device, batch))
    leaves = {k: v.clone().requires_grad_() for k, v in meta["params"].items()}
    ref_loss = ref_protonet_loss(leaves, batch, ways=3)
    ref = dict(zip(leaves, torch.autograd.grad(ref_loss, list(leaves.values())), strict=True))
    assert abs(float(loss.cpu() - ref_loss.detach())) <= 1e-12
    assert rel_err(grads["params"], ref) <= 1e-10
    assert 0.0 <= float(metrics["accuracy"]) <= 1.0


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


def test_protonet_trains_60_way_and_evaluates_5_way(gen):
    """One instance (shots=1) trains on 60-way episodes and evaluates 5-way ones."""
    alg = ProtoNet(conv4(None, hidden=8, image_size=14), shots=1, strategy="vmap")
    meta = alg.init(gen)
    patterns = torch.randn(80, 1, 14, 14, generator=gen)  # one pattern per class

    def episode(ways, classes):
        x = patterns[classes].repeat_interleave(2, 0) + 0.5 * torch.randn(
            2 * ways, 1, 14, 14, generator=gen
        )
        y = torch.arange(ways).repeat_interleave(2)
        return TaskBatch(x[0::2][None], y[0::2][None], x[1::2][None], y[1::2][None])

    opt = alg.outer_optimizer(1e-2, 20)
    state = opt.init(meta)
    losses = []
    for _ in range(10):
        grads, loss, _ = alg.meta_grad(meta, episode(60, torch.randperm(60, generator=gen)))
        updates, state = opt.update(grads, state, meta)
        meta = optim.apply_updates(meta, updates)
        losses.append(float(loss))
    assert losses[-1] < losses[0]
    test = episode(5, 60 + torch.randperm(20, generator=gen)[:5])  # unseen classes
    preds = alg.adapt_and_predict(meta, test, steps=2)
    assert preds.shape == (1, 3, 5, 5)
    assert torch.equal(preds[:, 0], preds[:, 2])
    assert float(alg.evaluate(meta, test, steps=0)["accuracy"].mean()) >= 0.8
