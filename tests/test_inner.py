"""The inner loop and task_map against an explicit per-task autograd reference in float64."""

from __future__ import annotations

import multiprocessing
import os
import threading

import pytest
import torch
import torch.nn.functional as F
from references import ref_conv4

from metafunc import (
    TaskBatch,
    adapt,
    check_strategies,
    conv4,
    from_module,
    mlp,
    optim,
    task_map,
    tree,
)
from metafunc.algorithms import MAML
from metafunc.inner import grad_with_aux
from metafunc.strategies import default_strategy, task_workers
from metafunc.threads import run_tasks

STRATEGY_KW = {
    "loop": {"strategy": "loop"},
    "vmap": {"strategy": "vmap"},
    "chunked": {"strategy": "chunked", "chunk_size": 3},  # 4 tasks: a full and a partial chunk
    "auto": {"strategy": "auto"},
    "threads": {"strategy": "threads"},  # under torch.func.grad: the tasks run in turn (below)
}


# ---------------------------------------------------------------------------------------------
# An independent reference: conv4 written with F.conv2d/F.batch_norm (plain autograd, no vmap),
# and MAML's meta-gradient as an explicit per-task torch.autograd.grad(create_graph=True) loop.
# ---------------------------------------------------------------------------------------------


def ref_meta_grad(forward, params, batch, lr, steps, *, first_order=False, adapt_keys=None):
    names = list(params)
    leaves = [params[k].detach().clone().requires_grad_() for k in names]
    total = 0.0
    for t in range(batch.support_x.shape[0]):
        fast = dict(zip(names, leaves, strict=True))
        for _ in range(steps):
            keys = adapt_keys or names
            loss = F.cross_entropy(forward(fast, batch.support_x[t]), batch.support_y[t])
            grads = torch.autograd.grad(loss, [fast[k] for k in keys], create_graph=not first_order)
            fast = {**fast, **{k: fast[k] - lr * g for k, g in zip(keys, grads, strict=True)}}
        total = total + F.cross_entropy(forward(fast, batch.query_x[t]), batch.query_y[t])
    meta_loss = total / batch.support_x.shape[0]
    grads = torch.autograd.grad(meta_loss, leaves)
    return meta_loss.detach(), dict(zip(names, grads, strict=True))


def rel_err(a: dict, b: dict) -> float:
    assert tree.structure(a) == tree.structure(b)
    return float(tree.global_norm(tree.sub(a, b)) / tree.global_norm(b))


def make_tasks(gen, tasks=4, ways=3, shots=2, queries=2, size=28, dtype=torch.float64):
    def split(n):
        x = torch.randn(tasks, ways * n, 1, size, size, generator=gen, dtype=dtype)
        y = torch.arange(ways).repeat_interleave(n).expand(tasks, -1).clone()
        return x, y

    sx, sy = split(shots)
    qx, qy = split(queries)
    return TaskBatch(sx, sy, qx, qy)


def maml_objective(model, lr, steps, *, first_order=False, trainable=None, strategy_kw=None):
    def loss_fn(p, task):
        return F.cross_entropy(model.apply(p, task.support_x), task.support_y)

    inner = adapt(loss_fn, optim.sgd(lr), steps, first_order=first_order, trainable=trainable)

    def task_loss(p, task):
        adapted, _ = inner(p, task)
        return F.cross_entropy(model.apply(adapted, task.query_x), task.query_y)

    mapped = task_map(task_loss, **(strategy_kw or {}))
    return lambda p, batch: mapped(p, batch).mean()


# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("strategy", list(STRATEGY_KW))
@pytest.mark.parametrize("first_order", [False, True])
def test_conv4_bn_meta_gradient_matches_per_task_autograd(gen, strategy, first_order):
    """Acceptance: 5-step inner loop on conv4 with batch norm, 4 tasks, every strategy."""
    model = conv4(3, hidden=8)
    params = model.init(gen, dtype=torch.float64)
    batch = make_tasks(gen)
    ref_loss, ref = ref_meta_grad(ref_conv4, params, batch, 0.4, 5, first_order=first_order)
    objective = maml_objective(
        model, 0.4, 5, first_order=first_order, strategy_kw=STRATEGY_KW[strategy]
    )
    grads, loss = torch.func.grad_and_value(objective)(params, batch)
    assert torch.allclose(loss, ref_loss, rtol=1e-12)
    assert rel_err(grads, ref) <= 1e-8


def test_first_and_second_order_differ(gen):
    """Guards the two reference checks above against a reference that ignores first_order."""
    model = conv4(3, hidden=8)
    params = model.init(gen, dtype=torch.float64)
    batch = make_tasks(gen)
    _, second = ref_meta_grad(ref_conv4, params, batch, 0.4, 2)
    _, first = ref_meta_grad(ref_conv4, params, batch, 0.4, 2, first_order=True)
    assert rel_err(first, second) > 1e-3


def test_torch_autograd_outer_loop_matches_torch_func(gen):
    model = conv4(3, hidden=8)
    params = model.init(gen, dtype=torch.float64)
    batch = make_tasks(gen, tasks=2)
    objective = maml_objective(model, 0.4, 2, strategy_kw={"strategy": "vmap"})
    functional = torch.func.grad(objective)(params, batch)
    leaves = {k: v.clone().requires_grad_() for k, v in params.items()}
    objective(leaves, batch).backward()
    assert rel_err({k: v.grad for k, v in leaves.items()}, functional) <= 1e-12


@pytest.mark.parametrize("strategy", ["loop", "vmap"])
def test_trainable_head_only_matches_reference(gen, strategy):
    """ANIL-style: only the head adapts; the body still receives meta-gradients."""
    model = conv4(3, hidden=8)
    params = model.init(gen, dtype=torch.float64)
    batch = make_tasks(gen)
    _, ref = ref_meta_grad(
        ref_conv4, params, batch, 0.4, 3, adapt_keys=["head.weight", "head.bias"]
    )
    objective = maml_objective(model, 0.4, 3, trainable="head", strategy_kw={"strategy": strategy})
    grads = torch.func.grad(objective)(params, batch)
    assert rel_err(grads, ref) <= 1e-8
    assert float(grads["conv0.weight"].abs().sum()) > 0


def test_gradcheck_and_gradgradcheck_tiny_mlp():
    model = mlp((1, 4, 1))
    gen = torch.Generator().manual_seed(3)
    params = model.init(gen, dtype=torch.float64)
    x = torch.randn(2, 5, 1, generator=gen, dtype=torch.float64)
    y = torch.randn(2, 5, 1, generator=gen, dtype=torch.float64)
    batch = TaskBatch(x, y, x + 0.5, y)
    names = list(params)

    def loss_fn(p, task):
        return F.mse_loss(model.apply(p, task.support_x), task.support_y)

    inner = adapt(loss_fn, optim.sgd(0.1, momentum=0.5), 2)

    def task_loss(p, task):
        adapted, _ = inner(p, task)
        return F.mse_loss(model.apply(adapted, task.query_x), task.query_y)

    mapped = task_map(task_loss, strategy="vmap")

    def f(*leaves):
        return mapped(dict(zip(names, leaves, strict=True)), batch).mean()

    inputs = tuple(params[k].clone().requires_grad_() for k in names)
    assert torch.autograd.gradcheck(f, inputs)
    assert torch.autograd.gradgradcheck(f, inputs)


