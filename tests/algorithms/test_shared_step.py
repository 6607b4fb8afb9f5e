"""MAML's shared first inner step (``shared_first_step``): the meta-gradient against the
per-task float64 reference with frozen leaves and in chunks, and when the path is taken."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from helpers import LR, conv_batch, takes_shared_path, to, under_transform
from references import check, ref_meta_grad

from metafunc import conv4, from_module, tree
from metafunc.algorithms import MAML, FirstOrderMAML, MetaSGD, shared_step
from metafunc.algorithms.shared_step import shares_first_step

# two intra-op threads, so that the 'threads' strategy runs tasks concurrently
pytestmark = pytest.mark.usefixtures("two_intra_op_threads")


@pytest.fixture
def batch(gen):
    return conv_batch(gen)


@pytest.mark.parametrize("steps", [1, 2])
@pytest.mark.parametrize("strategy", ["loop", "threads"])
def test_maml_shared_first_step_with_frozen_leaves(
    gen, batch, device, strategy, steps, monkeypatch
):
    """Only the head adapts: the first step's gradient covers the head, and the frozen body
    still gets the second-order term through it (one step: through the batched update too)."""
    alg = MAML(
        conv4(3, hidden=6), inner_lr=LR, inner_steps=steps, strategy=strategy,
        trainable="head", shared_first_step=True,
    )  # fmt: skip
    meta = alg.init(gen, dtype=torch.float64)
    ref = ref_meta_grad(
        meta, batch, steps, lr=lambda leaves, k, n: LR, adapt_keys=["head.weight", "head.bias"]
    )  # on the CPU: the reference never moves
    meta, batch = to(device, meta), to(device, batch)
    calls = takes_shared_path(alg, meta, batch, monkeypatch, True)
    check(alg, meta, batch, ref)
    assert len(calls) == 1 and calls[0] is batch


@pytest.mark.parametrize("steps", [1, 2])
@pytest.mark.parametrize("strategy", ["loop", "threads"])
@pytest.mark.parametrize("cls", [MAML, FirstOrderMAML, MetaSGD])
def test_maml_shared_first_step_in_chunks(gen, batch, device, strategy, cls, steps, monkeypatch):
    """Three tasks in chunks of two (a full chunk and a partial one): the meta-gradient is the
    reference's, and each chunk's first step is computed once (one vmapped support pass per
    chunk, none repeated for the second-order term; with one step, the chunk's update batched
    and no support pass per task)."""
    monkeypatch.setattr(shared_step, "SHARED_STEP_TASKS", 2)
    alg = cls(
        conv4(3, hidden=6), inner_lr=LR, inner_steps=steps, strategy=strategy,
        shared_first_step=True,
    )  # fmt: skip
    meta = alg.init(gen, dtype=torch.float64)
    rates = {k: torch.full_like(v, LR) for k, v in meta["params"].items()}
    if cls is MetaSGD:  # distinct per-entry rates, so a mix-up of leaves cannot pass
        rates = {
            k: v * (1 + 0.5 * torch.rand(v.shape, generator=gen, dtype=v.dtype))
            for k, v in rates.items()
        }
        meta["lr"] = rates
    ref = ref_meta_grad(
        meta, batch, steps, lr=lambda leaves, k, n: leaves.get(f"lr.{n}", LR),
        first_order=cls is FirstOrderMAML,
    )  # fmt: skip
    supports = []
    original = cls.support_loss

    def counted(self, params, task):
        supports.append(under_transform())  # the vmapped first step, or a task's later step
        return original(self, params, task)

    monkeypatch.setattr(cls, "support_loss", counted)
    check(alg, to(device, meta), to(device, batch), ref)
    later = 3 * (steps - 1)  # the tasks' own support passes, after the shared one
    assert supports.count(True) == 2 and supports.count(False) == later, supports


def test_maml_shared_first_step_only_at_the_top_level(gen, batch):
    """Inside a torch.func transform, or with leaves already requiring grad, meta_grad takes
    the generic path, which composes; the result is the same."""
    alg = MAML(conv4(3, hidden=6), inner_lr=LR, inner_steps=1, strategy="threads")
    meta = alg.init(gen, dtype=torch.float64)
    assert shares_first_step(alg, meta, batch)
    assert not shares_first_step(dataclasses.replace(alg, strategy="vmap"), meta, batch)
    assert not shares_first_step(dataclasses.replace(alg, checkpoint=True), meta, batch)
    assert not shares_first_step(dataclasses.replace(alg, shared_first_step=False), meta, batch)
    # the default (None) shares it for a one-step inner loop under 'threads', which trades
    # memory for speed, not under 'loop' (the CPU's 'auto' here: one task's graph at a time);
    # True under both, also for more steps
    cases = [("threads", 1, True), ("loop", 1, False), ("loop", 2, False), ("auto", 1, False)]
    cases += [("auto", 2, False), ("threads", 2, False)]
    for strategy, steps, shares in cases:
        other = dataclasses.replace(alg, strategy=strategy, inner_steps=steps)
        assert shares_first_step(other, meta, batch) == shares, (strategy, steps)
        assert shares_first_step(dataclasses.replace(other, shared_first_step=True), meta, batch)
    # ... only for small support sets (here 6 examples a task) ...
    assert shared_step.SHARED_STEP_MAX_SUPPORT >= 6
    small = dataclasses.replace(alg, strategy="threads")
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(shared_step, "SHARED_STEP_MAX_SUPPORT", 5)
        assert not shares_first_step(small, meta, batch)
        assert shares_first_step(dataclasses.replace(small, shared_first_step=True), meta, batch)
    # ... and only for a model exact under vmap: one that draws dropout runs its tasks alone
    dropping = torch.nn.Sequential(
        torch.nn.Flatten(), torch.nn.Linear(28 * 28, 3), torch.nn.Dropout(0.1)
    ).double()
    inexact = MAML(from_module(dropping), inner_lr=LR, strategy="threads")
    inexact_meta = inexact.init(gen, dtype=torch.float64)
    assert not shares_first_step(inexact, inexact_meta, batch)
    assert shares_first_step(
        dataclasses.replace(inexact, shared_first_step=True), inexact_meta, batch
    )
    # ... while the same network without dropout (any module's, not only metafunc's) shares
    plain = MAML(from_module(dropping[:2]), inner_lr=LR, strategy="threads")
    assert shares_first_step(plain, plain.init(gen, dtype=torch.float64), batch)
    needs = tree.map(lambda x: x.clone().requires_grad_(), meta)
    assert not shares_first_step(alg, needs, batch)
    with torch.no_grad():
        assert shares_first_step(alg, needs, batch)
    expected, _, _ = alg.meta_grad(meta, batch)
    # the meta-gradient of the meta-loss, taken by torch.func.grad around meta_loss
    outer = torch.func.grad(lambda m: alg.meta_loss(m, batch)[0])(meta)
    assert tree.allclose(outer, expected, rtol=1e-10, atol=1e-14)
