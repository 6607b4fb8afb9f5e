"""How tasks are scheduled changes the schedule, not the result: ``tune_strategy`` picks and
records candidates (algorithms and per-task functions), and ``meta_grad`` by pieces of tasks
equals one backward through the whole meta-batch."""

from __future__ import annotations

import dataclasses

import pytest
import torch
import torch.nn.functional as F
from helpers import LR, conv_batch, sine_mlp, sine_tasks
from references import check, ref_meta_grad

from metafunc import TaskBatch, conv4, tree
from metafunc.algorithms import MAML, FirstOrderMAML, ProtoNet

# two intra-op threads, so that the 'threads' strategy runs tasks concurrently
pytestmark = pytest.mark.usefixtures("two_intra_op_threads")


@pytest.fixture
def batch(gen):
    return conv_batch(gen)


def test_tune_strategy_picks_the_fastest_candidate_and_records_each(gen, batch):
    from metafunc.algorithms import tune_strategy

    alg = MAML(conv4(3, hidden=6), inner_lr=LR, inner_steps=2, strategy="auto")
    meta = alg.init(gen, dtype=torch.float64)
    now = [0.0]  # a fake clock: each step costs what its candidate is given below, exactly
    cost = {"loop": [0.5, 0.2, 0.3, 0.4], "chunked": [0.1, 0.6, 0.6, 0.6], "vmap": [1.0, 0.25]}
    seen: list[str] = []

    def step(candidate, meta, work):
        seen.append(candidate.strategy)
        costs = cost[candidate.strategy]
        now[0] += costs[min(seen.count(candidate.strategy), len(costs)) - 1]
        return candidate.meta_grad(meta, work)

    candidates = [("loop", None), ("chunked", 2), ("vmap", None)]
    fastest, times = tune_strategy(
        alg, meta, batch, candidates=candidates, repeats=3, step=step, timer=lambda: now[0]
    )
    # medians of the timed rounds (the warm-up's cost does not count): 0.3, 0.6, 0.25
    assert times == {"loop": 0.3, "chunked:2": 0.6, "vmap": 0.25}
    assert fastest == dataclasses.replace(alg, strategy="vmap")
    # a warm-up round, then three timed rounds, each starting one candidate later
    assert seen == [
        "loop", "chunked", "vmap",  "chunked", "vmap", "loop",
        "vmap", "loop", "chunked",  "loop", "chunked", "vmap",
    ]  # fmt: skip
    # a strategy changes the schedule, not the result
    ref = ref_meta_grad(meta, batch, 2, lr=lambda leaves, k, n: LR)
    check(fastest, meta, batch, ref)
    fastest, _ = tune_strategy(alg, meta, batch, candidates=[("chunked", 2)], step=step)
    assert fastest.strategy == "chunked" and fastest.chunk_size == 2

    # the default work is the candidate's meta_grad; the default candidates those of the device
    fastest, times = tune_strategy(alg, meta, batch, repeats=1)
    assert list(times) == ["loop", "vmap", "threads"]  # two intra-op threads here
    assert all(isinstance(t, float) and t > 0 for t in times.values())


def test_tune_strategy_skips_what_does_not_fit_and_says_when_nothing_does(gen, batch):
    from metafunc.algorithms import tune_strategy

    alg = FirstOrderMAML(conv4(3, hidden=6), inner_lr=LR, inner_steps=1, chunk_size=3)
    meta = alg.init(gen, dtype=torch.float64)

    def vmap_does_not_fit(candidate, meta, work):
        if candidate.strategy == "vmap":
            raise torch.OutOfMemoryError("out of memory (simulated)")
        return candidate.meta_grad(meta, work)

    fastest, times = tune_strategy(
        alg, meta, batch, candidates=[("vmap", None), ("loop", None)], step=vmap_does_not_fit
    )
    assert times["vmap"] == "out of memory" and isinstance(times["loop"], float)
    assert fastest.strategy == "loop" and fastest.chunk_size == 3  # the rest is kept

    calls = {"loop": 0, "vmap": 0}

    def loop_runs_out_in_a_timed_round(candidate, meta, work):
        calls[candidate.strategy] += 1
        if candidate.strategy == "loop" and calls["loop"] == 3:
            raise torch.OutOfMemoryError("out of memory (simulated)")
        return candidate.meta_grad(meta, work)

    fastest, times = tune_strategy(
        alg, meta, batch, candidates=[("loop", None), ("vmap", None)], repeats=3,
        step=loop_runs_out_in_a_timed_round,
    )  # fmt: skip
    assert list(times) == ["loop", "vmap"] and times["loop"] == "out of memory"
    assert fastest.strategy == "vmap" and calls == {"loop": 3, "vmap": 4}

    def cpu_allocator_fails_for_vmap(candidate, meta, work):  # the CPU's error is a RuntimeError
        if candidate.strategy == "vmap":
            raise RuntimeError("DefaultCPUAllocator: can't allocate memory (simulated)")
        return candidate.meta_grad(meta, work)

    fastest, times = tune_strategy(
        alg, meta, batch, candidates=[("vmap", None), ("loop", None)],
        step=cpu_allocator_fails_for_vmap,
    )  # fmt: skip
    assert times["vmap"] == "out of memory" and fastest.strategy == "loop"

    def a_bug(candidate, meta, work):
        raise RuntimeError("shape mismatch (simulated)")

    with pytest.raises(RuntimeError, match="shape mismatch"):  # other errors are not swallowed
        tune_strategy(alg, meta, batch, step=a_bug)

    def nothing_fits(candidate, meta, work):
        raise torch.OutOfMemoryError("out of memory (simulated)")

    with pytest.raises(torch.OutOfMemoryError, match="no candidate fits in memory.*chunked") as e:
        tune_strategy(alg, meta, batch, step=nothing_fits)
    assert e.value.timings == {"loop": "out of memory", "vmap": "out of memory",
                               "threads": "out of memory"}  # fmt: skip