def test_adapt_metrics_and_zero_steps(gen):
    model = mlp()
    params = model.init(gen, dtype=torch.float64)
    x = torch.linspace(-5, 5, 10, dtype=torch.float64)[:, None]
    task = TaskBatch(x, torch.sin(x), x, torch.sin(x))

    def loss_fn(p, t):
        return F.mse_loss(model.apply(p, t.support_x), t.support_y)

    adapted, metrics = adapt(loss_fn, optim.sgd(0.01), 0)(params, task)
    assert tree.allclose(adapted, params) and metrics["loss"].shape == (0,)
    observe = adapt(loss_fn, optim.sgd(0.05), 10, observe=loss_fn)
    adapted, metrics = observe(params, task)
    assert metrics["loss"].shape == (10,) and metrics["observed"].shape == (11,)
    # the support loss before step k is what observe saw at point k, and it decreases
    assert torch.allclose(metrics["observed"][:10], metrics["loss"])
    assert metrics["observed"][-1] < metrics["observed"][0]
    assert metrics["observed"].requires_grad is False  # params were not leaves requiring grad


def test_stateful_adapt_threads_running_statistics(gen):
    """MAML++-style state: running statistics are threaded through every step, per task."""
    model = conv4(3, hidden=8)
    params = model.init(gen, dtype=torch.float64)
    state0 = model.init_state(dtype=torch.float64)
    batch = make_tasks(gen, tasks=3)

    def loss_fn(p, task, state, step):
        logits, state = model.apply(p, task.support_x, state=state)
        return F.cross_entropy(logits, task.support_y), state

    inner = adapt(loss_fn, optim.sgd(0.4), 3, stateful=True)

    def task_loss(p, task, state):
        adapted, state, _ = inner(p, task, state)
        return F.cross_entropy(model.apply(adapted, task.query_x), task.query_y), state

    outs = {
        s: task_map(task_loss, strategy=s, in_dims=(None, 0, None))(params, batch, state0)
        for s in ("loop", "vmap")
    }
    assert torch.allclose(outs["loop"][0], outs["vmap"][0], rtol=1e-12)
    assert tree.allclose(outs["loop"][1], outs["vmap"][1], rtol=1e-12)
    # three momentum-0.1 updates moved the running mean away from zero, per task
    means = outs["loop"][1]["bn0.running_mean"]
    assert means.shape == (3, 8) and float(means.abs().min()) > 0
    assert not torch.allclose(means[0], means[1])


def test_check_strategies_reports_agreement(gen):
    model = conv4(3, hidden=8)
    params = model.init(gen, dtype=torch.float64)
    batch = make_tasks(gen, tasks=2)

    def loss_fn(p, task):
        return F.cross_entropy(model.apply(p, task.support_x), task.support_y)

    inner = adapt(loss_fn, optim.sgd(0.4), 1)

    def task_loss(p, task):
        return loss_fn(inner(p, task)[0], task)

    errors = check_strategies(task_loss, params, batch, strategies=("vmap",), rtol=1e-10)
    assert errors["vmap"] <= 1e-10


def test_check_strategies_catches_f_batch_norm_under_vmap(gen):
    """F.batch_norm under vmap gives wrong second-order gradients on this torch (functorch#534);
    check_strategies is how a user finds out. Skips if an upstream fix makes them agree."""
    model = conv4(3, hidden=8)
    params = model.init(gen, dtype=torch.float64)
    batch = make_tasks(gen, tasks=2)

    def task_loss(p, task):
        def loss_fn(q, t):
            return F.cross_entropy(ref_conv4(q, t.support_x), t.support_y)

        adapted, _ = adapt(loss_fn, optim.sgd(0.4), 1)(p, task)
        return F.cross_entropy(ref_conv4(adapted, task.query_x), task.query_y)

    try:
        check_strategies(task_loss, params, batch, rtol=1e-8)
    except ValueError as err:
        assert "'vmap' differs from the per-task loop" in str(err)
    else:
        pytest.skip("F.batch_norm is exact under vmap on this torch; the upstream bug is fixed")


# ---------------------------------------------------------------------------------------------
# Bad input
# ---------------------------------------------------------------------------------------------


def _sin_task(n=4):
    x = torch.linspace(-1, 1, n)[:, None]
    return TaskBatch(x, x, x, x)


