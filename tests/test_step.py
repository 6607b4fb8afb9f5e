"""The compiled training step (``metafunc.compile_step``) against the eager step: float64
parameters after 20 iterations, float32 loss curves, the in-step samplers, clear refusals.
Each inductor compile takes 5-60 s on the 2-core CPU; the others trace with ``aot_eager``."""

from __future__ import annotations

import warnings
from dataclasses import dataclass

import pytest
import torch
import torch.nn.functional as F

import metafunc as mf
from metafunc import TaskBatch, tree
from metafunc.algorithms import MAML, Algorithm, MAMLPlusPlus, MetaSGD, ProtoNet
from metafunc.data import keys
from metafunc.step import CompileError

WAYS = 3


def images(gen: torch.Generator, tasks: int = 4) -> TaskBatch:
    x = torch.randn(tasks, WAYS, 1, 28, 28, generator=gen, dtype=torch.float64)
    q = torch.randn(tasks, 2 * WAYS, 1, 28, 28, generator=gen, dtype=torch.float64)
    y = torch.arange(WAYS).expand(tasks, -1).clone()
    return TaskBatch(x, y, q, torch.arange(WAYS).repeat(2).expand(tasks, -1).clone())


SINUSOID = {
    "MAML": lambda: MAML(mf.mlp(), inner_lr=0.01, loss="mse"),
    "MetaSGD": lambda: MetaSGD(mf.mlp(), loss="mse"),
    "MAMLPlusPlus": lambda: MAMLPlusPlus(mf.mlp(), inner_steps=2, loss="mse", msl_iterations=10),
}
CONV4 = {
    "MAML": lambda: MAML(mf.conv4(WAYS, hidden=4), inner_lr=0.1, strategy="vmap"),
    "MetaSGD": lambda: MetaSGD(mf.conv4(WAYS, hidden=4), strategy="vmap"),
    "MAMLPlusPlus": lambda: MAMLPlusPlus(
        mf.conv4(WAYS, hidden=4), inner_steps=2, msl_iterations=10, strategy="vmap"
    ),
    "ProtoNet": lambda: ProtoNet(mf.conv4(None, hidden=4), shots=1, strategy="loop"),
}
# inductor (code generation) for one case of each model; aot_eager traces the same graph
INDUCTOR = {("sinusoid", "MAML"), ("conv4", "ProtoNet")}


def run_both(alg: Algorithm, backend: str, batches, *, sampler=None, dtype=torch.float64):
    """(eager states, compiled states, per-iteration losses of each) over ``batches``."""
    meta = tree.cast(alg.init(torch.Generator().manual_seed(1)), dtype)
    opt = alg.outer_optimizer(1e-3, 100)  # the papers' rate: at 1e-2 Adam's normalised steps
    # make the float32 trajectory chaotic, so rounding differences grow to 1e-3 over 100 steps
    out = []
    for mode in (None, "default"):
        step = mf.compile_step(
            alg, opt, sampler=sampler, meta_batch=4 if sampler else None, mode=mode,
            backend=backend,
        )  # fmt: skip
        state = step.init(meta, keys.key(7))
        losses = []
        for i, batch in enumerate(batches):
            state, metrics = step(state, batch, iteration=i)
            assert bool(metrics["finite"])
            losses.append(float(metrics["loss"]))
        out.append((state, losses, step))
    return out


def relative(a, b) -> float:
    return float(tree.global_norm(tree.sub(a, b)) / tree.global_norm(b))


@pytest.mark.slow
@pytest.mark.parametrize("name", list(SINUSOID))
def test_compiled_step_equals_eager_on_the_sinusoid(name):
    """20 iterations in float64, tasks drawn inside the step from its key."""
    alg = SINUSOID[name]()
    backend = "inductor" if ("sinusoid", name) in INDUCTOR else "aot_eager"
    sampler = mf.data.SinusoidTasks(shots=5, dtype=torch.float64)
    (eager, _, _), (compiled, _, step) = run_both(alg, backend, [None] * 20, sampler=sampler)
    assert step.whole
    assert relative(compiled.meta, eager.meta) <= 1e-10
    assert torch.equal(compiled.key, eager.key)
    assert relative(compiled.opt_state, eager.opt_state) <= 1e-10


@pytest.mark.slow
@pytest.mark.parametrize("name", list(CONV4))
def test_compiled_step_equals_eager_on_conv4(name):
    """20 iterations in float64 on conv4 with batch norm; ProtoNet on the loop strategy, so its
    meta-gradient is compiled per task and the update as a graph of its own."""
    alg = CONV4[name]()
    backend = "inductor" if ("conv4", name) in INDUCTOR else "aot_eager"
    gen = torch.Generator().manual_seed(3)
    batches = [images(gen) for _ in range(20)]
    (eager, _, _), (compiled, _, step) = run_both(alg, backend, batches)
    assert step.whole == (name != "ProtoNet")
    assert relative(compiled.meta, eager.meta) <= 1e-10


