"""Random draws per task (``randomness=``): dropout trains under every strategy, the same meaning
under each, repeatable under a fixed seed, 'loop' and 'threads' alike; evaluation in inference
mode is deterministic and equal across strategies."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import metafunc as mf
from metafunc import TaskBatch, tree
from metafunc.algorithms import MAML, FirstOrderMAML, ProtoNet

WAYS = 3
PER_TASK = ["vmap", "loop", "threads"]


def net(head: bool) -> mf.Model:
    torch.manual_seed(0)
    layers: list[nn.Module] = [
        nn.Conv2d(1, 4, 3, stride=2, padding=1),
        nn.BatchNorm2d(4),
        nn.ReLU(),
        nn.Dropout(0.3),
        nn.Flatten(),
    ]
    if head:
        layers.append(nn.Linear(4 * 7 * 7, WAYS))
    return mf.from_module(nn.Sequential(*layers), head="5" if head else None)


def batch(gen: torch.Generator, tasks: int = 4, dtype: torch.dtype = torch.float32) -> TaskBatch:
    x = torch.randn(tasks, 2 * WAYS, 1, 14, 14, generator=gen, dtype=dtype)
    q = torch.randn(tasks, 2 * WAYS, 1, 14, 14, generator=gen, dtype=dtype)
    y = torch.arange(WAYS).repeat(2).expand(tasks, -1).clone()
    return TaskBatch(x, y, q, y)


MAKERS = {
    "MAML": lambda s: MAML(net(True), inner_lr=0.1, strategy=s),
    "FOMAML": lambda s: FirstOrderMAML(net(True), inner_lr=0.1, strategy=s),
    "ProtoNet": lambda s: ProtoNet(net(False), shots=2, strategy=s),
}


def meta_grad_at(alg, meta, b, seed: int):
    torch.manual_seed(seed)
    return alg.meta_grad(meta, b)


@pytest.mark.parametrize("name", list(MAKERS))
def test_dropout_and_batch_norm_train_under_every_strategy(gen, name):
    """A from_module network with Dropout and BatchNorm trains with each algorithm under vmap,
    loop and threads; a fixed seed repeats a meta-gradient exactly, and loop and threads draw
    the same masks (the same gradient bit for bit)."""
    b = batch(gen)
    grads = {}
    for strategy in PER_TASK:
        alg = MAKERS[name](strategy)
        meta = alg.init(torch.Generator().manual_seed(1))
        g1, loss, _ = meta_grad_at(alg, meta, b, 5)
        g2, _, _ = meta_grad_at(alg, meta, b, 5)
        assert tree.allclose(g1, g2, rtol=0, atol=0), strategy  # repeatable
        g3, _, _ = meta_grad_at(alg, meta, b, 6)
        assert not tree.allclose(g1, g3), strategy  # dropout really draws
        assert torch.isfinite(loss)
        opt = alg.outer_optimizer(1e-2, 5)
        state = opt.init(meta)
        losses = []
        for _ in range(5):
            g, loss, _ = alg.meta_grad(meta, b)
            updates, state = opt.update(g, state, meta)
            meta = mf.optim.apply_updates(meta, updates)
            losses.append(float(loss))
        assert all(map(torch.isfinite, map(torch.tensor, losses))), losses
        grads[strategy] = g1
    assert tree.allclose(grads["loop"], grads["threads"], rtol=0, atol=0)


def test_check_strategies_passes_on_dropout_with_the_same_draws(gen):
    """Second order, float64: the loop, vmap, chunked vmap and threads agree on a network with
    Dropout and BatchNorm when every task draws alike (randomness='same')."""
    model = net(True)
    params = tree.cast(model.init(), torch.float64)
    b = batch(gen, dtype=torch.float64)

    def task_loss(p, task):
        inner = mf.adapt(
            lambda q, t: F.cross_entropy(model.apply(q, t.support_x), t.support_y),
            mf.optim.sgd(0.1),
            2,
        )
        adapted, _ = inner(p, task)
        return F.cross_entropy(model.apply(adapted, task.query_x), task.query_y)

    errors = mf.check_strategies(
        task_loss, params, b, strategies=("vmap", "chunked", "threads"), chunk_size=3, rtol=1e-10
    )
    assert max(errors.values()) <= 1e-10
    with pytest.raises(ValueError, match="randomness='different' draws differently"):
        mf.check_strategies(task_loss, params, b, randomness="different")
    with pytest.raises(
        ValueError, match=r"calls F\.dropout, a random draw, but randomness='error'"
    ):
        mf.check_strategies(task_loss, params, b, randomness="error")


def masks(strategy: str, randomness: str, tasks: int = 5) -> torch.Tensor:
    ones = torch.ones(tasks, 64)
    fn = mf.task_map(
        lambda _, x: F.dropout(x, 0.5), strategy=strategy, randomness=randomness, chunk_size=2
    )
    return fn(torch.zeros(1), ones)


@pytest.mark.parametrize("strategy", ["vmap", "chunked", "loop", "threads"])
def test_randomness_means_the_same_under_every_strategy(strategy):
    torch.manual_seed(0)
    different = masks(strategy, "different")
    assert all(not torch.equal(different[0], different[i]) for i in range(1, 5))
    same = masks(strategy, "same")
    assert all(torch.equal(same[0], same[i]) for i in range(1, 5))
    torch.manual_seed(3)
    first = masks(strategy, "different")
    torch.manual_seed(3)
    assert torch.equal(first, masks(strategy, "different"))  # repeatable
    with pytest.raises(ValueError, match=r"task_map\(fn, strategy=.*randomness='error'"):
        masks(strategy, "error")


def test_loop_and_threads_draw_alike_and_leave_the_global_stream_repeatable():
    torch.manual_seed(7)
    loop = masks("loop", "different", tasks=8)
    after_loop = torch.rand(3)
    torch.manual_seed(7)
    threads = masks("threads", "different", tasks=8)
    after_threads = torch.rand(3)
    assert torch.equal(loop, threads)
    assert torch.equal(after_loop, after_threads)


@pytest.mark.parametrize("name", ["MAML", "ProtoNet"])
def test_evaluate_is_deterministic_and_equal_across_strategies(gen, name):
    """Evaluation runs the model in inference mode: dropout off, so a fixed seed is not even
    needed, and every strategy gives the same metrics; training=True keeps dropout on."""
    b = batch(gen, dtype=torch.float64)
    results = {}
    for strategy in PER_TASK:
        alg = MAKERS[name](strategy)
        meta = tree.cast(alg.init(torch.Generator().manual_seed(1)), torch.float64)
        torch.manual_seed(1)
        first = alg.evaluate(meta, b, 2)
        torch.manual_seed(2)
        second = alg.evaluate(meta, b, 2)
        for k in first:
            assert torch.equal(first[k], second[k]), (strategy, k)
        results[strategy] = first
        torch.manual_seed(1)
        on = alg.evaluate(meta, b, 2, training=True)
        torch.manual_seed(2)
        assert not torch.equal(on["loss"], alg.evaluate(meta, b, 2, training=True)["loss"])
    for strategy in PER_TASK[1:]:
        for k, v in results["vmap"].items():
            torch.testing.assert_close(results[strategy][k], v, rtol=1e-10, atol=1e-12)