def _mse(model):
    return lambda p, t: F.mse_loss(model.apply(p, t.support_x), t.support_y)


def test_none_leaf_is_named(gen):
    model = mlp()
    params = {**model.init(gen), "extra": None}
    with pytest.raises(TypeError, match=r"params\['extra'\] is None"):
        adapt(_mse(model), optim.sgd(0.1), 1)(params, _sin_task())


def test_integer_parameter_is_named(gen):
    model = mlp()
    params = model.init(gen)
    params["head.bias"] = torch.zeros(1, dtype=torch.int64)
    with pytest.raises(TypeError, match=r"params\['head.bias'\] is a torch.int64 tensor"):
        adapt(_mse(model), optim.sgd(0.1), 1)(params, _sin_task())


def test_non_tensor_leaf_and_foreign_container(gen):
    model = mlp()
    with pytest.raises(TypeError, match=r"params\['lr'\] is a float"):
        adapt(_mse(model), optim.sgd(0.1), 1)({**model.init(gen), "lr": 0.1}, _sin_task())
    with pytest.raises(TypeError, match=r"params\['s'\] is a set"):
        adapt(_mse(model), optim.sgd(0.1), 1)({**model.init(gen), "s": {1}}, _sin_task())


def test_params_on_different_devices(gen):
    params = mlp().init(gen)
    params["head.bias"] = params["head.bias"].to("meta")
    with pytest.raises(ValueError, match=r"params\['head.bias'\] is on meta but .* is on cpu"):
        adapt(_mse(mlp()), optim.sgd(0.1), 1)(params, _sin_task())


@pytest.mark.parametrize("steps", [-1, 1.5, True])
def test_bad_steps(steps):
    with pytest.raises(ValueError, match=r"adapt\(loss_fn, optimizer, steps\): steps must be"):
        adapt(_mse(mlp()), optim.sgd(0.1), steps)


def test_non_scalar_loss(gen):
    model = mlp()

    def loss_fn(p, t):
        return (model.apply(p, t.support_x) - t.support_y) ** 2

    with pytest.raises(
        ValueError, match=r"returned a tensor of shape \(4, 1\); it must return a scalar"
    ):
        adapt(loss_fn, optim.sgd(0.1), 1)(model.init(gen), _sin_task())


def test_adapt_first_step_given_is_the_step_it_would_take(gen):
    """``first=(grads, loss)`` replaces only the first gradient: with the gradient adapt would
    compute, the result and its second-order gradient are the same; gradients flow into it."""
    model = mlp()
    params = model.init(gen, dtype=torch.float64)
    task = TaskBatch(*(f.double() for f in _sin_task()))
    loss_fn = _mse(model)
    inner = adapt(loss_fn, optim.sgd(0.05), 3, trainable="head")
    head = tree.partition(params, "head")[0]

    def query(p, first=None):
        adapted, metrics = inner(p, task, first=first)
        return F.mse_loss(model.apply(adapted, task.query_x), task.query_y), metrics["loss"]

    want, want_losses = query(params)
    g_want = torch.func.grad(lambda p: query(p)[0])(params)

    def given(p):
        sub = tree.partition(p, "head")
        g, loss = torch.func.grad_and_value(
            lambda h: loss_fn(tree.combine(h, sub[1], sub[2]), task)
        )(sub[0])
        return query(p, (g, loss))

    got, got_losses = given(params)
    assert torch.allclose(got, want, rtol=1e-14) and torch.allclose(got_losses, want_losses)
    g_got = torch.func.grad(lambda p: given(p)[0])(params)
    assert tree.allclose(g_got, g_want, rtol=1e-12, atol=1e-15)
    # a different first gradient moves the result: it is used, not recomputed
    other = (tree.map(lambda x: torch.full_like(x, 10.0), head), want_losses[0])
    assert not torch.allclose(query(params, other)[0], want)


