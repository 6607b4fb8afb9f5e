"""ANIL: the meta-gradient in float64 against an explicit per-task ``torch.autograd.grad`` loop
that adapts only the head, on every per-task strategy, on each device."""

from __future__ import annotations

import pytest
import torch
from helpers import LR, conv_batch, to
from references import check, ref_meta_grad

from metafunc import conv4
from metafunc.algorithms import ANIL

# two intra-op threads, so that the 'threads' strategy runs tasks concurrently
pytestmark = pytest.mark.usefixtures("two_intra_op_threads")


@pytest.fixture
def batch(gen):
    return conv_batch(gen)


@pytest.mark.parametrize("strategy", ["loop", "vmap", "threads"])
def test_anil(gen, batch, device, strategy):
    alg = ANIL(conv4(3, hidden=6), inner_lr=LR, inner_steps=3, strategy=strategy)
    meta = alg.init(gen, dtype=torch.float64)
    ref = ref_meta_grad(
        meta, batch, 3, lr=lambda leaves, k, n: LR, adapt_keys=["head.weight", "head.bias"]
    )
    check(alg, to(device, meta), to(device, batch), ref)