@pytest.mark.parametrize(
    ("kwargs", "error", "message"),
    [
        ({"candidates": [("auto", None)]}, ValueError, "candidate strategy 'auto' is not one of"),
        (
            {"candidates": [("chunked", None)]},
            ValueError,
            r"candidate \('chunked', None\) needs a chunk size >= 1",
        ),
        ({"candidates": []}, ValueError, "candidates is empty"),
        ({"repeats": 0}, ValueError, "repeats must be an int >= 1"),
        ({"candidates": ["loop"]}, ValueError, r"candidates holds 'loop'; give \(strategy, "),
        (
            {"candidates": [("vmap", 4)]},
            ValueError,
            r"candidate \('vmap', 4\): only 'chunked' takes",
        ),
    ],
)
def test_tune_strategy_rejects_bad_arguments(gen, batch, kwargs, error, message):
    from metafunc.algorithms import tune_strategy

    alg = MAML(conv4(3, hidden=6), inner_lr=LR, inner_steps=1)
    meta = alg.init(gen, dtype=torch.float64)
    with pytest.raises(error, match=r"tune_strategy\(algorithm, meta_params, batch\): " + message):
        tune_strategy(alg, meta, batch, **kwargs)
    with pytest.raises(TypeError, match="algorithm is a str, not an Algorithm instance"):
        tune_strategy("maml", meta, batch)  # type: ignore[type-var]
    with pytest.raises(TypeError, match="algorithm is the class MAML, not an Algorithm instance"):
        tune_strategy(MAML, meta, batch)  # type: ignore[type-var]


def test_tune_strategy_times_any_per_task_function(gen, batch):
    """Given a per-task function, tune_strategy returns its fastest task_map; every candidate
    computes the same gradient."""
    from metafunc.algorithms import tune_strategy

    model = conv4(3, hidden=6)
    params = model.init(gen, dtype=torch.float64)

    def task_loss(p, task):
        return F.cross_entropy(model.apply(p, task.query_x), task.query_y)

    mapped, times = tune_strategy(task_loss, params, batch, repeats=1)
    assert list(times) == ["loop", "vmap", "threads"]
    assert all(isinstance(t, float) and t > 0 for t in times.values())
    grads = torch.func.grad(lambda p: mapped(p, batch).mean())(params)
    loop = torch.func.grad(lambda p: task_map_loop(task_loss)(p, batch).mean())(params)
    assert tree.allclose(grads, loop, rtol=1e-10, atol=1e-12)
    with pytest.raises(TypeError, match="or a per-task function"):
        tune_strategy(MAML, params, batch)


def task_map_loop(fn):
    from metafunc import task_map

    return task_map(fn, strategy="loop")


@pytest.mark.parametrize(
    "make",
    [
        lambda s: MAML(
            sine_mlp(), inner_lr=0.02, inner_steps=2, loss="mse", strategy=s, chunk_size=2
        ),
        lambda s: ProtoNet(conv4(None, hidden=4), shots=2, strategy=s, chunk_size=2),
    ],
    ids=["maml", "protonet"],
)
@pytest.mark.parametrize("strategy", ["loop", "chunked"])
def test_meta_grad_by_pieces_equals_the_whole_batch(make, strategy, monkeypatch):
    """``meta_grad`` differentiates a piece of tasks at a time (one on the loop, ``chunk_size``
    chunked) and averages by task count: the same gradient, loss and metrics as one backward
    through the whole meta-batch, also with a short last piece (5 tasks in pieces of 2)."""
    alg = make(strategy)
    gen = torch.Generator().manual_seed(3)
    meta = tree.map(lambda x: x.double(), alg.init(gen))
    if isinstance(alg, ProtoNet):
        x = torch.randn(5, 6, 1, 28, 28, generator=gen, dtype=torch.float64)
        y = torch.arange(3).repeat_interleave(2).expand(5, -1).clone()
        batch = TaskBatch(x, y, x.flip(1), y.flip(1))
    else:
        batch = sine_tasks(gen, 5, dtype=torch.float64)
    assert alg.tasks_per_graph(batch, torch.device("cpu")) == (1 if strategy == "loop" else 2)
    grads, loss, metrics = alg.meta_grad(meta, batch)
    monkeypatch.setattr(type(alg), "tasks_per_graph", lambda self, b, device: b.num_tasks)
    whole, whole_loss, whole_metrics = alg.meta_grad(meta, batch)
    assert float(tree.global_norm(tree.sub(grads, whole))) <= 1e-12 * float(tree.global_norm(whole))
    assert float(loss) == pytest.approx(float(whole_loss), rel=1e-12)
    assert metrics.keys() == whole_metrics.keys()
    for k in metrics:
        assert float(metrics[k]) == pytest.approx(float(whole_metrics[k]), rel=1e-12)