def test_adapt_first_step_bad_arguments(gen):
    model = mlp()
    params = model.init(gen)
    task = _sin_task()
    grads = tree.zeros_like(params)
    loss = torch.zeros(())
    call = r"adapt\(\.\.\.\)\(params, batch, first=\(grads, loss\)\): "
    with pytest.raises(ValueError, match=call + "first is not supported with steps=0"):
        adapt(_mse(model), optim.sgd(0.1), 0)(params, task, first=(grads, loss))
    stateful = adapt(lambda p, t, s, k: (_mse(model)(p, t), s), optim.sgd(0.1), 1, stateful=True)
    with pytest.raises(ValueError, match=call + r"first is not supported with stateful=True"):
        stateful(params, task, {}, first=(grads, loss))
    inner = adapt(_mse(model), optim.sgd(0.1), 1)
    with pytest.raises(TypeError, match=call + "first must be a pair"):
        inner(params, task, first=grads)
    with pytest.raises(ValueError, match=call + r"grads has leaves \['head.bias'\] but"):
        inner(params, task, first=({"head.bias": grads["head.bias"]}, loss))
    with pytest.raises(ValueError, match=call + "loss must be a scalar tensor"):
        inner(params, task, first=(grads, torch.zeros(3)))


def test_bad_optimizer_and_stateful_without_state(gen):
    with pytest.raises(TypeError, match="GradientTransformation"):
        adapt(_mse(mlp()), torch.optim.SGD, 1)  # type: ignore[arg-type]
    inner = adapt(lambda p, t, s, k: (_mse(mlp())(p, t), s), optim.sgd(0.1), 1, stateful=True)
    with pytest.raises(ValueError, match="state is missing"):
        inner(mlp().init(gen), _sin_task())


def test_task_axes_of_different_sizes(gen):
    batch = TaskBatch(
        torch.zeros(4, 3, 1), torch.zeros(4, 3, 1), torch.zeros(5, 3, 1), torch.zeros(4, 3, 1)
    )
    mapped = task_map(lambda p, t: t.query_x.sum())
    with pytest.raises(ValueError, match=r"args\[1\]\.query_x 5"):
        mapped(mlp().init(gen), batch)
    other = {"x": torch.zeros(4, 2), "y": [torch.zeros(5, 2)]}  # a plain tree: paths by key
    with pytest.raises(
        ValueError, match=r"args\[1\]\['x'\] has 4 tasks but args\[1\]\['y'\]\[0\] has 5"
    ):
        task_map(lambda p, t: t["x"].sum())(mlp().init(gen), other)


def test_task_map_bad_arguments(gen):
    with pytest.raises(ValueError, match="unknown strategy"):
        task_map(lambda p, t: p, strategy="processes")
    with pytest.raises(ValueError, match="'chunked' needs chunk_size"):
        task_map(lambda p, t: p, strategy="chunked")
    with pytest.raises(ValueError, match="in_dims entries must be 0 or None"):
        task_map(lambda p, t: p, in_dims=(None, 1))
    mapped = task_map(lambda p, t: t.sum())
    with pytest.raises(TypeError, match="got 1 arguments but in_dims has 2"):
        mapped(torch.zeros(3))
    with pytest.raises(ValueError, match="no task axis"):
        mapped(None, {"x": torch.zeros(())})


# ---------------------------------------------------------------------------------------------
# The 'threads' strategy: tasks run concurrently on CPU threads, one intra-op thread each.
# ---------------------------------------------------------------------------------------------


def test_default_strategy_is_the_loop_for_convolutions_on_the_cpu():
    """'auto' holds one task's graph at a time where vmap's grouped convolutions would be slow
    (the CPU), and is vmap elsewhere."""
    assert default_strategy("cpu") == "loop"
    assert default_strategy("cpu", convolutional=False) == "vmap"
    assert default_strategy("cuda") == "vmap"