@pytest.mark.slow
def test_float32_loss_curves_agree_over_100_iterations():
    alg = SINUSOID["MAML"]()
    sampler = mf.data.SinusoidTasks(shots=5)
    (_, eager, _), (_, compiled, _) = run_both(
        alg, "inductor", [None] * 100, sampler=sampler, dtype=torch.float32
    )
    worst = max(abs(c - e) / max(abs(e), 1.0) for c, e in zip(compiled, eager, strict=True))
    assert worst <= 1e-5, worst


def test_in_step_samplers_draw_from_the_key_alone(data_root):
    """The same key gives the same tasks on every call, another key others; episodes are
    well-formed N-way K-shot tasks of distinct classes."""
    sampler = mf.data.SinusoidTasks(shots=5)
    a, b = sampler.sample_keyed(4, keys.key(1)), sampler.sample_keyed(4, keys.key(1))
    assert all(torch.equal(x, y) for x, y in zip(a, b, strict=True))
    assert not torch.equal(a.support_x, sampler.sample_keyed(4, keys.key(2)).support_x)
    assert float(a.support_x.min()) >= -5.0 and float(a.support_x.max()) < 5.0
    images = mf.data.get_benchmark("omniglot", data_root, shots=1, queries=2, ways=5).train
    batch = images.sample_keyed(6, keys.key(3))
    mf.check_batch(batch, call="test", targets="classes", ways=5)
    assert batch.support_x.shape == (6, 5, 1, 28, 28) and batch.query_x.shape == (6, 10, 1, 28, 28)
    again = images.sample_keyed(6, keys.key(3))
    assert torch.equal(batch.query_x, again.query_x)
    # each support image differs from the others of its task (distinct classes)
    flat = batch.support_x.flatten(2)
    same = (flat[:, :, None] == flat[:, None]).all(-1)
    assert int(same.sum()) == 6 * 5


def test_keys_are_uniform_and_split_independently():
    u = keys.uniform(keys.key(0), (100_000,), torch.float64)
    assert abs(float(u.mean()) - 0.5) < 0.01 and abs(float(u.var()) - 1 / 12) < 0.002
    assert float(u.min()) >= 0.0 and float(u.max()) < 1.0
    k1, k2 = keys.split(keys.key(0))
    assert not torch.equal(k1, k2)
    a = keys.uniform(k1, (1000,), torch.float64)
    b = keys.uniform(k2, (1000,), torch.float64)
    assert abs(float(torch.corrcoef(torch.stack([a, b]))[0, 1])) < 0.1
    assert torch.equal(keys.uniform(keys.key(5), (3,)), keys.uniform(keys.key(5), (3,)))


@dataclass(frozen=True)
class Breaks(Algorithm):
    """A user's algorithm with a host read in its loss: not one graph."""

    model: mf.Model
    loss: str = "mse"

    def meta_loss(self, meta, batch, *, iteration=0):
        preds = mf.task_map(lambda m, t: self.model.apply(m["params"], t.query_x))(meta, batch)
        loss = F.mse_loss(preds, batch.query_y)
        if loss.item() > 1e9:  # a data-dependent branch
            loss = loss * 0
        return loss, {"loss": loss.detach()}

    def adapt_and_predict(self, meta, batch, steps):
        raise NotImplementedError


def test_a_graph_break_is_named_with_the_way_to_run_eagerly():
    alg = Breaks(mf.mlp())
    step = mf.compile_step(alg, mf.optim.adam(1e-3), backend="aot_eager")
    batch = mf.data.SinusoidTasks(shots=5).sample(4, torch.Generator().manual_seed(0))
    message = r"compile_step\(Breaks, \.\.\.\).*not compile as one graph.*mode=None.*--compile off"
    with pytest.raises(CompileError, match=message):
        step(step.init(alg.init()), batch)
    eager = mf.compile_step(alg, mf.optim.adam(1e-3), mode=None)
    eager(eager.init(alg.init()), batch)  # runs eagerly


def test_other_shapes_compile_again_once_and_say_so():
    alg = SINUSOID["MAML"]()
    step = mf.compile_step(alg, mf.optim.adam(1e-3), backend="aot_eager")
    state = step.init(alg.init())
    tasks = mf.data.SinusoidTasks(shots=5)
    state, _ = step(state, tasks.sample(4, torch.Generator().manual_seed(0)))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        state, _ = step(state, tasks.sample(4, torch.Generator().manual_seed(1)))  # same shapes
    with pytest.warns(UserWarning, match="compiling the step again"):
        state, _ = step(state, tasks.sample(6, torch.Generator().manual_seed(2)))
    assert len(step.compile_seconds) == 2


