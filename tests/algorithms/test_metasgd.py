"""Meta-SGD: the meta-gradient in float64, learned per-entry rates included, against an explicit
per-task ``torch.autograd.grad`` loop, on every per-task strategy, with and without the shared
first step, on each device."""

from __future__ import annotations

import pytest
import torch
from helpers import LR, PER_TASK, conv_batch, distinct_rates, to
from references import check, ref_meta_grad

from metafunc import conv4
from metafunc.algorithms import MetaSGD

# two intra-op threads, so that the 'threads' strategy runs tasks concurrently
pytestmark = pytest.mark.usefixtures("two_intra_op_threads")


@pytest.fixture
def batch(gen):
    return conv_batch(gen)


@pytest.mark.parametrize(("strategy", "shared"), PER_TASK)
def test_meta_sgd(gen, batch, device, strategy, shared):
    alg = MetaSGD(
        conv4(3, hidden=6), inner_lr=LR, inner_steps=2, strategy=strategy,
        shared_first_step=shared,
    )  # fmt: skip
    meta = alg.init(gen, dtype=torch.float64)
    meta["lr"] = distinct_rates(meta["lr"], gen)
    ref = ref_meta_grad(meta, batch, 2, lr=lambda leaves, k, n: leaves[f"lr.{n}"])
    assert float(ref["lr.head.weight"].abs().sum()) > 0
    check(alg, to(device, meta), to(device, batch), ref)