def test_threads_run_tasks_concurrently_on_one_intra_op_thread_each(intra_op_threads):
    seen = []
    barrier = threading.Barrier(2, timeout=30)  # passes only if two tasks run at the same time

    def fn(p, t):
        barrier.wait()
        seen.append((threading.current_thread().name, torch.get_num_threads()))
        return p * t.sum()

    with intra_op_threads(2):
        assert task_workers("threads", "cpu") == 2 and task_workers("auto", "cpu") == 1
        assert task_workers("loop", "cpu") == 1 and task_workers("threads", "meta") == 1
        out = task_map(fn, strategy="threads")(torch.tensor(2.0), torch.arange(8.0).view(4, 2))
        assert torch.get_num_threads() == 2  # the caller's setting is untouched
    assert torch.equal(out, 2 * torch.tensor([1.0, 5.0, 9.0, 13.0]))  # in task order
    assert len(seen) == 4 and all(n.startswith("metafunc-task") and k == 1 for n, k in seen)
    with intra_op_threads(1):
        assert task_workers("threads", "cpu") == 1  # one thread: the loop


@pytest.mark.parametrize("shared", [False, True])
def test_threads_meta_grad_is_the_loop_on_one_thread_bit_for_bit(gen, shared, intra_op_threads):
    """Without the shared first step each worker computes its task exactly as the loop does on
    one thread. With it, the first step runs batched on the calling thread's intra-op threads:
    bit-equal to the loop run on those threads, then the rest per task as without it."""
    kw = {"inner_lr": 0.4, "inner_steps": 2, "shared_first_step": shared}
    alg = MAML(conv4(3, hidden=8), strategy="threads", **kw)
    meta = alg.init(gen)
    batch = make_tasks(gen, tasks=5, dtype=torch.float32)
    loop = MAML(alg.model, strategy="loop", **kw)
    with intra_op_threads(1):  # each worker computes one task exactly as the loop does here
        ref = loop.meta_grad(meta, batch)
    with intra_op_threads(2):  # the same bits on every call, whichever thread finishes first
        runs = [alg.meta_grad(meta, batch) for _ in range(2)]

    def bits(x, y):
        return all(torch.equal(a, b) for a, b in zip(tree.leaves(x), tree.leaves(y), strict=True))

    for got in runs:
        assert bits(got, runs[0])
        if shared:  # a float32 rounding apart: the first step's kernels split work differently
            assert tree.allclose(got, ref, rtol=1e-4, atol=1e-6)
        else:
            assert bits(got, ref)


def test_threads_carry_grad_mode_and_autocast_and_raise_errors(intra_op_threads):
    def fn(p, t):
        return p * t

    x, ts = torch.ones(3, requires_grad=True), torch.ones(4, 3)
    with intra_op_threads(2):
        mapped = task_map(fn, strategy="threads")
        assert mapped(x, ts).requires_grad
        with torch.no_grad():
            assert not mapped(x, ts).requires_grad
        mm = task_map(lambda a, b: a @ b, strategy="threads")
        with torch.autocast("cpu", dtype=torch.bfloat16):
            assert mm(torch.ones(3, 3), torch.ones(4, 3, 3)).dtype == torch.bfloat16

        def bad(p, t):
            raise ValueError(f"task says no to {t.tolist()}")

        with pytest.raises(ValueError, match="task says no to"):
            task_map(bad, strategy="threads")(x, ts)


def test_threads_nest_and_defer_to_an_active_transform(intra_op_threads):
    inner = task_map(lambda p, t: p * t, strategy="threads")
    outer = task_map(lambda p, t: inner(p, t).sum(), strategy="threads")
    names = []

    def record(p, t):
        names.append(threading.current_thread().name)
        return (p * t).sum()

    with intra_op_threads(2):
        # a task that maps again runs its own tasks in turn (no deadlock on the pool)
        assert torch.equal(outer(torch.tensor(1.0), torch.ones(4, 3, 2)), torch.full((4,), 6.0))
        # under torch.func.grad the tasks run on the calling thread, where the transform lives
        mapped = task_map(record, strategy="threads")
        g = torch.func.grad(lambda p: mapped(p, torch.arange(6.0).view(3, 2)).sum())(torch.ones(2))
    assert torch.equal(g, torch.tensor([6.0, 9.0]))
    assert set(names) == {threading.current_thread().name}