def test_compile_step_refuses_bad_arguments():
    alg = SINUSOID["MAML"]()
    with pytest.raises(TypeError, match="not an Algorithm"):
        mf.compile_step("maml", mf.optim.adam(1e-3))  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="GradientTransformation"):
        mf.compile_step(alg, torch.optim.Adam)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="mode='fast'"):
        mf.compile_step(alg, mf.optim.adam(1e-3), mode="fast")
    with pytest.raises(TypeError, match="sample_keyed"):
        mf.compile_step(alg, mf.optim.adam(1e-3), sampler=object(), meta_batch=4)
    with pytest.raises(ValueError, match="meta_batch must be an int"):
        mf.compile_step(alg, mf.optim.adam(1e-3), sampler=mf.data.SinusoidTasks())
    step = mf.compile_step(alg, mf.optim.adam(1e-3))
    with pytest.raises(ValueError, match="no batch and no sampler"):
        step(step.init(alg.init()))
    bad = mf.data.SinusoidTasks(shots=5).sample(4, torch.Generator().manual_seed(0))
    with pytest.raises(ValueError, match=r"batch\.query_x 3"):
        step(step.init(alg.init()), bad._replace(query_x=bad.query_x[:3]))


def precompiled_run(alg, cache, iterations, *, expect=None):
    """(states, step) of a fresh step with ``cache`` over ``iterations``, float64, tasks drawn
    inside it; ``expect`` a warning to see on the way."""
    sampler = mf.data.SinusoidTasks(shots=5, dtype=torch.float64)
    meta = tree.cast(alg.init(torch.Generator().manual_seed(1)), torch.float64)
    opt = alg.outer_optimizer(1e-3, 100)
    step = mf.compile_step(
        alg, opt, sampler=sampler, meta_batch=4, backend="aot_eager", cache=cache
    )  # fmt: skip
    state = step.init(meta, keys.key(7))
    context = pytest.warns(UserWarning, match=expect) if expect else warnings.catch_warnings()
    with context:
        if not expect:
            warnings.simplefilter("error")
        for i in range(iterations):
            state, _ = step(state, iteration=i)
    eager = mf.compile_step(alg, opt, sampler=sampler, meta_batch=4, mode=None)
    reference = eager.init(meta, keys.key(7))
    for i in range(iterations):
        reference, _ = eager(reference, iteration=i)
    assert relative(state.meta, reference.meta) <= 1e-10
    return step


@pytest.mark.slow
def test_a_precompiled_step_is_saved_loaded_and_checked(tmp_path):
    """A step saved by one Step loads in another (no tracing) and equals the eager step; a file
    saved for other settings is caught on its first call and compiled again; a corrupt one
    too."""
    cache = tmp_path / "step.bin"
    assert precompiled_run(SINUSOID["MAML"](), cache, 3).precompiled == "saved"
    assert cache.is_file()
    assert precompiled_run(SINUSOID["MAML"](), cache, 3).precompiled == "loaded"
    other = MAML(mf.mlp(), inner_lr=0.1, loss="mse")  # the same shapes, another program
    stale = precompiled_run(other, cache, 3, expect="stale.*differ from the eager step")
    assert stale.precompiled == "saved"
    cache.write_bytes(b"not a step")
    broken = precompiled_run(other, cache, 2, expect="stale.*does not load")
    assert broken.precompiled == "saved"
    assert precompiled_run(other, cache, 2).precompiled == "loaded"


@pytest.mark.slow
def test_a_precompiled_step_keeps_the_branches_on_the_iteration(tmp_path):
    """MAML++ anneals its loss weights until iteration 3: the saved program holds for
    iterations 0-2 and its guard says so at 3, where the step compiles again (and stays
    exact)."""
    alg = MAMLPlusPlus(mf.mlp(), inner_steps=2, loss="mse", msl_iterations=3)
    cache = tmp_path / "mamlpp.bin"
    precompiled_run(alg, cache, 5, expect=r"does not cover iteration 3.*L\['iteration'\]")
    step = precompiled_run(alg, cache, 3)
    assert step.precompiled == "loaded"


def test_a_step_that_cannot_be_precompiled_compiles_without_saving(tmp_path, monkeypatch):
    """Dynamo's ahead-of-time path is experimental: where it fails, the step says so and
    compiles as it would without a cache (and stays exact)."""
    import torch._dynamo.aot_compile

    def fails(*args, **kwargs):
        raise RuntimeError("not this time (test)")

    monkeypatch.setattr(torch._dynamo.aot_compile, "aot_compile_fullgraph", fails)
    cache = tmp_path / "step.bin"
    step = precompiled_run(SINUSOID["MAML"](), cache, 2, expect="not precompiled.*not this time")
    assert step.precompiled.startswith("not precompiled") and not cache.exists()


def test_compile_step_names_a_cache_that_is_not_a_path():
    alg = SINUSOID["MAML"]()
    with pytest.raises(TypeError, match=r"cache is a int; pass a file path"):
        mf.compile_step(alg, mf.optim.adam(1e-3), cache=3)  # type: ignore[arg-type]
