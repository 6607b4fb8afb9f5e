"""MAML and first-order MAML: the meta-gradient in float64 against an explicit per-task
``torch.autograd.grad`` loop, on every per-task strategy, with and without the shared first
step, on each device."""

from __future__ import annotations

import pytest
import torch
from helpers import LR, PER_TASK, conv_batch, takes_shared_path, to
from references import check, ref_meta_grad

from metafunc import conv4
from metafunc.algorithms import MAML, FirstOrderMAML

# two intra-op threads, so that the 'threads' strategy runs tasks concurrently
pytestmark = pytest.mark.usefixtures("two_intra_op_threads")


@pytest.fixture
def batch(gen):
    return conv_batch(gen)


@pytest.mark.parametrize(("strategy", "shared"), PER_TASK)
@pytest.mark.parametrize("cls", [MAML, FirstOrderMAML])
@pytest.mark.parametrize("steps", [1, 3])
def test_maml_and_first_order(gen, batch, device, strategy, shared, cls, steps, monkeypatch):
    alg = cls(
        conv4(3, hidden=6), inner_lr=LR, inner_steps=steps, strategy=strategy,
        shared_first_step=shared,
    )  # fmt: skip
    meta = alg.init(gen, dtype=torch.float64)
    ref = ref_meta_grad(
        meta, batch, steps, lr=lambda leaves, k, n: LR, first_order=cls is FirstOrderMAML
    )  # on the CPU: the reference never moves
    meta, batch = to(device, meta), to(device, batch)
    calls = takes_shared_path(alg, meta, batch, monkeypatch, shared and strategy != "vmap")
    check(alg, meta, batch, ref)
    assert len(calls) == int(shared and strategy != "vmap")
    assert all(seen is batch for seen in calls)
