"""Memory: gradient checkpointing across inner steps gives the full graph's meta-gradient in
less memory, and iMAML's memory does not grow with its inner steps (a profiler probe)."""

from __future__ import annotations

import pytest
import torch
from helpers import class_tasks, sine_tasks
from references import rel_err

from metafunc import conv4, mlp, optim
from metafunc.algorithms import ANIL, IMAML, MAML, MAMLPlusPlus, MetaSGD


class MomentumMAML(MAML):
    """MAML whose inner optimizer has a floating state (momentum) and a step counter."""

    def inner_optimizer(self, meta_params):
        return optim.sgd(optim.schedules.exponential_decay(self.inner_lr, 0.9), momentum=0.9)


CHECKPOINTED = {
    "maml": (MAML, {}),
    "fomaml": (MAML, {"first_order": True}),
    "metasgd": (MetaSGD, {}),
    "head-only": (MAML, {"trainable": "head"}),
    "momentum": (MomentumMAML, {}),
    "anil": (ANIL, {}),
    "anil-first-order": (ANIL, {"first_order": True}),
    "mamlpp": (MAMLPlusPlus, {"msl_iterations": 10}),
}


@pytest.mark.parametrize("strategy", ["loop", "vmap"])
@pytest.mark.parametrize("name", list(CHECKPOINTED))
def test_checkpointed_meta_gradient_equals_the_full_graph(gen, name, strategy):
    cls, kw = CHECKPOINTED[name]
    model = conv4(3, hidden=4)
    batch = class_tasks(gen, 3, 3, 2, 2)
    plain = cls(model, inner_lr=0.3, inner_steps=3, strategy=strategy, **kw)
    meta = plain.init(gen, dtype=torch.float64)
    ref, ref_loss, _ = plain.meta_grad(meta, batch)
    ckpt = cls(model, inner_lr=0.3, inner_steps=3, strategy=strategy, checkpoint=True, **kw)
    grads, loss, metrics = ckpt.meta_grad(meta, batch)
    assert rel_err(grads, ref) <= 1e-10
    assert abs(float(loss - ref_loss)) <= 1e-12 and "accuracy" in metrics


def peak_bytes(fn) -> int:
    """Peak CPU tensor memory allocated while ``fn`` runs, above what was live before: the running
    sum of the profiler's allocation/free events. A memory probe, not a timing."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    events = [e for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"]
    live = peak = 0
    for event in sorted(events, key=lambda e: e.start_ns()):
        live += event.nbytes()
        peak = max(peak, live)
    return peak


def test_checkpointed_memory_does_not_grow_like_the_graph(gen):
    model = mlp((1, 64, 64, 1))
    batch = sine_tasks(gen, 1, support=256, query=16)
    peaks = {}
    for checkpoint in (False, True):
        for steps in (4, 32):
            alg = MAML(model, inner_lr=0.01, inner_steps=steps, loss="mse", strategy="loop",
                       checkpoint=checkpoint)  # fmt: skip
            meta = alg.init(gen)
            peaks[checkpoint, steps] = peak_bytes(lambda a=alg, m=meta: a.meta_grad(m, batch))
    print("peak bytes:", peaks)
    assert peaks[False, 32] > 5 * peaks[False, 4]  # the whole graph: grows with the steps
    # checkpointed: one step's graph plus one copy of the parameters per step
    param_bytes = sum(v.numel() * v.element_size() for v in meta["params"].values())
    assert peaks[True, 32] - peaks[True, 4] <= 28 * 1.5 * param_bytes
    assert peaks[True, 32] < peaks[False, 32] / 4


def test_imaml_memory_does_not_grow_with_inner_steps(gen):
    model = mlp((1, 64, 1))
    batch = sine_tasks(gen, 1, support=256, query=16)
    peaks = {}
    for cls, kw in ((MAML, {}), (IMAML, {"cg_steps": 1})):
        for steps in (5, 50):
            alg = cls(model, inner_lr=0.01, inner_steps=steps, loss="mse", strategy="loop", **kw)
            meta = alg.init(gen)
            peaks[cls.__name__, steps] = peak_bytes(
                lambda alg=alg, meta=meta: alg.meta_grad(meta, batch)
            )
    print("peak bytes:", peaks)
    assert peaks["MAML", 50] > 5 * peaks["MAML", 5]  # the probe sees a graph that grows
    assert peaks["IMAML", 50] == peaks["IMAML", 5]


@pytest.mark.parametrize("iteration", [0, 3, 20])
def test_checkpointed_mamlpp_follows_its_annealing(gen, iteration):
    """MAML++'s checkpointed sweep weighs the query losses of every step as its multi-step loss
    does (annealed over ``msl_iterations``) and is first order while ``first_order_iterations``
    last: the full graph's meta-gradient at every phase."""
    kw = {"inner_steps": 3, "msl_iterations": 10, "first_order_iterations": 2}
    plain = MAMLPlusPlus(conv4(3, hidden=4), **kw)
    batch = class_tasks(gen, 2, 3, 2, 2)
    meta = plain.init(gen, dtype=torch.float64)
    ref, ref_loss, _ = plain.meta_grad(meta, batch, iteration=iteration)
    ckpt = MAMLPlusPlus(conv4(3, hidden=4), checkpoint=True, **kw)
    grads, loss, _ = ckpt.meta_grad(meta, batch, iteration=iteration)
    assert rel_err(grads, ref) <= 1e-10
    assert abs(float(loss - ref_loss)) <= 1e-12


def test_checkpointed_mamlpp_memory_is_flat_in_the_steps(gen):
    """MAML++'s checkpointed meta-gradient holds one step's graph: its peak grows far less with
    the inner steps than the full graph's (a profiler probe, not a timing)."""
    batch = class_tasks(gen, 1, 5, 1, 2, size=28)
    peaks = {}
    for checkpoint in (False, True):
        for steps in (2, 8):
            alg = MAMLPlusPlus(conv4(5, hidden=16), inner_steps=steps, checkpoint=checkpoint)
            meta = alg.init(gen, dtype=torch.float64)
            peaks[checkpoint, steps] = peak_bytes(lambda a=alg, m=meta: a.meta_grad(m, batch))
    print("peak bytes:", peaks)
    assert peaks[False, 8] > 2.5 * peaks[False, 2]
    assert peaks[True, 8] < 1.5 * peaks[True, 2]


def test_checkpoint_is_refused_where_the_task_loss_is_custom():
    """A subclass that writes its own task loss and not the ``unrolled`` the sweep replays is
    refused ``checkpoint=True``, naming the fix; one that writes both is not."""

    class Custom(MAML):
        def task_loss(self, meta_params, task, iteration):
            return super().task_loss(meta_params, task, iteration)

    with pytest.raises(ValueError, match=r"Custom\(checkpoint\).*define Custom\.unrolled"):
        Custom(conv4(3, hidden=4), checkpoint=True)

    class Both(Custom):
        def unrolled(self, task, iteration):
            return super().unrolled(task, iteration)

    Both(conv4(3, hidden=4), checkpoint=True)