def test_threads_give_from_module_models_a_module_per_thread(gen, intra_op_threads):
    net = torch.nn.Sequential(
        torch.nn.Conv2d(1, 4, 3, stride=2), torch.nn.BatchNorm2d(4), torch.nn.ReLU(),
        torch.nn.Flatten(), torch.nn.Linear(4 * 13 * 13, 3),
    )  # fmt: skip
    model = from_module(net)
    meta = {"params": model.init(gen, dtype=torch.float64)}
    batch = make_tasks(gen, tasks=8)
    with intra_op_threads(2):
        got = MAML(model, inner_lr=0.4, inner_steps=2, strategy="threads").meta_grad(meta, batch)
        ref = MAML(model, inner_lr=0.4, inner_steps=2, strategy="loop").meta_grad(meta, batch)
    assert rel_err(got[0], ref[0]) <= 1e-12 and torch.allclose(got[1], ref[1], rtol=1e-12)


def test_threads_run_in_turn_where_only_this_thread_has_the_state(intra_op_threads):
    from torch.utils.flop_counter import FlopCounterMode

    names = []

    def fn(p, t):
        names.append(threading.current_thread().name)
        return p @ t

    here = threading.current_thread().name
    p, ts = torch.ones(8, 8), torch.ones(4, 8, 8)
    with intra_op_threads(2):
        mapped = task_map(fn, strategy="threads")
        with FlopCounterMode(display=False) as flops:
            mapped(p, ts)
        assert flops.get_total_flops() == 4 * 2 * 8**3  # every task counted
        with torch.inference_mode():
            mapped(p, ts)
        with torch.autograd.graph.saved_tensors_hooks(lambda x: x, lambda x: x):
            mapped(p, ts)
        assert names == [here] * 12
        mapped(p, ts)
    assert set(names[12:]) != {here}  # and otherwise on the workers


def test_threads_caller_runs_one_intra_op_thread_while_workers_work(intra_op_threads):
    """Between results the caller's ops run on one thread (its OpenMP team would spin on the
    workers' cores); its own setting is back once the results are consumed or abandoned."""
    with intra_op_threads(2):
        during = [torch.get_num_threads() for _ in run_tasks([lambda: 1, lambda: 2, lambda: 3], 2)]
        assert during == [1, 1, 1]
        assert torch.get_num_threads() == 2
        results = run_tasks([lambda: 1, lambda: 2], 2)
        assert next(results) == 1 and torch.get_num_threads() == 1
        results.close()
        assert torch.get_num_threads() == 2
        assert [torch.get_num_threads() for _ in run_tasks([lambda: 1, lambda: 2], 1)] == [2, 2]
        # two consumed together: the setting comes back when the last ends, whichever it is
        calls = [lambda: 1, lambda: 2]
        pairs = zip(run_tasks(calls, 2), run_tasks(calls, 2), strict=True)
        assert list(pairs) == [(1, 1), (2, 2)]
        assert torch.get_num_threads() == 2
        first, second = run_tasks(calls, 2), run_tasks(calls, 2)
        next(first), next(second)
        first.close()
        assert torch.get_num_threads() == 1
        second.close()
        assert torch.get_num_threads() == 2


def test_threads_leave_the_default_for_new_threads_and_survive_a_fork(intra_op_threads):
    seen = []
    with intra_op_threads(2):
        assert list(run_tasks([lambda: 1, lambda: 2, lambda: 3], 3)) == [1, 2, 3]  # a new pool
        probe = threading.Thread(target=lambda: seen.append(torch.get_num_threads()))
        probe.start()
        probe.join()
        ctx = multiprocessing.get_context("fork")
        child = ctx.Process(target=_map_in_child)
        child.start()
        child.join(timeout=120)
        if child.is_alive():
            child.kill()
    assert seen == [2]  # the workers' one thread each is not the process's default
    assert child.exitcode == 0  # the child made its own pool instead of waiting on dead threads


def _map_in_child():
    out = list(run_tasks([lambda: 1, lambda: 2, lambda: 3], 3))
    os._exit(0 if out == [1, 2, 3] else 1)


def test_run_tasks_in_turn_computes_each_result_when_it_is_consumed():
    done = []
    results = run_tasks([lambda i=i: done.append(i) or i for i in range(3)], 1)
    assert next(results) == 0 and done == [0]
    assert list(results) == [1, 2] and done == [0, 1, 2]


def test_grad_with_aux_is_torch_func_grad_bit_for_bit():
    """At the top level ``grad_with_aux`` takes ``torch.autograd.grad`` instead of
    ``torch.func.grad``: the same gradient and aux bit for bit, differentiable to second order
    where the leaves require grad, without a graph under ``no_grad`` or with
    ``differentiable=False``, zeros for an unused leaf, and ``torch.func.grad`` itself under a
    transform."""
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(5, 3, generator=gen, dtype=torch.float64)

    def fn(p, scale):
        loss = (torch.tanh(x @ p["w"]) * scale).pow(2).sum() + p["b"].sin().sum()
        return loss, {"loss": loss.detach(), "n": torch.tensor(3)}

    params = {
        "w": torch.randn(3, 2, generator=gen, dtype=torch.float64),
        "b": torch.randn(2, generator=gen, dtype=torch.float64),
        "unused": torch.randn(4, generator=gen, dtype=torch.float64),
    }
    want, want_aux = torch.func.grad(fn, has_aux=True)(params, 1.5)
    got, aux = grad_with_aux(fn, params, 1.5)
    assert all(torch.equal(got[k], want[k]) for k in params)
    assert torch.equal(got["unused"], torch.zeros(4, dtype=torch.float64))
    assert torch.equal(aux["loss"], want_aux["loss"]) and int(aux["n"]) == 3
    assert all(g.grad_fn is None for g in got.values())  # nothing required grad

    # second order: the gradient of a function of the gradient, as nested torch.func.grad gives
    def outer(p, via):
        g, _ = via(p)
        return (g["w"] * g["w"]).sum() + g["b"].prod()

    nested = torch.func.grad(
        lambda p: outer(p, lambda q: torch.func.grad(fn, has_aux=True)(q, 1.5))
    )
    ref = nested(params)
    leaves = {k: v.clone().requires_grad_() for k, v in params.items()}
    value = outer(leaves, lambda q: grad_with_aux(fn, q, 1.5))
    second = torch.autograd.grad(value, list(leaves.values()), allow_unused=True)
    for k, s in zip(leaves, second, strict=True):
        expected = ref[k]
        assert torch.allclose(torch.zeros_like(expected) if s is None else s, expected, rtol=1e-12)
    # the same call under torch.func.grad takes torch.func.grad's own path
    assert all(
        torch.allclose(ref[k], v, rtol=1e-12)
        for k, v in torch.func.grad(lambda p: outer(p, lambda q: grad_with_aux(fn, q, 1.5)))(
            params
        ).items()
    )
    # no graph where nothing is differentiated from outside, or where it is not asked for
    with torch.no_grad():
        quiet, _ = grad_with_aux(fn, leaves, 1.5)
    first, _ = grad_with_aux(fn, leaves, 1.5, differentiable=False)
    for k in params:
        assert torch.equal(quiet[k], want[k]) and torch.equal(first[k], want[k])
        assert quiet[k].grad_fn is None and first[k].grad_fn is None
